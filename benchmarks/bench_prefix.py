"""Shared-prefix GRPO against the plain path: the update and the whole GRPO step, timed in one process.

    python benchmarks/bench_prefix.py --preset tiny --clips 16 --group 8 --prompt_len 71 --new_tokens 30
    python benchmarks/bench_prefix.py --preset qwen0.5b --random_init --clips 1 --group 8 --prompt_len 300 \\
        --new_tokens 128

Builds the preset (random weights: the tiny preset always, a named one with --random_init), C clips of random
frames and audio whose prompts (media placeholders, subtitle, question) are --prompt_len tokens long, and runs
grpo.grpo_step (rollout, reward, advantages, reference log-probs, one update with its optimiser step) with
--shared_prefix false and true from the same weights and generator seed, so both paths draw the same tokens.
Completions run to their full length: the benchmark makes a media placeholder the only stop id, and the
policy never draws a placeholder. Each path is timed after a warm-up step; the best of --repeats is kept.

Peak memory of the update (forward and backward of the loss): on a GPU, torch's peak allocation above what was
allocated before; on a CPU, the growth of the resident set (VmHWM, reset first) over one update in a child
process per path (it rebuilds the same weights and reads the step's record from a file; its gradient buffers
exist before), so that one path's high-water mark, or memory the allocator kept, cannot hide the other's.
The last line reads `update: plain X s, shared Y s, ratio R; step: plain X s, shared Y s, ratio R`.
"""

import argparse
import ctypes
import gc
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import grpo  # noqa: E402
import model as model_lib  # noqa: E402
import reward  # noqa: E402

PATHS = {"plain": False, "shared": True}


def subtitle_for(model, prompt_len: int) -> str:
    """A subtitle that makes the prompt exactly prompt_len tokens long: words added one at a time, each the
    first of a list that does not overshoot."""
    length = lambda s: len(model.tokenizer(data.build_prompt(model.tokenizer, s, True,  # noqa: E731
                                                             model.cfg.n_tokens))["input_ids"])
    words = "we will meet at the station at noon and then take the bus home a I".split()
    text, n = "", length("")
    while n < prompt_len:
        fits = [w for w in words[len(text.split()) % 13:] + words if length(f"{text} {w}".strip()) <= prompt_len]
        if not fits:
            raise SystemExit(f"error: cannot make a prompt of exactly {prompt_len} tokens (at {n})")
        text = f"{text} {fits[0]}".strip()
        n = length(text)
    if n != prompt_len:
        raise SystemExit(f"error: cannot make a prompt of exactly {prompt_len} tokens (shortest {length('')})")
    return text


def make_run(a, device):
    """The policy, its reference, C clips with features, the lexicon."""
    cfg = model_lib.ModelConfig.from_preset(a.preset, random_init=a.random_init or None, train_llm=a.train_llm)
    with torch.device(device):
        policy = model_lib.build_model(cfg, device=device)
    # completions run to --new_tokens: the only stop id is a placeholder, which the policy never draws
    policy.llm.generation_config.eos_token_id = None
    policy.tokenizer.eos_token = model_lib.PLACEHOLDERS[0]
    ref = model_lib.frozen_copy(policy)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 255, (a.clips, cfg.n_frames, policy.image_size, policy.image_size, 3),
                           dtype=torch.uint8, generator=g)
    audio = torch.randn(a.clips, cfg.audio_clips, round(cfg.clip_seconds * data.SAMPLE_RATE), generator=g)
    with policy.autocast():
        media = policy.encode_media(frames, audio)
    subtitle = subtitle_for(policy, a.prompt_len)
    clips = [data.Clip(f"c{i}", "['happy', 'worried']", subtitle) for i in range(a.clips)]
    feats = {c.name: {k: v[i].cpu() for k, v in media.items()} for i, c in enumerate(clips)}
    return policy, ref, clips, feats, reward.load_lexicon("builtin")


def grpo_args(a, shared: bool) -> grpo.Args:
    return grpo.Args(group_size=a.group, clips_per_step=a.clips, max_new_tokens=a.new_tokens,
                     micro_batch=a.micro_batch, shared_prefix=shared, lr=1e-6, warmup_steps=1)


