"""sft.py: the masked loss, a short run that learns, 1 vs 2 ranks, exact resume, clear errors."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import model as M
import reward
import sft
from conftest import ROOT, run_script

COMMON = ["--val_size", "8", "--log_every", "1", "--keep_last", "5"]


def run_sft(*args, nproc=1):
    return run_script("sft.py", *args, nproc=nproc)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_counts_only_target_tokens():
    tok = M.prepare_tokenizer(M.build_tokenizer(data.tokenizer_corpus(), 1024))
    model = M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu", tokenizer=copy.deepcopy(tok)).eval()
    clips = [data.Clip("a", "['happy', 'excited']", "I am thrilled.", "The voice is high."),
             data.Clip("b", "['sad']", "", "The face is blue.")]
    examples = [data.tokenize_example(model.tokenizer, c, True, model.cfg.n_tokens) for c in clips]
    batch = data.collate_train(examples, model.tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(0)
    media = {"video": torch.randn(2, 8, 32, generator=g), "audio": torch.randn(2, 2, 64, generator=g)}
    with torch.no_grad():
        total, count = sft.sft_loss_sum(model, batch, media)
        logits = model(batch["input_ids"], batch["attention_mask"], media)
    # by hand: for each example, the target span starts after its prompt; position t predicts token t + 1
    want, n = 0.0, 0
    for b, clip in enumerate(clips):
        prompt = len(model.tokenizer(data.build_prompt(model.tokenizer, clip.subtitle, n_tokens=model.cfg.n_tokens),
                                     add_special_tokens=False)["input_ids"])
        length = len(examples[b]["input_ids"])
        logp = torch.log_softmax(logits[b].double(), -1)
        for t in range(prompt - 1, length - 1):
            want -= logp[t, batch["input_ids"][b, t + 1]].item()
            n += 1
    assert count == n
    assert total.item() == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def short_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_short")
    run_sft("--data", synth_data, "--out", out, "--max_steps", 120, "--eval_every", 120, "--eval_samples", 8,
            "--feature_cache", out / "features", *COMMON)
    return out


def test_short_run_learns_the_format(short_run, synth_data):
    logged = metrics(short_run)
    evals = [m for m in logged if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 120]
    assert evals[-1]["eval/loss"] < 0.5 * evals[0]["eval/loss"]  # measured: ~5.9 -> ~1.0
    model = M.load_model(str(short_run / "final"), device="cpu").eval()
    test = data.read_split(str(synth_data), "test")
    ds = data.ClipDataset(str(synth_data), test, 8, model.image_size, 2, 1.0)
    feats = data.encode_clips(ds, model.encode_media, progress=False)
    texts = model.complete([c.subtitle for c in test], data.stack_media(feats, [c.name for c in test]),
                           greedy=True, max_new_tokens=96)
    ok = sum(reward.format_ok(t) for t in texts)
    assert ok >= 12, texts  # at least 75% of the 16 test clips (measured: 16/16)
    assert (short_run / "latest").read_text().strip() == "step_000120"


def test_the_tokenizer_is_fitted_to_the_training_text(short_run, synth_data):
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(str(short_run / "final" / "tokenizer")).get_vocab()
    texts = data.clip_texts(data.read_split(str(synth_data), "train"))
    fitted = M.prepare_tokenizer(M.build_tokenizer(data.tokenizer_corpus(texts), 1024)).get_vocab()
    fixed = M.prepare_tokenizer(M.build_tokenizer(data.tokenizer_corpus(), 1024)).get_vocab()
    assert saved == fitted != fixed


def test_without_a_benchmark_it_says_to_run_synth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/synth here
    with pytest.raises(SystemExit, match=r"no benchmark in out/synth; run `python synth.py` first"):
        sft.main(sft.common.parse_args(sft.Args, ["--out", str(tmp_path / "o")]))


def test_two_ranks_equal_one_rank(synth_data, tmp_path):
    args = ["--data", synth_data, "--max_steps", 3, "--batch_size", 8, "--eval_every", 0, "--eval_samples", 2,
            "--save_every", 0, *COMMON]
    run_sft(*args, "--micro_batch", 3, "--out", tmp_path / "one", "--feature_cache", tmp_path / "f1")
    run_sft(*args, "--micro_batch", 4, "--out", tmp_path / "two", "--feature_cache", tmp_path / "f2", nproc=2)
    one = load_file(tmp_path / "one" / "final" / "trainable.safetensors")
    two = load_file(tmp_path / "two" / "final" / "trainable.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    texts = data.clip_texts(data.read_split(str(synth_data), "train"))  # the run's tokenizer, hence its init
    start = M.trainable_state_dict(M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu",
                                                 tokenizer_texts=texts))
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    assert (one[key] - start[key]).abs().max() > 1e-4  # training moved the weights: the equality is not vacuous
    assert [m["train/loss"] for m in metrics(tmp_path / "one") if "train/loss" in m] == \
        pytest.approx([m["train/loss"] for m in metrics(tmp_path / "two") if "train/loss" in m], rel=1e-5)


def test_resume_equals_uninterrupted(synth_data, tmp_path):
    args = ["--data", synth_data, "--max_steps", 6, "--batch_size", 8, "--micro_batch", 8, "--eval_every", 0,
            "--eval_samples", 2, "--save_every", 0, "--feature_cache", tmp_path / "f", *COMMON]
    run_sft(*args, "--out", tmp_path / "straight")
    run_sft(*args, "--out", tmp_path / "split", "--stop_after", 2)
    assert (tmp_path / "split" / "latest").read_text().strip() == "step_000002"
    assert not (tmp_path / "split" / "final").exists()
    run_sft(*args, "--out", tmp_path / "split", "--resume", "--stop_after", 2)
    run_sft(*args, "--out", tmp_path / "split", "--resume")
    a = load_file(tmp_path / "straight" / "final" / "trainable.safetensors")
    b = load_file(tmp_path / "split" / "final" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda p: [m["train/loss"] for m in metrics(p) if "train/loss" in m]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


@pytest.mark.parametrize("flags, message", [
    (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such folder"),
    (["--preset", "huge"], "--preset 'huge': choose one of"),
    (["--train_llm", "half"], "--train_llm 'half': choose lora or full"),
    (["--batch_size", "1000"], "--batch_size 1000 must be a multiple of the 1 ranks and at most the 48"),
    (["--resume"], "has no checkpoint"),
    (["--init", "/nonexistent/ckpt"], "--init /nonexistent/ckpt: no such checkpoint"),
])
def test_bad_arguments_are_clear(synth_data, tmp_path, flags, message):
    argv = ["--data", str(synth_data), "--out", str(tmp_path / "o"), "--feature_cache", str(tmp_path / "f"),
            "--val_size", "8"]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        sft.main(sft.common.parse_args(sft.Args, argv + flags))


def test_a_folder_without_subtitles_trains_only_when_told(synth_data, tmp_path, capsys):
    """A lost subtitle file is refused before any work; --without_subtitles trains without text, and says so."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(synth_data, root)
    (root / "subtitles.csv").unlink()
    argv = ["--data", str(root), "--out", str(tmp_path / "o"), "--feature_cache", str(tmp_path / "f"), "--max_steps",
            "1", "--batch_size", "8", "--micro_batch", "8", "--eval_every", "0", "--eval_samples", "1", *COMMON]
    with pytest.raises(SystemExit, match=rf"error: {root}: no subtitle file \(looked for subtitles.csv"):
        data.exit_on_bad_input(sft.main, sft.common.parse_args(sft.Args, argv))
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()
    sft.main(sft.common.parse_args(sft.Args, argv + ["--without_subtitles"]))
    assert "think=True; without subtitles" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "args.json").read_text())["without_subtitles"] is True


def test_unknown_flag_is_an_error():
    r = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--bogus", "1"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and "unknown arguments: --bogus 1" in r.stderr
