"""synth.py: the synthetic OV-MER benchmark (reproducible, its splits, annotators and test_shift) and the
synthetic MER-UniBench (read by the official-layout readers, class words and valence from the hidden sectors,
no clip of it in training, scored by eval.py --benchmark merunibench), and the command line."""

import errno
import hashlib
import json

import numpy as np
import pytest

import data
import model as M
import reward
import synth
from conftest import run_script


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.synthesize(str(out), n_train=30, n_test=10, seed=3, progress=False)
    return out


def test_synthetic_set_decodes_and_maps(small):
    lex = reward.load_lexicon("builtin")
    meta = json.loads((small / "synth.json").read_text())
    train, test = data.read_split(str(small), "train", need_reasons=True), data.read_split(str(small), "test")
    assert len(train) == 30 and len(test) == 10
    ds = data.ClipDataset(str(small), train + test, 8, 32, 2, 1.0)
    with_video = next(i for i, c in enumerate(ds.clips) if meta["clips"][c.name]["video"])
    item = ds[with_video]
    assert item["frames"].shape == (8, 32, 32, 3) and item["audio"].shape == (2, 16000)
    assert item["frames"].float().std() > 20  # a coloured disc on grey, not a blank frame
    for clip in test:  # clean test labels name exactly the hidden sectors (wheel 1)
        sectors = {reward.map_label(w, lex, 1) for w in reward.parse_labels(clip.labels)}
        assert sectors == set(meta["clips"][clip.name]["sectors"]), clip.name
        assert all(reward.map_label(w, lex, k) for w in reward.parse_labels(clip.labels) for k in range(1, 6))
    assert all(c.reason and c.subtitle for c in train)


def test_synthetic_set_is_reproducible(small, tmp_path):
    again = tmp_path / "again"
    synth.synthesize(str(again), n_train=30, n_test=10, seed=3, progress=False)
    other = tmp_path / "other"
    synth.synthesize(str(other), n_train=30, n_test=10, seed=4, progress=False)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for rel in ("train.csv", "test.csv", "reasons.csv", "video/synth_00007.mp4", "audio/synth_00007.wav"):
        assert digest(small / rel) == digest(again / rel), rel
    assert digest(small / "train.csv") != digest(other / "train.csv")


# The CSVs that `synthesize` wrote before annotators and test_shift existed (commit 33a2a3a, seed 3, 30 train,
# 10 rl, 4 val, 10 test clips): rl_labels="clean" without test_shift must still write exactly these.
FIRST_RELEASE = {
    "train.csv": "516fc7c97277d649b2b328510981cba426f8675907ad396d0d4cabdca52cc54a",
    "rl.csv": "3fd8253035f693d4ef8b8424706005eb8e49e4f0b9599db6bbe28269dcffd214",
    "val.csv": "25b663257b394fc9693f9034a1fea68ae0cfa0129262dbe6e304e794aedb50ce",
    "test.csv": "3445a442584a8c885c2fcda5c54d0371f6f83191c5a87ca1bcf8f532603415bb",
    "reasons.csv": "63bdf9dbdd585bd80cb89ffcb79ace54d5c296293d87bd8e2c05859216c67c64",
    "subtitles.csv": "00239b346cfe4bdd685a4a5957537b0177d12ab2f1d5b9c940545989c4e64d46",
}


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    """The same clips with clean rl labels (the first release's benchmark) and with annotators + test_shift."""
    clean, new = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("annotated")
    sizes = dict(n_train=30, n_test=10, seed=3, progress=False, n_rl=10, n_val=4)
    synth.synthesize(str(clean), rl_labels="clean", **sizes)
    synth.synthesize(str(new), n_test_shift=12, **sizes)
    return clean, new


def test_clean_rl_option_writes_the_first_release(benchmarks):
    clean, _ = benchmarks
    for name, want in FIRST_RELEASE.items():
        assert hashlib.sha256((clean / name).read_bytes()).hexdigest() == want, name
    assert not (clean / "rl_oracle.csv").exists() and not (clean / "test_shift.csv").exists()