def run_step(policy, ref, clips, feats, lex, args, seed: int) -> tuple:
    """One grpo_step; returns (the record, its seconds per part)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ep, _, seconds = grpo.grpo_step(policy=policy, ddp_policy=policy, ref=ref, optimizer=optimizer,
                                    scheduler=scheduler, params=params, clips=clips, feats=feats, lex=lex,
                                    args=args, generator=torch.Generator(policy.device).manual_seed(seed), world=1)
    return ep, seconds


def update_once(policy, ep, args):
    """The update's forward and backward (accumulate_gradients), no optimiser step."""
    n_seqs, n_tokens = grpo.step_normalisers(ep, policy.device)
    grpo.accumulate_gradients(policy, policy, ep, n_seqs=n_seqs, n_tokens=n_tokens, world=1,
                              temperature=args.temperature, eps_low=args.eps_low, eps_high=args.eps_high,
                              beta=args.beta, kl=args.kl, aggregation=args.aggregation,
                              max_new_tokens=args.max_new_tokens, micro_batch=args.micro_batch,
                              shared_prefix=args.shared_prefix)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


RECORD = ("prompt_ids", "prompt_mask", "tokens", "mask", "truncated", "adv", "ref_logp", "loss_mask")


def save_record(ep, path: str):
    torch.save({**{k: getattr(ep, k) for k in RECORD}, **{f"media.{k}": v for k, v in ep.media.items()}}, path)


