"""Shared test set-up: offline Hugging Face, the repository on sys.path, and access to ../shared."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared next to the repository root (official wheel files, parity cases, real model outputs)."""
    path = ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"needs the shared folder next to the repository ({path} is absent)")
    return path


@pytest.fixture(scope="session")
def official_lexicon(shared):
    import reward
    folder = shared / "emotion_wheel"
    if not folder.is_dir():
        pytest.skip(f"needs the official wheel files in {folder}")
    return reward.load_lexicon(str(folder))


@pytest.fixture(scope="session")
def parity_cases(shared) -> dict:
    path = shared / "ew_parity" / "cases.json"
    if not path.is_file():
        pytest.skip(f"needs the parity cases {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic OV-MER benchmark (48 train, 8 val, 16 test clips), made once per test session."""
    import synth
    out = tmp_path_factory.mktemp("synth_small")
    synth.synthesize(str(out), n_train=48, n_test=16, seed=0, progress=False, n_val=8)
    return out


@pytest.fixture(scope="session")
def sft_ckpt(synth_data, tmp_path_factory) -> Path:
    """A tiny SFT run of 60 steps on synth_data (a policy that writes some of the format), made once."""
    out = tmp_path_factory.mktemp("sft_ckpt")
    run_script("sft.py", "--data", synth_data, "--out", out, "--max_steps", 60, "--eval_every", 0,
               "--eval_samples", 4, "--save_every", 0, "--feature_cache", out / "features")
    return out


def run_script(script: str, *args, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the stage scripts as users do (torchrun when nproc > 1); fail the test with its output."""
    cmd = [sys.executable, str(ROOT / script)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / script)]
    r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict:
    """Small random models saved with save_pretrained, as downloaded weights would be: a Qwen2ForCausalLM with a
    byte-level BPE tokenizer (ChatML template, stop tokens <|im_end|> and <|endoftext|> in its generation
    config, as Qwen2.5-Instruct), a CLIPVisionModel (no projection), a CLIPVisionModelWithProjection, a
    SiglipVisionModel, a HubertModel and a WhisperModel. Returns kind -> folder."""
    import torch
    import transformers as tf
    import data
    import model as M
    root = tmp_path_factory.mktemp("hf")
    out = {}

    def save(kind, module):
        module.save_pretrained(root / kind)
        out[kind] = root / kind

    tok = M.build_tokenizer(data.tokenizer_corpus(), 400, seed=1)
    ids = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    torch.manual_seed(1)
    # as Qwen2.5, more embedding rows than tokens (room for our 3 placeholders): the folder's shape is kept
    llm = tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=len(tok) + 45, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=ids[0],
        bos_token_id=ids[1]))
    llm.generation_config = tf.GenerationConfig(eos_token_id=ids, pad_token_id=ids[1], bos_token_id=ids[1])
    save("qwen2", llm)
    tok.save_pretrained(root / "qwen2")
    vision = dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    save("clip", tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision, projection_dim=24)))
    save("clip_proj", tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**vision, projection_dim=24)))
    save("siglip", tf.SiglipVisionModel(tf.SiglipVisionConfig(**vision)))
    save("hubert", tf.HubertModel(tf.HubertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, conv_dim=[32] * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)))
    save("whisper", tf.WhisperModel(tf.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, vocab_size=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)))
    return out
