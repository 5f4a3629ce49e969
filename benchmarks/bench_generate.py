"""Decode throughput of AffectGPT.generate: the eager loop, the static-cache loop and the compiled one.

    python benchmarks/bench_generate.py --preset tiny --batch 64 --prompt_len 300 --new_tokens 128
    python benchmarks/bench_generate.py --preset qwen0.5b --random_init --batch 8 --prompt_len 300 --new_tokens 32
    python benchmarks/bench_generate.py --preset qwen0.5b --random_init --batch 64 --compile --device cuda

The LLM of the preset (random weights of its real shapes with --random_init, no downloads) decodes B prompts
of random text tokens (no media: the encoders play no part in decoding) with the same seed under each sampler;
the samplers must produce the same tokens, which is checked. Decode tokens/s = B x generated positions /
seconds, after a warm-up run (which, for the compiled sampler, is the compilation). The bandwidth limit is
B / (bytes read per decode step / copy bandwidth): every LLM weight once plus the K/V cache of the mean
context, against a measured device-to-device copy; a decode step cannot beat it at this batch size.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_lib  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, mib: int | None = None) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the best of a few (1 GiB on a GPU, 256 MiB
    on a CPU)."""
    mib = mib or (1024 if device.type == "cuda" else 256)
    x = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() / best


def decode_bytes(model, batch: int, context: float) -> float:
    """Bytes one decode step must read: every LLM weight once (a tied embedding counts once) and the K/V of
    `context` tokens for each of `batch` rows."""
    llm, seen, total = model.llm, set(), 0
    for p in llm.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    c = llm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_dtype = torch.bfloat16 if model.device.type == "cuda" else next(llm.parameters()).dtype
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.finfo(kv_dtype).bits // 8
    return total + batch * context * kv


def random_prompts(model, batch: int, prompt_len: int, seed: int = 0):
    """(B, prompt_len) random text token ids (no placeholders, no stop ids) and a full attention mask."""
    g = torch.Generator().manual_seed(seed)
    bad = set(model.placeholder_ids) | set(model.stop_ids) | {model.tokenizer.pad_token_id}
    allowed = torch.tensor([i for i in range(len(model.tokenizer)) if i not in bad])
    ids = allowed[torch.randint(0, len(allowed), (batch, prompt_len), generator=g)]
    return ids.to(model.device), torch.ones_like(ids).to(model.device)


def decode_loop(model, sampler: str):
    """The object whose generate() is the named decode loop: the eager loop, or a StaticSampler (compiled as
    the stages compile it: a CUDA graph on a GPU)."""
    if sampler == "eager":
        return model
    cuda = model.device.type == "cuda"
    return model_lib.StaticSampler(model, compiled=sampler == "compiled", mode="reduce-overhead" if cuda else None)


def time_sampler(model, sampler, ids, att, new_tokens, repeats):
    """(tokens of the last run, seconds of the warm-up run, best seconds of `repeats` runs)."""
    loop, runs = decode_loop(model, sampler), []
    for _ in range(1 + repeats):
        g = torch.Generator(model.device).manual_seed(0)
        sync(model.device)
        t = time.perf_counter()
        with model.autocast():
            out = loop.generate(ids, att, None, max_new_tokens=new_tokens, generator=g)
        sync(model.device)
        runs.append(time.perf_counter() - t)
    return out.tokens, runs[0], min(runs[1:])


def measure(model, batch, prompt_len, new_tokens, samplers, repeats=2) -> dict:
    """Decode tokens/s of each sampler, their bandwidth fractions, and a check that they agree."""
    ids, att = random_prompts(model, batch, prompt_len)
    bandwidth = copy_bandwidth(model.device)
    limit = batch / (decode_bytes(model, batch, prompt_len + new_tokens / 2) / bandwidth)
    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "device": str(model.device),
           "copy_bandwidth_GBps": bandwidth / 1e9, "bandwidth_limit_tokens_per_s": limit}
    first = None
    for s in samplers:
        tokens, warm, best = time_sampler(model, s, ids, att, new_tokens, repeats)
        rate = batch * tokens.shape[1] / best
        out[s] = {"tokens_per_s": rate, "seconds": best, "warmup_seconds": warm, "positions": tokens.shape[1],
                  "fraction_of_bandwidth_limit": rate / limit}
        if first is None:
            first = tokens
        else:  # sampled with the same seed: the same tokens (a different length would skew the rates)
            out[s]["same_tokens_as_" + samplers[0]] = bool(torch.equal(tokens, first))
    for s in samplers[1:]:
        out[s]["speedup_over_" + samplers[0]] = out[s]["tokens_per_s"] / out[samplers[0]]["tokens_per_s"]
    return out


def build(preset: str, random_init: bool, device) -> model_lib.AffectGPT:
    cfg = model_lib.ModelConfig.from_preset(preset, random_init=random_init or None)
    with torch.device(device):  # random weights initialised on the device (a 7B model in seconds on a GPU)
        return model_lib.build_model(cfg, device=device).eval()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=sorted(model_lib.PRESETS))
    p.add_argument("--random_init", action="store_true", help="random weights of the preset's real shapes")
    p.add_argument("--batch", type=int, default=64, help="B, sequences decoded together")
    p.add_argument("--prompt_len", type=int, default=300)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled sampler (default: with CUDA)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per sampler after the warm-up")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args()
    device = torch.device(a.device) if a.device else model_lib.default_device()
    compiled = device.type == "cuda" if a.compile is None else a.compile
    model = build(a.preset, a.random_init, device)
    samplers = ["eager", "static"] + (["compiled"] if compiled else [])
    r = measure(model, a.batch, a.prompt_len, a.new_tokens, samplers, a.repeats)
    r["preset"] = a.preset
    print(f"{a.preset}{' (random init)' if a.random_init else ''} on {device}: B = {a.batch}, prompt "
          f"{a.prompt_len}, up to {a.new_tokens} new tokens; bandwidth limit {r['bandwidth_limit_tokens_per_s']:,.0f}"
          f" tokens/s at {r['copy_bandwidth_GBps']:.0f} GB/s")
    for s in samplers:
        x = r[s]
        print(f"  {s:8s} {x['tokens_per_s']:10,.1f} tokens/s  ({x['positions']} positions in {x['seconds']:.2f} s, "
              f"warm-up {x['warmup_seconds']:.1f} s, {100 * x['fraction_of_bandwidth_limit']:.1f}% of the limit)"
              + "".join(f", {k} {v:.2f}" if isinstance(v, float) else f", {k} {v}" for k, v in x.items()
                        if k.startswith(("speedup", "same"))))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    if not all(r[s].get("same_tokens_as_eager", True) for s in samplers):
        sys.exit("error: the samplers disagree")


if __name__ == "__main__":
    main()