def gpu_update_memory_gib(policy, ep, args) -> float:
    """Peak allocation of one update of `ep` above what was allocated before (gradient buffers included before)."""
    allocate_grads(policy)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    update_once(policy, ep, args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def cpu_update_memory_gib(a, record: str, shared: bool) -> float:
    """Resident-set growth of one update of a saved record, in a child process (see the module docstring)."""
    flags = [f"--{k}={getattr(a, k)}" for k in ("preset", "clips", "group", "prompt_len", "new_tokens", "micro_batch")]
    flags += (["--random_init"] if a.random_init else []) + ([f"--train_llm={a.train_llm}"] if a.train_llm else [])
    r = subprocess.run([sys.executable, __file__, *flags, "--device=cpu", "--child", record,
                        "--child_shared", str(int(shared))], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: the memory child failed:\n{r.stderr[-3000:]}")
    return float(r.stdout.split()[-1])


def allocate_grads(policy):
    for p in policy.parameters():  # the gradient buffers exist before (training keeps them)
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def memory_child(a, device):
    """Rebuild the run, read the record, and print the resident-set growth of one update in GiB."""
    policy, _, clips, _, _ = make_run(a, device)
    saved = torch.load(a.child, weights_only=True)
    ep = grpo.Episodes(clips=clips, media={k[6:]: v for k, v in saved.items() if k.startswith("media.")},
                       group_size=a.group, texts=[], sample_logp=None, entropy=None,
                       **{k: saved[k] for k in RECORD})
    allocate_grads(policy)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts from here
    before = _status_kib("VmRSS")
    update_once(policy, ep, grpo_args(a, bool(a.child_shared)))
    print((_status_kib("VmHWM") - before) / 2**20)


def compare(a, device, say=print) -> dict:
    """Both paths from the same weights: the best step of each after a warm-up, and the update's peak memory."""
    t = time.time()
    policy, ref, clips, feats, lex = make_run(a, device)
    say(f"{a.preset} on {device} (built in {time.time() - t:.0f} s, {policy.cfg.train_llm} training): "
        f"{a.clips} clips x G={a.group}, prompt {a.prompt_len} tokens, completions {a.new_tokens} tokens; "
        f"tokens through the LM per clip: plain {a.group * (a.prompt_len + a.new_tokens)}, shared "
        f"{a.prompt_len + a.group * a.new_tokens}")
    start = {n: t.detach().clone() for n, t in policy.state_dict().items()}
    times, records = {}, {}
    for name, shared in PATHS.items():
        args = grpo_args(a, shared)
        best = None
        for k in range(1 + a.repeats):  # the first step warms up
            policy.load_state_dict(start)  # the same weights for every step of both paths
            ep, seconds = run_step(policy, ref, clips, feats, lex, args, seed=k)
            say(f"  {name} step {k}{' (warm-up)' if k == 0 else ''}: "
                + ", ".join(f"{part} {s:.2f} s" for part, s in seconds.items()))
            if k and (best is None or sum(seconds.values()) < sum(best.values())):
                best = seconds
        times[name], records[name] = best, ep
    result = {"clips": a.clips, "group": a.group, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
              "train_llm": policy.cfg.train_llm, "seconds": times,
              "same_draws": torch.equal(records["plain"].tokens, records["shared"].tokens),
              "full_length": bool(records["shared"].mask.all())}
    for part, seconds in (("update", {n: times[n]["update"] for n in PATHS}),
                          ("step", {n: sum(times[n].values()) for n in PATHS})):
        result[part] = {"plain_s": seconds["plain"], "shared_s": seconds["shared"],
                        "ratio": seconds["plain"] / seconds["shared"]}
    if not a.no_memory and device.type == "cuda":
        policy.load_state_dict(start)
        result["update_peak_memory_GiB"] = {name: gpu_update_memory_gib(policy, records[name], grpo_args(a, shared))
                                            for name, shared in PATHS.items()}
    elif not a.no_memory:  # a child per path, once this process has let go of its model and activations
        with tempfile.TemporaryDirectory() as tmp:
            paths = {name: os.path.join(tmp, f"{name}.pt") for name in PATHS}
            for name in PATHS:
                save_record(records[name], paths[name])
            del policy, ref, records, start
            gc.collect()
            trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc: give the freed heap back
            if trim is not None:
                trim(0)
            result["update_peak_memory_GiB"] = {name: cpu_update_memory_gib(a, paths[name], shared)
                                                for name, shared in PATHS.items()}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(model_lib.PRESETS))
    p.add_argument("--random_init", action="store_true", help="random weights of a named preset's real shapes")
    p.add_argument("--train_llm", default=None, help="lora | full (default: the preset's)")
    p.add_argument("--clips", type=int, default=16, help="C, clips per step")
    p.add_argument("--group", type=int, default=8, help="G, completions per clip")
    p.add_argument("--prompt_len", type=int, default=71, help="P, prompt tokens (placeholders, subtitle, question)")
    p.add_argument("--new_tokens", type=int, default=30, help="L, completion tokens (every completion this long)")
    p.add_argument("--micro_batch", type=int, default=64, help="completions per forward pass (grpo.py's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per path after the warm-up")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--device", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_shared", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.preset != "tiny" and not a.random_init:
        sys.exit("error: benchmarks build random weights: pass --random_init with a named preset")
    device = torch.device(a.device) if a.device else model_lib.default_device()
    if a.child:
        return memory_child(a, device)
    r = compare(a, device, say=lambda s: print(s, flush=True))
    print(f"same draws in both paths: {r['same_draws']}; every completion {a.new_tokens} tokens: {r['full_length']}")
    if "update_peak_memory_GiB" in r:
        m = r["update_peak_memory_GiB"]
        print(f"peak extra memory of the update: plain {m['plain']:.2f} GiB, shared {m['shared']:.2f} GiB, ratio "
              f"{m['plain'] / max(m['shared'], 1e-9):.2f} "
              f"({'GPU allocation' if device.type == 'cuda' else 'resident set growth'})")
    u, s = r["update"], r["step"]
    print(f"update: plain {u['plain_s']:.2f} s, shared {u['shared_s']:.2f} s, ratio {u['ratio']:.2f}; "
          f"step: plain {s['plain_s']:.2f} s, shared {s['shared_s']:.2f} s, ratio {s['ratio']:.2f}")
    if not (r["same_draws"] and r["full_length"]):
        sys.exit("error: the two paths did not draw the same full-length completions")


if __name__ == "__main__":
    main()