def test_annotated_rl_split_has_no_descriptions_and_keeps_the_consensus_for_the_oracle(tmp_path):
    sizes = dict(n_train=4, n_test=2, seed=5, progress=False, n_rl=12)
    synth.synthesize(str(tmp_path / "clean"), rl_labels="clean", **sizes)
    synth.synthesize(str(tmp_path / "ann"), **sizes)
    clean_rl = data.read_split(str(tmp_path / "clean"), "rl", need_reasons=True)
    ann_rl = data.read_split(str(tmp_path / "ann"), "rl")
    oracle = data.read_split(str(tmp_path / "ann"), "rl", labels_csv=str(tmp_path / "ann" / "rl_oracle.csv"),
                             need_reasons=True)
    assert all(c.reason is None for c in ann_rl)  # no descriptions for GRPO's split
    with pytest.raises(data.DataError, match="think mode needs a reason"):
        data.read_split(str(tmp_path / "ann"), "rl", need_reasons=True)
    # the annotators get a stream of their own: same clips, and the oracle holds the clean split exactly
    assert [(c.name, c.labels, c.reason, c.subtitle) for c in oracle] == \
        [(c.name, c.labels, c.reason, c.subtitle) for c in clean_rl]
    assert [c.labels for c in ann_rl] != [c.labels for c in clean_rl]
    for rel in ("train.csv", "test.csv", "video/synth_00007.mp4", "audio/synth_00009.wav"):
        assert (tmp_path / "clean" / rel).read_bytes() == (tmp_path / "ann" / rel).read_bytes(), rel


