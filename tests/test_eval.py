"""eval.py: report correctness on hand-made completions, MER-UniBench readers on generated fixtures, the
evaluation CLI on one and two ranks, plots, and the reproduction script's quick mode."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import common
import data
import eval as ev
import model as M
import reward
from conftest import ROOT, run_script
from test_data import write_video


@pytest.fixture(scope="module")
def lex():
    return reward.load_lexicon("builtin")


def test_openset_report_by_hand(lex):
    completions = {"a": "<think>x</think><answer>happy, angry</answer>",  # P = 1/2, R = 1
                   "b": "<answer>sad</answer>",                              # P = 1, R = 1/2; no <think>
                   "c": "sad and angry, no tags"}                            # no answer: P = R = 0
    gts = {"a": "happy", "b": "sad, angry", "c": "afraid"}
    r = ev.openset_report(completions, gts, lex, think=True)
    # every wheel: mean P = mean R = 1/2 -> F = 1/2
    assert (r["ew_f_l1"], r["precision_l1"], r["recall_l1"]) == pytest.approx((0.5, 0.5, 0.5))
    # level 2 splits sectors into finer clusters; these labels stay apart there too: the same values
    assert (r["ew_f_l2"], r["precision_l2"], r["recall_l2"]) == pytest.approx((0.5, 0.5, 0.5))
    assert r["format_rate"] == pytest.approx(1 / 3) and r["n_labels"] == pytest.approx(1.0)
    assert r["n_labels_hist"] == {0: 1, 1: 1, 2: 1}


def test_draws_are_averaged(lex):
    outputs = {"a": ["<answer>happy</answer>", "<answer>sad, angry</answer>"],   # draw 0: F = 1, draw 1: F = 0
               "b": ["<answer>sad</answer>", "<answer>sad</answer>"]}             # F = 1 in both draws
    m = ev.score_draws(outputs, {"a": "happy", "b": "sad"}, lex, think=False)
    assert m["n_draws"] == 2 and m["ew_f_l1"] == pytest.approx((1.0 + 0.5) / 2)  # draw 1: P = R = 1/2
    assert m["ew_f_l1_std"] == pytest.approx(0.25) and m["n_labels"] == pytest.approx((1 + 1.5) / 2)
    assert m["n_labels_hist"] == {1: 3, 2: 1}  # counted over both draws


@pytest.mark.parametrize("labels, polarity", [(["happy", "cheerful"], "positive"), (["sad"], "negative"),
                                              (["happy", "sad"], "neutral"), ([], "neutral"),
                                              (["xyzzy"], "neutral"), (["angry", "afraid", "happy"], "negative")])
def test_answer_polarity(lex, labels, polarity):
    assert reward.answer_polarity(labels, lex) == polarity


def test_sentiment_scores_by_hand():
    valence = {"a": 1.5, "b": -2.0, "c": 0.0, "d": 0.4, "e": -0.1, "f": 2.0}
    pred = {"a": "positive", "b": "negative", "c": "positive", "d": "neutral", "e": "positive", "f": "positive"}
    s = reward.sentiment_scores(pred, valence)
    # c is removed (valence 0); d's neutral counts as negative. positive: tp 2 (a, f), fp 1 (e), fn 1 (d) ->
    # F1 2/3; negative: tp 1 (b), fp 1 (d), fn 1 (e) -> 1/2; weighted by support 3 : 2 -> 0.6
    assert s == {"weighted_f1": pytest.approx(0.6), "accuracy": pytest.approx(0.6), "n": 5}


# ---- MER-UniBench fixtures in the official layouts ----------------------------------------------------------

def clip_media(folder, video_dir, audio_dir, names):
    os.makedirs(folder / video_dir, exist_ok=True)
    os.makedirs(folder / audio_dir, exist_ok=True)
    for i, name in enumerate(names):
        write_video(folder / video_dir / f"{name}.mp4", [40 * i + 20] * 3, size=(32, 32))
        soundfile.write(folder / audio_dir / f"{name}.wav", np.zeros(8000, np.float32), 16000)


def transcript(path, names):
    path.write_text("name,chinese,english\n" + "".join(f"{n},你好,I feel fine {i}\n" for i, n in enumerate(names)))


def save_corpus(path, corpus, key="test_corpus"):
    np.savez(path, **{key: np.array(corpus, dtype=object), "train_corpus": np.array({}, dtype=object)})


@pytest.fixture(scope="module")
def unibench(tmp_path_factory):
    root = tmp_path_factory.mktemp("unibench")
    ov = root / "ovmerdplus-process"
    clip_media(ov, "video", "audio", ["o1", "o2", "o3"])
    (ov / "track2_test.csv").write_text("name,openset\no1,\"['happy', 'excited']\"\no2,\"['sad']\"\no3,\"['angry']\"\n")
    transcript(ov / "subtitle_chieng.csv", ["o1", "o2", "o3"])
    mer = root / "mer2023-dataset-process"
    clip_media(mer, "video", "audio", ["m1", "m2", "m3", "m4"])
    save_corpus(mer / "label-6way.npz", {"m1": {"emo": "happy", "val": 1.0}, "m2": {"emo": "neutral", "val": 0},
                                         "m3": {"emo": "worried", "val": -1.0}, "m4": {"emo": "angry", "val": -2}})
    transcript(mer / "transcription-engchi-polish.csv", ["m1", "m2", "m3", "m4"])
    meld = root / "meld-dataset"
    clip_media(meld, "subvideo", "subaudio", ["e1", "e2"])
    save_corpus(meld / "label.npz", {"e1": {"emo": 1, "val": 0}, "e2": {"emo": 2, "val": 0}})  # joy, sadness
    transcript(meld / "subtitle_chieng.csv", ["e1", "e2"])
    mosi = root / "cmumosi-dataset"
    clip_media(mosi, "subvideo", "subaudio", ["s1", "s2", "s3"])
    save_corpus(mosi / "label.npz", {"s1": {"emo": None, "val": 1.8}, "s2": {"emo": None, "val": -0.6},
                                     "s3": {"emo": None, "val": 0.0}})
    transcript(mosi / "subtitle_chieng.csv", ["s1", "s2", "s3"])
    return root


def test_corpus_reader(unibench, tmp_path):
    corpus = data.read_unibench_labels(str(unibench / "meld-dataset" / "label.npz"), ev.UNIBENCH["meld"][3])
    assert corpus == {"e1": ("joy", 0.0), "e2": ("sadness", 0.0)}  # integer classes read as indices
    mosi = data.read_unibench_labels(str(unibench / "cmumosi-dataset" / "label.npz"), None)
    assert mosi["s2"] == (None, -0.6)
    save_corpus(tmp_path / "bad.npz", {"x": {"emo": 9, "val": 0}})
    with pytest.raises(data.DataError, match=r"bad.npz: clip x has class index 9"):
        data.read_unibench_labels(str(tmp_path / "bad.npz"), ("a", "b"))
    np.savez(tmp_path / "two.npz", test1_corpus=np.array({}, dtype=object), test2_corpus=np.array({}, dtype=object))
    with pytest.raises(data.DataError, match="cannot tell the test corpus"):
        data.read_unibench_labels(str(tmp_path / "two.npz"), None)
    found = data.find_unibench(str(unibench))
    assert sorted(found) == ["cmumosi", "meld", "mer2023", "ovmerdplus"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt") / "ckpt"
    M.save_model(M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu"), str(path))
    return path


def run_eval(*args, nproc=1):
    return run_script("eval.py", *args, nproc=nproc)


def test_merunibench_table(unibench, tiny_ckpt, tmp_path):
    out = tmp_path / "ub"
    r = run_eval("--ckpt", tiny_ckpt, "--benchmark", "merunibench", "--root", unibench, "--out", out,
                 "--max_new_tokens", 12, "--feature_cache", tmp_path / "f")
    m = json.loads((out / "metrics.json").read_text())["unibench"]
    assert {k: (v["task"], v["n_scored"], v["n_asked"]) for k, v in m["datasets"].items()} == {
        "ovmerdplus": ("ovmer", 3, 3), "mer2023": ("hit", 3, 4), "meld": ("hit", 2, 2), "cmumosi": ("sentiment", 2, 3)}
    assert m["datasets"]["mer2023"]["left_out"] == {"m2": "its ground truth neutral maps to no wheel"}
    assert m["datasets"]["cmumosi"]["left_out"] == {"s3": "its valence is 0 or missing (scored: > 0 vs < 0)"}
    assert "| mer2023 | hit |" in r.stdout and "Left out of every score of mer2023: 1 of 4 clips:" in r.stdout
    assert set(m["missing"]) == {"mer2024", "iemocapfour", "cmumosei", "sims", "simsv2"}
    scores = [v["score"] for v in m["datasets"].values() if v["score"] is not None]
    assert m["mean"] == pytest.approx(sum(scores) / len(scores))
    assert "| **mean** |" in r.stdout and "missing datasets: mer2024" in r.stdout


def test_merunibench_scores_by_hand(unibench, lex, monkeypatch):
    """Each dataset is scored with its own metric against its own labels (model outputs fixed by hand)."""
    answers = {"o1": "happy, excited", "o2": "sad", "o3": None,                       # EW: P = R = 2/3 -> 2/3
               "m1": "happy", "m2": "happy", "m3": "happy", "m4": "angry, sad",       # neutral m2 skipped: 2/3
               "e1": "cheerful", "e2": "angry",                                       # joy hit, sadness miss: 1/2
               "s1": "happy", "s2": "happy", "s3": "sad"}   # s3 (valence 0) removed; s2 wrong: F1w 1/3, acc 1/2
    texts = {n: f"<think>x</think><answer>{a}</answer>" if a else "no answer" for n, a in answers.items()}
    monkeypatch.setattr(common, "clip_features", lambda model, folder, clips, d, *a: ({c.name: {} for c in clips}, {}))
    monkeypatch.setattr(ev, "generate_all", lambda model, clips, feats, args, d, think, **kw: {
        c.name: [texts[c.name]] for c in clips})
    m = ev.evaluate_unibench(None, ev.Args(root=str(unibench)), common.Dist(), True, lex)
    scores = {k: v["score"] for k, v in m["datasets"].items()}
    assert scores == pytest.approx({"ovmerdplus": 2 / 3, "mer2023": 2 / 3, "meld": 1 / 2, "cmumosi": 1 / 3})
    assert m["datasets"]["cmumosi"]["accuracy"] == pytest.approx(1 / 2) and m["datasets"]["cmumosi"]["n_scored"] == 2
    assert m["mean"] == pytest.approx(13 / 24)


def test_eval_on_one_and_two_ranks_agree(synth_data, tiny_ckpt, tmp_path):
    args = ["--ckpt", tiny_ckpt, "--data", synth_data, "--split", "test", "--max_new_tokens", 12,
            "--feature_cache", tmp_path / "f", "--sample", 2, "--ablate", "subtitle"]
    run_eval(*args, "--out", tmp_path / "one")
    run_eval(*args, "--out", tmp_path / "two", nproc=2)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("greedy", "without_subtitle"):
        assert one[key] == two[key]
    assert one["greedy"]["n_clips"] == 16 and one["sampled"]["n_draws"] == 2
    with open(tmp_path / "one" / "per_clip.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["name", "decoding", "sample", "completion", "labels", "ground_truth", "ew_score",
                             "format"]
    assert [r["decoding"] for r in rows].count("greedy") == 16 and len(rows) == 16 * (1 + 2)
    assert "| greedy | 1 |" in (tmp_path / "one" / "summary.md").read_text()


def test_eval_lists_skipped_clips_and_its_reports(synth_data, tiny_ckpt, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(synth_data, root)
    test = [c.name for c in data.read_split(str(root), "test")]
    (root / "audio" / f"{test[1]}.wav").unlink()
    (root / "video" / f"{test[3]}.mp4").unlink()
    (root / "video" / f"{test[4]}.mp4").write_bytes(b"not a video")
    args = ["--ckpt", str(tiny_ckpt), "--data", str(root), "--max_new_tokens", "4", "--feature_cache",
            str(tmp_path / "f")]
    # missing files are found before any decoding, all of them in one message
    with pytest.raises(SystemExit, match=rf"2 of 16 clips have bad media:\n  clip {test[1]}: missing .*"
                                         rf"\n  clip {test[3]}: missing .*\n\(use --skip_bad_clips"):
        ev.main(args + ["--out", str(tmp_path / "no")])
    assert not (tmp_path / "no" / "metrics.json").exists()
    ev.main(args + ["--out", str(tmp_path / "ev"), "--skip_bad_clips"])
    out, err = capsys.readouterr()
    assert "greedy" in err  # the progress bar
    for name in (test[1], test[3], test[4]):
        assert f"- {name}: bad media: " in out
        assert f"- {name}: bad media: " in (tmp_path / "ev" / "summary.md").read_text()
    assert "scored 13 of 16 clips (3 left out, listed below)" in out
    assert "Left out of every score: 3 of 16 clips:" in out
    assert f"reports in {tmp_path / 'ev'}/: metrics.json, summary.md, per_clip.csv" in out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert sorted(m["left_out"]) == sorted([test[1], test[3], test[4]]) and m["greedy"]["n_clips"] == 13
    assert (m["n_asked"], m["n_scored"]) == (16, 13)


def test_eval_counts_what_it_scores(lex, monkeypatch):
    """A clip whose ground truth maps to no wheel is left out of every number, named with its reason, and the
    report says how many clips were scored of how many asked; the EW values are the official metric's."""
    gts = {"a": "['happy']", "b": "['sad', 'angry']", "c": "['happy']", "x": "['neutral']"}
    texts = {"a": "happy", "b": "sad", "c": "sad", "x": "neutral"}
    texts = {n: [f"<think>t</think><answer>{a}</answer>"] for n, a in texts.items()}
    generated = []
    monkeypatch.setattr(common, "clip_features", lambda model, root, clips, d, *a: ({c.name: {} for c in clips}, {}))
    monkeypatch.setattr(ev, "generate_all", lambda model, clips, feats, args, d, think, *a, **kw: generated.extend(
        c.name for c in clips) or {c.name: texts[c.name] for c in clips})
    clips = [data.Clip(n, g) for n, g in gts.items()]
    m, rows = ev.evaluate_openset(None, "DIR", clips, ev.Args(), common.Dist(), True, lex, [])
    assert (m["n_asked"], m["n_scored"], m["greedy"]["n_clips"]) == (4, 3, 3)
    assert m["left_out"] == {"x": "its ground truth ['neutral'] maps to no wheel"}
    assert generated == ["a", "b", "c"] and [r["name"] for r in rows] == ["a", "b", "c"]
    answers = {n: reward.extract_answer(t[0]) for n, t in texts.items()}
    official = reward.ew_metric(answers, gts, lex)  # the metric itself skips x in every wheel: the same value
    assert m["greedy"]["ew_f_l1"] == official["fscore"] == reward.ew_metric(
        answers, {n: g for n, g in gts.items() if n != "x"}, lex)["fscore"]
    assert m["greedy"]["format_rate"] == 1.0 and m["greedy"]["n_labels"] == 1.0  # over the 3 scored clips
    text = ev.summary_markdown({"ckpt": "CKPT", "split": "test", "data": "DIR", "think": True, **m,
                                "temperature": 1.0, "top_p": 0.9})
    assert "scored 3 of 4 clips (1 left out, listed below)" in text
    assert "Left out of every score: 1 of 4 clips:\n- x: its ground truth ['neutral'] maps to no wheel" in text


