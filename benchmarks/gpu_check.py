"""The GPU check (benchmarks/gpu_check.sh runs it): real shapes, random weights, one JSON.

    python benchmarks/gpu_check.py                                  # qwen0.5b and paper on the GPU
    python benchmarks/gpu_check.py --device cpu --presets tiny --batch 4 --prompt_len 16 --new_tokens 8 \\
        --clips 2 --group 2 --out /tmp/gpu_check.json                # the same code at toy size on a CPU

Per preset (random init of its real shapes, no downloads): decode tokens/s of the eager and the compiled
sampler (B sequences, random prompts) and their fraction of the bandwidth limit (bench_generate.py), then full
GRPO steps (clips x G completions, bench_grpo.py) with the stages' default sampler: the time split of the
steps after the first, samples/s, generated tokens/s and peak GPU memory. For the --prefix_presets
(qwen0.5b), the shared-prefix GRPO step against the plain one (bench_prefix.py: one clip x G,
--prefix_prompt_len prompt tokens, --new_tokens completion tokens): update and step seconds, their ratios, the
update's peak memory. With more than one GPU, a short SFT (one process) and a few grpo.py steps under
torchrun on all of them. The JSON is rewritten after each part, so a run cut short keeps what it measured;
parts that would start after --budget_s are skipped and say so.
"""

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import bench_generate  # noqa: E402
import bench_grpo  # noqa: E402
import bench_prefix  # noqa: E402
import grpo  # noqa: E402
import model as model_lib  # noqa: E402


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS on a CPU