@pytest.mark.parametrize("omit, synonym, spurious", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 1.0)])
def test_annotators_follow_their_rates(omit, synonym, spurious):
    lex = reward.load_lexicon("builtin")
    pools = synth.synth_sectors(lex)
    ann = synth.Annotators(n=3, omit=omit, synonym=synonym, spurious=spurious)
    profiles = synth.annotator_profiles(ann, pools, seed=0)
    # annotators differ in vocabulary (half of each pool) and in completeness (0.5x .. 1.5x the mean rate)
    assert profiles[0][0] != profiles[1][0] and all(len(v["sad"]) == len(pools["sad"]) // 2 for v, _ in profiles)
    assert [r for _, r in profiles] == pytest.approx([min(1, omit * k) for k in (0.5, 1.0, 1.5)])
    rng = np.random.default_rng(0)
    outside = 0
    for i in range(300):
        carried = ["joyful", "sad", "scared"][: 1 + i % 3]
        vocab, _ = profiles[i % 3]
        labels = synth.annotate(rng, pools, carried, profiles[i % 3], ann)
        sectors = {reward.map_label(w, lex, 1) for w in labels}
        if omit == 0 and spurious == 0:  # complete and faithful: exactly the carried sectors
            assert sectors == set(carried)
        if omit == 1:  # annotators at rate 1 leave out all but one emotion (never all); the one at 0.5 fewer
            assert sectors <= set(carried) and (len(sectors) == 1 if i % 3 else len(sectors) >= 1)
        if spurious == 1:  # always one emotion the clip does not carry
            assert len(sectors - set(carried)) == 1
        if synonym == 0:  # their own words only
            assert all(w in vocab[s] for w in labels for s in carried if w in pools[s])
        outside += sum(not any(w in vocab[s] for s in carried) for w in labels if sectors)
    assert (outside > 100) == (synonym == 1)


def test_test_shift_holds_out_pairs_lone_modalities_and_words(benchmarks):
    _, new = benchmarks
    meta = json.loads((new / "synth.json").read_text())
    sectors = list(meta["sectors"])
    pairs = [set(p) for p in meta["shift"]["pairs"]]
    solo = {sectors.index(s): ("video", "audio").index(m) for s, m in meta["shift"]["solo"].items()}
    held = {w for ws in meta["shift"]["held_out_words"].values() for w in ws}
    shifted = data.read_split(str(new), "test_shift")
    assert len(shifted) == 12
    for split in ("train", "rl", "val", "test"):
        for clip in data.read_split(str(new), split):
            c = meta["clips"][clip.name]
            assert not any(p <= set(c["sectors"]) for p in pairs), clip.name
            for s in (sectors.index(x) for x in c["sectors"]):  # never shown alone in its held-out modality
                shown = [s in c["video"], s in c["audio"], s in c["text"]]
                assert not (sum(shown) == 1 and shown[solo[s]]), clip.name
            assert not held & set(reward.parse_labels(clip.labels)), clip.name
            assert not any(w in clip.subtitle for w in held), clip.name
    lex = reward.load_lexicon("builtin")
    for clip in shifted:
        c = meta["clips"][clip.name]
        pair = next(p for p in pairs if p <= set(c["sectors"]))
        for s in pair:  # the pair's sectors shown alone, each in its held-out modality
            i = sectors.index(s)
            assert [i in c["video"], i in c["audio"], i in c["text"]] == [solo[i] == 0, solo[i] == 1, False]
        labels = reward.parse_labels(clip.labels)
        assert set(labels) <= held and {reward.map_label(w, lex, 1) for w in labels} == set(c["sectors"])




# ---- the synthetic MER-UniBench ------------------------------------------------------------------------------

UNIBENCH_SIZES = dict(n_train=12, n_rl=8, n_val=4, n_test=10, n_test_shift=6, seed=2, progress=False,
                      n_unibench=16)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small benchmark with its MER-UniBench: (root, synth.json)."""
    root = tmp_path_factory.mktemp("unibench")
    synth.synthesize(str(root), **UNIBENCH_SIZES)
    return root, json.loads((root / "synth.json").read_text())


@pytest.fixture(scope="module")
def lex():
    return reward.load_lexicon("builtin")


def sector_words(sectors, meta) -> str:
    """The answer of an oracle: one training word of each hidden sector."""
    return ", ".join(meta["shift"]["training_words"][s][0] for s in sectors)


def test_readers_read_every_set(bench):
    root, meta = bench
    unibench = root / "unibench"
    assert sorted(data.find_unibench(str(unibench))) == sorted([*synth.UNIBENCH_SETS, "ovmerdplus"])
    sets = data.read_unibench(str(unibench))
    for name, (task, folder, clips, corpus) in sets.items():
        assert task == data.UNIBENCH[name][0] and all(c.subtitle for c in clips), name
        assert data.ClipDataset(folder, clips, 8, 32, 2, 1.0).skipped == {}  # every clip has its media
        if name == "ovmerdplus":  # the test split: its clips, consensus labels and very media files
            test = data.read_split(str(root), "test")
            assert [(c.name, c.labels, c.subtitle) for c in clips] == [(c.name, c.labels, c.subtitle) for c in test]
            for c in test:
                assert (root / "video" / f"{c.name}.mp4").read_bytes() == \
                    (unibench / "ovmerdplus-process" / "video" / f"{c.name}.mp4").read_bytes()
            continue
        assert len(clips) == UNIBENCH_SIZES["n_unibench"] == len(corpus), name
        classes = data.UNIBENCH[name][3]
        for c in clips:  # a class of the set's list (mer2023 as words, iemocapfour as indices) or a valence
            emo, val = corpus[c.name]
            assert (emo in classes) if task == "hit" else (emo is None and c.labels == ""), (name, emo)
            assert val is not None and c.labels == (emo or "")
    raw = np.load(unibench / "iemocap-dataset" / "label_4way.npz", allow_pickle=True)["test_corpus"].item()
    assert all(isinstance(v["emo"], int) for v in raw.values())  # iemocapfour writes class indices


def test_unibench_is_reproducible(bench, tmp_path):
    root, _ = bench
    synth.synthesize(str(tmp_path / "again"), **UNIBENCH_SIZES)
    synth.synthesize(str(tmp_path / "other"), **{**UNIBENCH_SIZES, "seed": 3})
    files = sorted(p.relative_to(root) for p in (root / "unibench").rglob("*") if p.is_file())
    assert len(files) == 5 * 2 + 4 * 2 * 16 + 2 * 10  # label and subtitle files, 16 clips x 4 sets, 10 test clips
    for rel in files:  # byte for byte, the .npz label files included
        assert (root / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    label = "unibench/mer2023-dataset-process/label-6way.npz"
    assert (root / label).read_bytes() != (tmp_path / "other" / label).read_bytes()


def test_class_words_name_their_sector_in_every_wheel(bench, lex):
    root, meta = bench
    pools = meta["shift"]["training_words"]
    unibench = data.read_unibench(str(root / "unibench"))
    for name, info in meta["unibench"].items():
        if info["task"] != "hit":
            continue
        named = info["classes"]
        assert named["neutral"] is None and named.get("surprise", None) is None
        for word, sector in named.items():  # where a class word maps, it maps as its sector's words do
            if sector is not None:
                for got, want in zip(lex.lookup(word)[0], lex.lookup(pools[sector][0])[0]):
                    assert got is None or got == want, (word, sector)
        answers, gts = {}, {}
        for clip in unibench[name][2]:
            c = info["clips"][clip.name]
            assert c["class"] == clip.labels and c["sectors"] == ([named[clip.labels]] if named[clip.labels] else [])
            if not c["sectors"]:  # neutral: no cue in any modality
                assert c["video"] == c["audio"] == c["text"] == [] and c["misleading"] is None
                assert clip.subtitle in synth.NEUTRAL_SUBTITLES
            answers[clip.name], gts[clip.name] = sector_words(c["sectors"], meta), clip.labels
        # an answer naming the hidden sectors hits in every wheel; neutral clips are skipped
        rate, per_wheel = reward.hit_rate(answers, gts, lex, per_wheel=True)
        assert rate == 1.0 and per_wheel[0][1] == sum(g != "neutral" for g in gts.values()) > 0
        assert {c["class"] for c in info["clips"].values()} == {w for w, s in named.items() if s or w == "neutral"}
    with pytest.raises(ValueError, match="class 'calm' names sector 'peaceful' in wheel 1 but maps elsewhere in "
                                         "wheel 3"):
        synth.class_sectors(["calm"], pools, lex)  # calm: joy in wheel 3, the peaceful words: trust


def test_valence_follows_the_sectors_and_zero_is_removed(bench, lex):
    assert synth.valence(["joyful", "sad", "peaceful"], lex, 3.0) == 1.0  # (2 - 1) / 3 x 3
    assert synth.valence(["mad", "scared"], lex, 1.0) == -1.0 and synth.valence([], lex, 3.0) == 0.0
    root, meta = bench
    sign = {"joyful": 1, "peaceful": 1, "powerful": 1, "mad": -1, "sad": -1, "scared": -1}
    zero_kinds = set()
    for name, scale in (("cmumosi", 3.0), ("sims", 1.0)):
        info, corpus = meta["unibench"][name], data.read_unibench(str(root / "unibench"))[name][3]
        balance = {n: sum(sign[s] for s in c["sectors"]) for n, c in info["clips"].items()}
        for n, (_, val) in corpus.items():
            assert np.sign(val) == np.sign(balance[n]) and abs(val) <= scale, (n, val)
            if balance[n]:
                assert val == pytest.approx(scale * balance[n] / len(info["clips"][n]["sectors"]), abs=1e-4)
        assert max(abs(v) for _, v in corpus.values()) == scale
        zeros = [n for n, (_, v) in corpus.items() if v == 0]
        zero_kinds |= {"balanced" if info["clips"][n]["sectors"] else "neutral" for n in zeros}
        # the oracle's answers get every scored clip right; the metric leaves out valence 0
        answers = {n: reward.parse_labels(sector_words(c["sectors"], meta)) for n, c in info["clips"].items()}
        polarity = {n: reward.answer_polarity(a, lex) for n, a in answers.items()}
        scores = reward.sentiment_scores(polarity, {n: v for n, (_, v) in corpus.items()})
        assert scores["n"] == len(corpus) - len(zeros) and scores["weighted_f1"] == scores["accuracy"] == 1.0
    assert zero_kinds == {"balanced", "neutral"}  # valence 0: neutral clips, and as many positive as negative


def test_training_splits_never_hold_a_unibench_clip(bench):
    root, meta = bench
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    training = [c.name for split in ("train", "rl", "val") for c in data.read_split(str(root), split)]
    seen = {digest(root / kind / f"{n}.{ext}") for n in training for kind, ext in (("video", "mp4"), ("audio", "wav"))}
    for name, info in meta["unibench"].items():
        clips = info["clips"] if name == "ovmerdplus" else list(info["clips"])
        assert not set(clips) & set(training), name
        if name == "ovmerdplus":
            assert clips == [c.name for c in data.read_split(str(root), "test")]
            continue
        for n in clips:  # no media file of a training clip either
            for kind, ext in (("video", "mp4"), ("audio", "wav")):
                assert digest(root / info["folder"] / kind / f"{n}.{ext}") not in seen, n


def test_eval_prints_a_merunibench_mean(bench, tmp_path):
    root, _ = bench
    ckpt = tmp_path / "ckpt"
    M.save_model(M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu"), str(ckpt))
    r = run_script("eval.py", "--ckpt", ckpt, "--benchmark", "merunibench", "--root", root / "unibench", "--out",
                   tmp_path / "ub", "--max_new_tokens", 8, "--feature_cache", tmp_path / "f")
    m = json.loads((tmp_path / "ub" / "metrics.json").read_text())["unibench"]
    assert {k: v["task"] for k, v in m["datasets"].items()} == {
        "ovmerdplus": "ovmer", "mer2023": "hit", "iemocapfour": "hit", "cmumosi": "sentiment", "sims": "sentiment"}
    assert set(m["missing"]) == {"mer2024", "meld", "cmumosei", "simsv2"}
    scores = [v["score"] for v in m["datasets"].values() if v["score"] is not None]
    assert len(scores) >= 3 and m["mean"] == pytest.approx(sum(scores) / len(scores))
    assert f"| **mean** | | {100 * m['mean']:.2f} |" in r.stdout


# ---- the command line --------------------------------------------------------------------------------------

def cli_args(out, **kw):
    sizes = dict(n_train=2, n_rl=0, n_val=0, n_test=1, n_test_shift=0, unibench=0)
    return synth.Args(out=str(out), **{**sizes, **kw})


def test_cli_refuses_to_replace_other_files_and_leaves_no_partial_benchmark(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    synth.main(cli_args(out))
    first = (out / "train.csv").read_bytes()
    with pytest.raises(SystemExit, match="holds a benchmark already: pass --overwrite"):
        synth.main(cli_args(out, seed=1))
    synth.main(cli_args(out, seed=1, overwrite=True))
    assert (out / "train.csv").read_bytes() != first and not (tmp_path / "bench.partial").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="holds files but no synthetic benchmark"):
        synth.main(cli_args(tmp_path / "mine", overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    def interrupted(*args, **kwargs):  # Ctrl-C halfway: the earlier benchmark stays, nothing half-written
        (tmp_path / "bench.partial" / "train.csv").write_text("name,openset\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "synthesize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.main(cli_args(out, seed=2, overwrite=True))
    assert not (tmp_path / "bench.partial").exists() and (out / "train.csv").read_bytes() != first
    assert (out / "synth.json").is_file()

    def disk_full(*args, **kwargs):  # the media writer's OSError on a full disk: one message, nothing half-written
        (tmp_path / "bench.partial" / "train.csv").write_text("name,openset\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synth, "synthesize", disk_full)
    with pytest.raises(SystemExit, match=f"error: cannot write {out}: the disk is full"):
        synth.main(cli_args(out, seed=2, overwrite=True))
    assert not (tmp_path / "bench.partial").exists() and (out / "synth.json").is_file()


@pytest.mark.parametrize("flags, message", [(["--n-train", "-1"], "--n_train -1: must be at least 0"),
                                            (["--n_train", "0", "--n_rl", "0", "--n_val", "0", "--n_test", "0",
                                              "--n_test_shift", "0"], "no split to write"),
                                            (["--annotators", "0"], "--annotators 0: must be at least 1"),
                                            (["--omit-rate", "2"], "rates must lie in"),
                                            (["--rl_labels", "noisy"], "--rl_labels 'noisy': choose")])
def test_cli_refuses_bad_flags(flags, message, tmp_path):
    import common
    with pytest.raises(SystemExit, match=message):
        synth.main(common.parse_args(synth.Args, ["--out", str(tmp_path / "o"), *flags]))
    assert not (tmp_path / "o").exists()