def test_eval_checks_its_inputs_before_the_work(tiny_ckpt, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(ev.model_lib, "load_model", no_model)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"cannot write .*file/eval: Not a directory"):  # root ignores modes
        ev.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "file" / "eval")])
    with pytest.raises(SystemExit, match=r"lexicon: .*nowhere' is neither 'builtin' nor a folder"):
        ev.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "a"), "--lexicon", str(tmp_path / "nowhere")])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text(json.dumps({"ckpt_path": "/elsewhere/final"}))
    with pytest.raises(SystemExit, match=r"--out .*b holds the evaluation of /elsewhere/final; .*--overwrite"):
        ev.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "b")])
    ev.check_out(str(tmp_path / "b"), str(tiny_ckpt), overwrite=True)  # allowed with --overwrite
    (tmp_path / "b" / "metrics.json").write_text(json.dumps({"ckpt_path": str(tiny_ckpt)}))
    ev.check_out(str(tmp_path / "b"), str(tiny_ckpt), overwrite=False)  # the same checkpoint again: fine
    with pytest.raises(SystemExit, match=r"data/test.csv: no such file"):
        ev.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "c"), "--data", str(tmp_path / "data")])
    (tmp_path / "ub" / "meld-dataset").mkdir(parents=True)
    (tmp_path / "ub" / "meld-dataset" / "label.npz").write_text("not an archive")
    with pytest.raises(SystemExit, match=r"meld-dataset/label.npz: not a .npz file"):
        ev.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "d"), "--benchmark", "merunibench", "--root",
                 str(tmp_path / "ub")])


