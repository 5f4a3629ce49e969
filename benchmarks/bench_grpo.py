"""Throughput of GRPO steps on a random-init preset: encode / generate / reward / reference / update.

    python benchmarks/bench_grpo.py --preset tiny                       # CPU, seconds
    python benchmarks/bench_grpo.py --preset qwen0.5b --clips 8 --group 8 --max_new_tokens 128   # a GPU

Builds the preset's real shapes with random weights (no downloads), feeds B clips of random frames and audio
with a subtitle of `--subtitle_words` words (the prompt then has the media placeholders, the subtitle and the
question, as in training), and runs full GRPO steps with grpo.py's own functions. A random policy rarely
stops, so completions run to --max_new_tokens: a worst case for length. Prints, per step and on average,
the time split, samples/s, generated tokens/s and peak memory.
"""

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import model as model_lib  # noqa: E402
import reward  # noqa: E402


def make_clips(model, n_clips: int, subtitle_words: int):
    """n clips of random frames and audio with a subtitle of `subtitle_words` words."""
    cfg = model.cfg
    words = (data.QUESTION + " ").split() * (subtitle_words // 8 + 1)
    clips = [data.Clip(f"c{i}", "['happy', 'worried']", " ".join(words[:subtitle_words])) for i in range(n_clips)]
    frames = torch.randint(0, 255, (n_clips, cfg.n_frames, model.image_size, model.image_size, 3), dtype=torch.uint8)
    audio = torch.randn(n_clips, cfg.audio_clips, round(cfg.clip_seconds * data.SAMPLE_RATE))
    return clips, frames, audio


def run_steps(model, ref, clips, frames, audio, args, steps: int, device) -> list:
    """Full GRPO steps (grpo.grpo_step, as grpo.py runs them) after encoding the clips' media; one dict of
    timings (seconds) and rates per step."""
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    lex = reward.load_lexicon("builtin")
    rows = []
    for step in range(steps):
        t0 = time.time()
        with model.autocast():
            media = model.encode_media(frames, audio)  # once per clip, reused by all G samples
        feats = {c.name: {k: v[i].cpu() for k, v in media.items()} for i, c in enumerate(clips)}
        t_enc = grpo.clock(device) - t0
        ep, _, seconds = grpo.grpo_step(policy=model, ddp_policy=model, ref=ref, optimizer=optimizer,
                                        scheduler=scheduler, params=params, clips=clips, feats=feats, lex=lex,
                                        args=args, generator=torch.Generator(device).manual_seed(step), world=1)
        total = time.time() - t0
        rows.append({"encode": t_enc, **seconds, "total": total, "samples_per_s": ep.tokens.shape[0] / total,
                     "gen_tokens_per_s": float(ep.mask.sum()) / seconds["generate"]})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=sorted(model_lib.PRESETS))
    p.add_argument("--train_llm", default=None, help="lora | full (default: the preset's)")
    p.add_argument("--clips", type=int, default=8, help="B, clips per step")
    p.add_argument("--group", type=int, default=8, help="G, completions per clip")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--subtitle_words", type=int, default=40)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the compiled static-cache sampler (default: with CUDA)")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    device = torch.device(a.device) if a.device else model_lib.default_device()
    cfg = model_lib.ModelConfig.from_preset(a.preset, random_init=True, train_llm=a.train_llm)
    t = time.time()
    model = model_lib.build_model(cfg, device=device)
    ref = model_lib.frozen_copy(model)
    model.use_sampler(a.compile)
    sizes = model_lib.count_parameters(model)
    print(f"{a.preset} (random init) on {device}: built in {time.time() - t:.1f} s; parameters "
          + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sizes.items())
          + f"; sampler {'eager' if model.fast_sampler is None else 'compiled'}")
    args = grpo.Args(group_size=a.group, clips_per_step=a.clips, max_new_tokens=a.max_new_tokens,
                     micro_batch=a.micro_batch)
    clips, frames, audio = make_clips(model, a.clips, a.subtitle_words)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompt_len = len(model.tokenizer(data.build_prompt(model.tokenizer, clips[0].subtitle, True,
                                                       cfg.n_tokens))["input_ids"])
    print(f"prompt {prompt_len} tokens, {a.clips} clips x G={a.group}, up to {a.max_new_tokens} new tokens")
    rows = run_steps(model, ref, clips, frames, audio, args, a.steps, device)
    for step, row in enumerate(rows):
        print(f"step {step}: " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()))
    keep = rows[1:] or rows  # the first step includes warm-up
    mean = {k: sum(r[k] for r in keep) / len(keep) for k in keep[0]}
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print("mean over steps after the first: " + "  ".join(f"{k} {v:.3g}" for k, v in mean.items())
          + f"  peak memory {peak:.2f} GiB ({'GPU' if device.type == 'cuda' else 'process RSS'})")
    common.cleanup_dist()


if __name__ == "__main__":
    main()