def check_preset(preset: str, a, device) -> dict:
    """Decode throughput and GRPO steps of one preset."""
    t = time.time()
    model = bench_generate.build(preset, True, device)
    ref = model_lib.frozen_copy(model)  # before any generation: the copy shares the frozen weights, not a KV cache
    out = {"build_seconds": time.time() - t, "parameters": model_lib.count_parameters(model)}
    compiled = device.type == "cuda" if a.compile is None else a.compile
    samplers = ["eager", "compiled" if compiled else "static"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out["decode"] = bench_generate.measure(model, a.batch, a.prompt_len, a.new_tokens, samplers, a.repeats)
    model.use_sampler(a.compile)  # what the stages use by default
    args = grpo.Args(group_size=a.group, clips_per_step=a.clips, max_new_tokens=a.new_tokens,
                     micro_batch=a.micro_batch)
    clips, frames, audio = bench_grpo.make_clips(model, a.clips, a.subtitle_words)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = bench_grpo.run_steps(model, ref, clips, frames, audio, args, a.grpo_steps, device)
    keep = rows[1:] or rows  # the first step includes warm-up (and compilation)
    mean = {k: sum(r[k] for r in keep) / len(keep) for k in keep[0]}
    out["grpo_step"] = {"clips": a.clips, "group": a.group, "max_new_tokens": a.new_tokens,
                        "sampler": "eager" if model.fast_sampler is None else "compiled",
                        "train_llm": model.cfg.train_llm, "steps_timed": len(keep),
                        "time_split_seconds": {k: mean[k] for k in ("encode", "generate", "reward", "reference",
                                                                    "update", "total")},
                        "samples_per_s": mean["samples_per_s"], "gen_tokens_per_s": mean["gen_tokens_per_s"],
                        "first_step_seconds": rows[0]["total"], "peak_memory_GiB": peak_memory_gib(device)}
    del model, ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def check_torchrun(n_gpus: int, steps: int) -> dict:
    """A 1-step SFT (random-init qwen0.5b shapes) and `steps` grpo.py steps under torchrun on every GPU."""
    import synth
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    synth.synthesize(os.path.join(tmp, "synth"), n_train=32, n_test=8, seed=0, progress=False, n_val=8, n_rl=64)
    common = ["--data", os.path.join(tmp, "synth"), "--feature_cache", os.path.join(tmp, "features")]
    sft = [sys.executable, "sft.py", "--preset", "qwen0.5b", "--random_init", "--max_steps", "1",
           "--eval_every", "0", "--eval_samples", "2", "--out", os.path.join(tmp, "sft")] + common
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}", "grpo.py",
           "--init", os.path.join(tmp, "sft"), "--max_steps", str(steps), "--clips_per_step", str(2 * n_gpus),
           "--eval_every", "0", "--out", os.path.join(tmp, "grpo")] + common
    out = {"nproc": n_gpus, "steps": steps}
    for name, cmd in (("sft", sft), ("grpo_torchrun", run)):
        t = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        out[name] = {"ok": r.returncode == 0, "seconds": time.time() - t,
                     "last_lines": (r.stdout + r.stderr).strip().splitlines()[-5:]}
        if r.returncode != 0:
            break
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check.json"))
    p.add_argument("--presets", default="qwen0.5b,paper")
    p.add_argument("--batch", type=int, default=64, help="sequences decoded together")
    p.add_argument("--prompt_len", type=int, default=300)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed decode runs per sampler after the warm-up")
    p.add_argument("--clips", type=int, default=8, help="clips per GRPO step")
    p.add_argument("--group", type=int, default=8, help="G, completions per clip")
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--subtitle_words", type=int, default=40)
    p.add_argument("--grpo_steps", type=int, default=2, help="GRPO steps per preset (the first is warm-up)")
    p.add_argument("--torchrun_steps", type=int, default=3, help="grpo.py steps under torchrun (0: skip)")
    p.add_argument("--prefix_presets", default="qwen0.5b", help="presets whose shared-prefix step is compared with "
                                                               "the plain one ('': none)")
    p.add_argument("--prefix_prompt_len", type=int, default=300, help="prompt tokens of the shared-prefix step")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the compiled sampler (default: with CUDA; else the static one is timed)")
    p.add_argument("--budget_s", type=float, default=420, help="start no part after this many seconds")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    device = torch.device(a.device) if a.device else model_lib.default_device()
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "gpus": n_gpus,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": vars(a), "presets": {}, "torchrun": None, "skipped": []}

    def save():
        report["total_seconds"] = time.time() - t0
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    for preset in a.presets.split(","):
        if time.time() - t0 > a.budget_s:
            report["skipped"].append(f"preset {preset}: out of time")
            continue
        print(f"[gpu_check] {preset} ...", flush=True)
        report["presets"][preset] = check_preset(preset, a, device)
        save()
    for preset in [x for x in a.prefix_presets.split(",") if x]:
        if time.time() - t0 > a.budget_s:
            report["skipped"].append(f"shared prefix {preset}: out of time")
            continue
        print(f"[gpu_check] shared prefix, {preset} ...", flush=True)
        ns = argparse.Namespace(preset=preset, random_init=preset != "tiny", train_llm=None, clips=1, group=a.group,
                                prompt_len=a.prefix_prompt_len, new_tokens=a.new_tokens, micro_batch=a.micro_batch,
                                repeats=1, no_memory=False, child=None, child_shared=1)
        report.setdefault("shared_prefix", {})[preset] = bench_prefix.compare(ns, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if n_gpus > 1 and a.torchrun_steps:
        if time.time() - t0 > a.budget_s:
            report["skipped"].append("torchrun: out of time")
        else:
            print(f"[gpu_check] torchrun on {n_gpus} GPUs ...", flush=True)
            report["torchrun"] = check_torchrun(n_gpus, a.torchrun_steps)
    save()
    print(json.dumps({k: {"decode_tokens_per_s": {s: v["decode"][s]["tokens_per_s"] for s in v["decode"]
                                                  if isinstance(v["decode"][s], dict)},
                          "grpo_samples_per_s": v["grpo_step"]["samples_per_s"]}
                      for k, v in report["presets"].items()}, indent=1))
    print(f"[gpu_check] wrote {a.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