def test_default_out_is_per_checkpoint_and_split():
    a = ev.default_out("out/grpo/final", ev.Args(split="test"))
    assert a == os.path.join("out", "eval", "grpo_final_test")
    assert ev.default_out("out/grpo/step_000120", ev.Args(split="test")) != a
    assert ev.default_out("out/sft/final", ev.Args(split="test")) != a
    assert ev.default_out("out/grpo/final", ev.Args(split="val")) != a


def test_eval_errors(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="--ablate 'face'"):
        ev.main(["--ckpt", str(tiny_ckpt), "--ablate", "face"])
    with pytest.raises(SystemExit, match="no checkpoint there"):
        ev.main(["--ckpt", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --root"):
        ev.main(["--ckpt", str(tiny_ckpt), "--benchmark", "merunibench"])


def fake_run(folder, stage, scale, steps=5):
    """A metrics.jsonl as sft.py (train/loss = NLL) or grpo.py (train/loss = surrogate, rewards) writes it."""
    folder.mkdir()
    lines = []
    for s in range(steps):
        if stage == "sft":
            lines += [{"step": s, "train/loss": scale * (3 - s / 2), "train/lr": 1e-3},
                      {"step": s, "eval/loss": scale * 3, "eval/ew_f": 0.1 * s, "examples": [["a", "b", "c"]]}]
        else:
            lines.append({"step": s, "reward/total": scale + s / 10, "train/kl": s / 100, "train/loss": -0.01 * s,
                          "eval/ew_f": 0.5})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return folder


def test_plot_keeps_stages_apart(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    kinds = {"sft_a": "sft", "sft_b": "sft", "grpo_a": "grpo", "grpo_b": "grpo"}
    runs = [(name, stage, common.read_metrics(str(fake_run(tmp_path / name, stage, i + 1) / "metrics.jsonl"))[0])
            for i, (name, stage) in enumerate(kinds.items())]
    assert [ev.run_stage(ms) for _, _, ms in runs] == list(kinds.values())
    fig = ev.plot_runs(runs, plt)
    colours, loss_titles = {}, set()
    for sub in fig.subfigs:
        legend = sub.legends[0]  # every block names its runs with their colours
        named = {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)}
        stage = kinds[next(iter(named))]
        assert {kinds[n] for n in named} == {stage} and len(named) == 2
        for ax in sub.axes:
            lines = ax.get_lines()
            if not lines:
                continue
            assert ax.get_xlabel() == {"sft": "SFT step", "grpo": "GRPO step"}[stage]
            for line in lines:  # one stage per panel, one colour per run everywhere, as in the legend
                assert kinds[line.get_label()] == stage
                assert colours.setdefault(line.get_label(), line.get_color()) == line.get_color()
                assert named[line.get_label()] == line.get_color()
            if ax.get_title().endswith(("(NLL per target token)", "(surrogate + KL term)")):
                loss_titles.add(ax.get_title())
    assert len(colours) == 4 and len(set(map(str, colours.values()))) == 4
    assert len(loss_titles) == 2  # SFT's NLL and GRPO's surrogate loss: two panels, two titles
    plt.close(fig)


def test_plot_cli(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = fake_run(tmp_path / "a", "sft", 1), fake_run(tmp_path / "b", "grpo", 1)
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward/to')  # a run killed while writing its log
    cmd = [sys.executable, str(ROOT / "eval.py"), "plot", "--run", str(a), str(b), "--out",
           str(tmp_path / "plots")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "b/metrics.jsonl: left out 1 incomplete line(s): 6" in r.stderr
    png = (tmp_path / "plots" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    r = subprocess.run(cmd + ["--label", "only one"], capture_output=True, text=True)
    assert r.returncode != 0 and "1 --label names for 2 --run folders" in r.stderr


def test_reproduce_quick(tmp_path):
    pytest.importorskip("matplotlib")
    r = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "--quick", "--out", str(tmp_path / "repro")],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = (tmp_path / "repro" / "results.md").read_text()
    for text in (r.stdout, results):  # toy numbers must not be taken for findings
        assert "test the plumbing, not the findings" in text
    sections = re.findall(r"^## \((\w)\)", results, re.M)
    assert sections == ["a", "b", "c", "d"]  # one section per finding, in order
    for title in ("### `test`", "### `test_shift`", "### Paired differences", "### Modality ablation"):
        assert title in results
    compare = results.split("## (b)")[0]
    for model in ("SFT", "SFT + GRPO", "SFT + RFT (same information)",
                  "SFT + oracle (consensus labels and descriptions)"):  # a row in the test and test_shift tables
        assert len(re.findall(rf"\| {re.escape(model)} \| \d+\.\d ± - \|", compare)) == 2, model  # one seed
    assert re.search(r"\| GRPO - RFT \| [-+]\d+\.\d \([-+]\d+\.\d ± -\)", results)
    for row in ("SFT, no think", "SFT + GRPO, no think"):  # (b)
        assert re.search(rf"\| {re.escape(row)} \| \d+\.\d ± - \| \d+\.\d ± - \|", results), row
    assert re.search(r"\| GRPO: think - no think \| [-+]\d+\.\d", results)
    variants = re.findall(r"^\| (accuracy only|accuracy \+ format|recall \+ format)[^|]* \| \d+\.\d ± - \|.*"
                          r"\| \d\.\d\d -> \d\.\d\d ± 0\.00 \|$", results, re.M)
    assert len(variants) == 6  # (c): every reward variant, with its label count over training
    assert re.search(r"^\| SFT \+ GRPO \| .*\| \d+\.\d ± - \|$", results.split("## (d)")[1], re.M)  # (d) mean
    assert "| ovmerdplus (EW-F) | mer2023 (HIT) | iemocapfour (HIT) | cmumosi (weighted F1) | sims (weighted F1) |" \
        in results
    times = (tmp_path / "repro" / "logs" / "times.txt").read_text().split("\n")  # a line per step: name, seconds
    names = [line.split()[0] for line in times if line]
    assert set(names) >= {
        "synth", "sft_s0", "grpo_s0", "rft_sample_s0", "rft_s0", "oracle_s0", "eval_sft_s0", "ablate_grpo_s0",
        "sft_nothink_s0", "grpo_nothink_s0", "eval_sft_nothink_s0", "grpo_acc_s0", "grpo_recall_p2_s0",
        "eval_grpo_align_s0", "unibench_sft_s0", "unibench_oracle_s0"}
    # the (a) SFT and GRPO runs and their evaluation serve (b), (c) and (d): each runs once
    assert names.count("sft_s0") == names.count("grpo_s0") == names.count("eval_grpo_s0") == 1
    assert re.search(r"CPU time \(user \+ system, all processes\): \d+ min \d+ s", results)
    assert "CPU time (user + system, all processes): 0 min 0 s" not in results
    # RFT trained on the best-of-N rows that eval.py wrote (the quick run keeps every clip: --min_reward -1)
    with open(tmp_path / "repro" / "rft_s0.csv") as f:
        best = list(csv.DictReader(f))
    assert len(best) == 16 and set(best[0]) == {"name", "openset", "reason", "reward"}
    assert "16 train" in (tmp_path / "repro" / "logs" / "rft_s0.log").read_text()
    for plot in ("compare.png", "reasoning.png", "reward.png", "crosstask.png", "curves/curves.png"):
        assert (tmp_path / "repro" / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


@pytest.mark.parametrize("flags, message", [(["--only", "speed"], "--only speed: choose among compare (a)"),
                                            (["--only", ","], "--only names no finding"),
                                            (["--jobs", "0"], "--jobs 0: give a whole number")])
def test_reproduce_refuses_bad_flags(flags, message, tmp_path):
    r = subprocess.run(["bash", str(ROOT / "reproduce.sh"), *flags, "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "r").exists()


def test_best_of_n_keeps_the_highest_grpo_reward(lex):
    """Rewards by hand (accuracy = per-sample EW-F, + 0.5 x format): picks, ties and the threshold."""
    outputs = {"a": ["<think>x</think><answer>sad</answer>",           # 0 + 0.5
                     "<think>y</think><answer>happy, sad</answer>",    # F1 2/3 + 0.5
                     "<answer>happy</answer>",                         # 1 + 0 (no <think>)
                     "<think>z</think><answer>happy</answer>"],        # 1 + 0.5: the best
               "b": ["<think>p</think><answer>angry</answer>",         # 1.5, first of a tie
                     "<think>q</think><answer>mad</answer>"],          # 1.5 (same sector)
               "c": ["<think>r</think><answer>happy</answer>"]}        # 0.5: below the threshold
    clips = [data.Clip("a", "['joyful']"), data.Clip("b", "['angry']"), data.Clip("c", "['sad']")]
    rows = ev.best_completions(outputs, clips, lex, think=True, w_format=0.5, min_reward=1.0)
    assert [(r["name"], r["openset"], r["reason"], r["reward"]) for r in rows] == \
        [("a", "['happy']", "z", 1.5), ("b", "['angry']", "p", 1.5)]
    every = ev.best_completions(outputs, clips, lex, think=True, w_format=0.0, min_reward=-1)
    assert [r["reward"] for r in every] == [1.0, 1.0, 0.0] and every[0]["reason"] == ""  # first 1.0 wins
