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
    """Full GRPO steps with grpo.py's own functions; one dict of timings (seconds) and rates per step."""
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    lex = reward.load_lexicon("builtin")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    G, n = args.group_size, len(clips)
    rows = []
    for step in range(steps):
        t0 = time.time()
        with model.autocast():
            media = model.encode_media(frames, audio)  # once per clip, reused by all G samples
        feats = {c.name: {k: v[i].cpu() for k, v in media.items()} for i, c in enumerate(clips)}
        sync()
        t_enc = time.time() - t0
        s = grpo.rollout(model, clips, feats, G, True, args.max_new_tokens, 1.0,
                         torch.Generator(device).manual_seed(step))
        t1 = time.time()
        scores = [reward.score_completion(text, clips[i // G].labels, lex) for i, text in enumerate(s.texts)]
        rewards = torch.tensor([x["total"] for x in scores], device=device)
        adv, _ = grpo.group_advantages(rewards, torch.arange(n, device=device).repeat_interleave(G))
        sync()
        t2 = time.time()
        ref_logp = grpo.score_samples(ref, s, 1.0, args.micro_batch)
        sync()
        t3 = time.time()
        ro = grpo.Rollout(input_ids=s.input_ids, attention=s.attention, media=s.media, prompt_len=s.prompt_len,
                          loss_mask=grpo.loss_mask_of(s.input_ids[:, s.prompt_len:], model.stop_ids),
                          adv=adv, ref_logp=ref_logp, old_logp=None)
        n_seqs, n_tokens = grpo.step_normalisers(ro, device)
        grpo.accumulate_gradients(model, model, ro, n_seqs, n_tokens, 1,
                                  **{k: getattr(args, k) for k in grpo.LOSS_SETTINGS})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t_upd, total = time.time() - t3, time.time() - t0
        gen_tokens = float(s.attention[:, s.prompt_len:].sum())
        rows.append({"encode": t_enc, "generate": s.seconds, "reward": t2 - t1, "reference": t3 - t2,
                     "update": t_upd, "total": total, "samples_per_s": n * G / total,
                     "gen_tokens_per_s": gen_tokens / s.seconds})
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
    model.compile_sampler(a.compile)
    sizes = model_lib.count_parameters(model)
    print(f"{a.preset} (random init) on {device}: built in {time.time() - t:.1f} s; parameters "
          + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sizes.items()) + f"; sampler {model.sampler}")
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
