"""The GPU check's CPU-testable parts: its JSON at toy size through the real shell script, the byte count."""

import json
import os
import subprocess
import sys


from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_writes_its_json_at_toy_size_on_a_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--presets", "tiny",
                        "--batch", "3", "--prompt_len", "8", "--new_tokens", "4", "--clips", "1", "--group", "2",
                        "--grpo_steps", "1", "--prefix_presets", "tiny", "--prefix_prompt_len", "72",
                        "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gpus"] == 0 and report["torchrun"] is None and not report["skipped"]
    tiny = report["presets"]["tiny"]
    dec = tiny["decode"]
    for sampler in ("eager", "static"):  # CPU: the static sampler stands in for the compiled one
        assert dec[sampler]["tokens_per_s"] > 0 and 0 < dec[sampler]["fraction_of_bandwidth_limit"] < 1
        assert dec[sampler]["positions"] >= 1
    assert dec["static"]["same_tokens_as_eager"] is True
    step = tiny["grpo_step"]
    assert set(step["time_split_seconds"]) == {"encode", "generate", "reward", "reference", "update", "total"}
    assert step["samples_per_s"] > 0 and step["peak_memory_GiB"] > 0 and step["clips"] * step["group"] == 2
    prefix = report["shared_prefix"]["tiny"]  # the shared-prefix step against the plain one
    assert prefix["same_draws"] and prefix["full_length"] and prefix["group"] == 2
    assert prefix["update"]["ratio"] > 0 and set(prefix["update_peak_memory_GiB"]) == {"plain", "shared"}


def test_decode_bytes_count_each_weight_once_and_the_kv_cache():
    import bench_generate
    import model as M
    model = M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu")
    c = model.llm.config
    assert c.tie_word_embeddings  # the embedding and the head are one matrix: read once per step
    weights = sum(p.numel() * 4 for p in model.llm.parameters())  # parameters() lists a tied weight once
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert bench_generate.decode_bytes(model, 5, 100.0) == weights + 5 * 100 * kv_per_token
