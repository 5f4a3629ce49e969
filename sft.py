"""sft.py: stage 1, the cold start. Supervised fine-tuning on `<think>{reason}</think><answer>{labels}</answer>`.

GRPO needs a policy that already writes the format (a policy whose rewards are all zero has zero advantages and
learns nothing), so AffectGPT-RL starts from SFT on descriptions and label lists. This trains the projector and
LoRA (or the full LLM) with the loss on target tokens only.

    python synth.py && python sft.py                # tiny preset on the synthetic benchmark in out/synth, CPU
    python sft.py --no-think                        # targets <answer>..</answer> only
    python sft.py --preset qwen0.5b --data DIR --out out/sft_q05 --lr 1e-4
    python sft.py --llm LLM_DIR --vision CLIP_DIR --audio HUBERT_DIR   # downloaded HF-format weights, any preset
    torchrun --standalone --nproc_per_node=8 sft.py --preset paper --data /data/MER-Caption+ --out out/sft_paper
    python sft.py --resume                          # continue OUT exactly where it stopped
    python sft.py --init out/sft --train_csv out/rft/best.csv --lr 1e-3 --epochs 2 --out out/rft   # RFT

Batches: `--batch_size` clips per optimiser step over all ranks, cut into micro-batches of `--micro_batch`
clips per rank; the loss is the mean over all target tokens of the step (token counts are all-reduced), so
the update is the same for any micro-batch size and world size. Data order is a pure function of
(seed, step): resuming replays nothing and skips nothing. Ctrl-C or SIGTERM saves a checkpoint first, then exits
with 128 + the signal. A used OUT needs --resume (flags that alter the run are refused; --max_steps and --epochs
too, since they set the cosine schedule's length) or --overwrite (common.check_out, README "Runs").

Outputs: OUT/step_XXXXXX/ (keep_last of them), OUT/latest, OUT/final/ (loaded by grpo.py and eval.py),
OUT/metrics.jsonl, OUT/args.json.

Inputs: flags are checked before any work (check_args). A data folder without a subtitle file is refused (a
missing download or a typo would train without the text modality): `--without_subtitles` trains without it
on purpose; the data line says how many clips have subtitle text.

Departures from the paper: the paper trains on MER-Caption+ (31k clips) with lr 1e-5; our default is the
synthetic benchmark and, for the random-init tiny preset, lr 3e-3 with the whole LLM trained (a random base
has nothing for LoRA to preserve) and a tokenizer trained on the prompt texts, the lexicon and the training
split's own text (data.tokenizer_corpus; a named LLM keeps its tokenizer). The held-out split (for loss and a
few greedy generations) is carved out of the training split unless DIR/val.csv exists; it is for monitoring,
never for picking checkpoints.
"""

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import model as model_lib
import reward


@dataclass
class Args:
    # model
    preset: str = field(default="tiny", metadata={"help": "tiny | qwen0.5b | paper"})
    init: str | None = field(default=None, metadata={"help": "start from this checkpoint instead of the preset"})
    llm: str | None = field(default=None, metadata={"help": "the LLM's weights: HF name or HF-format folder "
                                                         "(any preset; default: the preset's)"})
    vision: str | None = field(default=None, metadata={"help": "the vision tower's weights (CLIP / SigLIP)"})
    audio: str | None = field(default=None, metadata={"help": "the audio encoder's weights (HuBERT, Whisper..)"})
    random_init: bool = field(default=False, metadata={"help": "random weights of the preset's real shapes "
                                                               "(not with --llm / --vision / --audio)"})
    train_llm: str | None = field(default=None, metadata={"help": "lora | full (default: the preset's)"})
    # data
    data: str | None = field(default=None, metadata={"help": "OV-MER-layout folder (default: out/synth, "
                                                            "written by synth.py)"})
    train_split: str = field(default="train", metadata={"help": "labels CSV DATA/{train_split}.csv"})
    train_csv: str | None = field(default=None, metadata={"help": "train on this CSV (name, openset[, reason]) "
                                                                  "instead: e.g. eval.py --best_csv output"})
    val_size: int = field(default=64, metadata={"help": "held-out clips from the training split (no val.csv)"})
    think: bool = field(default=True, metadata={"help": "targets with <think> (--no-think: <answer> only)"})
    use_faces: bool = field(default=False, metadata={"help": "read openface_face/ crops instead of video"})
    without_subtitles: bool = field(default=False, metadata={"help": "no text modality: read no subtitle file "
                                                                     "(without it, a missing one is an error)"})
    skip_bad_clips: bool = field(default=False, metadata={"help": "leave out clips with bad media (counted)"})
    max_length: int = field(default=1024, metadata={"help": "tokens per example (targets are cut, not prompts)"})
    feature_cache: str = field(default="out/features", metadata={"help": "folder for cached encoder features"})
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "clips per optimiser step, all ranks together"})
    micro_batch: int = field(default=16, metadata={"help": "clips per forward pass per rank"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (tiny: 3e-3, others: 1e-5)"})
    projector_lr_scale: float = field(default=1.0, metadata={"help": "projector learning rate / lr"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on matrices"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps, then cosine to a tenth"})
    epochs: float = field(default=10.0, metadata={"help": "passes over the training split (if max_steps = 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimiser steps (0: from epochs)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute LLM activations"})
    seed: int = field(default=0, metadata={"help": "data order, projector/adapter initialisation, dropout"})
    model_seed: int = field(default=0, metadata={"help": "seed of random-init base weights (tiny preset, "
                                                         "--random_init): the same base for every --seed"})
    # logging and checkpoints
    out: str = field(default="out/sft", metadata={"help": "output folder"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines"})
    eval_every: int = field(default=100, metadata={"help": "steps between held-out evaluations (0: end only)"})
    eval_samples: int = field(default=64, metadata={"help": "held-out clips generated greedily at evaluation"})
    max_new_tokens: int = field(default=80, metadata={"help": "generation length at evaluation"})
    save_every: int = field(default=200, metadata={"help": "steps between checkpoints (0: end only)"})
    keep_last: int = field(default=2, metadata={"help": "step checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/latest (flags that change the run "
                                                           "are refused)"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run in OUT (its checkpoints, logs and "
                                                             "args.json) and start over"})
    stop_after: int = field(default=0, metadata={"help": "save and stop after this many steps of this "
                                                         "invocation (split a long run into jobs; 0: off)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)"})
    compile: bool | None = field(default=None, metadata={"help": "true | false: sample with the compiled static "
                                                          "KV-cache decode step (default: true with CUDA)"})


def check_args(args: Args):
    """Refuse bad arguments before any work, with a message naming the flag."""
    problems = []
    if args.init is None and args.preset not in model_lib.PRESETS:
        problems.append(f"--preset {args.preset!r}: choose one of {sorted(model_lib.PRESETS)}")
    if args.train_llm not in (None, "lora", "full"):
        problems.append(f"--train_llm {args.train_llm!r}: choose lora or full")
    problems += common.at_least(args, 1, "batch_size", "micro_batch", "log_every", "max_new_tokens", "max_length")
    problems += common.at_least(args, 0, "val_size", "warmup_steps", "max_steps", "eval_every", "eval_samples",
                                "save_every", "keep_last", "stop_after", "weight_decay", "grad_clip",
                                "projector_lr_scale")
    problems += common.positive(args, "lr", "epochs")
    problems += common.check_device(args.device)
    if args.init is not None and not os.path.exists(args.init):
        problems.append(f"--init {args.init}: no such checkpoint")
    given = [p for p in ("llm", "vision", "audio") if getattr(args, p) is not None]
    if args.random_init and given:
        problems.append(f"--random_init draws random weights, so the weights of --{' --'.join(given)} would be "
                        f"ignored; drop one or the other")
    elif not args.resume:  # (on resume the flags are compared with the checkpoint instead)
        problems += [f"--{p} {why}" for p in given if (why := model_lib.check_weights(p, getattr(args, p)))]
    if args.train_csv is not None and not os.path.isfile(args.train_csv):
        problems.append(f"--train_csv {args.train_csv}: no such file")
    common.refuse(problems)


def check_same_weights(cfg, args: Args, ckpt: str):
    """--llm / --vision / --audio with --init or --resume must name the weights that checkpoint was built on."""
    for part in ("llm", "vision", "audio"):
        given = getattr(args, part)
        if given is not None and model_lib.weights_name(given) != getattr(cfg, part):
            raise SystemExit(f"error: --{part} {given}, but {ckpt} was built on {getattr(cfg, part)}")


# ----------------------------------------------------------------------------------------------------------
# Helpers


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1: targets (B, T) with -100 where nothing is scored."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def micro_batches(examples, names, feats, micro: int, pad_id: int, device):
    """Yield (batch tensors, media) of at most `micro` examples."""
    for i in range(0, len(examples), micro):
        batch = data.collate_train(examples[i:i + micro], pad_id)
        media = data.stack_media(feats, names[i:i + micro])
        yield {k: v.to(device) for k, v in batch.items()}, {k: v.to(device) for k, v in media.items()}


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(model, lr, weight_decay, projector_lr_scale=1.0):
    """AdamW; no weight decay on biases, norms and 1-d parameters; the projector may take a larger step."""
    groups = []
    for part, scale in ((model.projector, projector_lr_scale), (model.llm, 1.0)):
        params = [p for p in part.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr * scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr * scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def sft_loss_sum(ddp_model, batch, media) -> tuple:
    """Summed negative log-likelihood of the target tokens, and their count."""
    targets = shift_targets(batch["labels"])
    logp = ddp_model(batch["input_ids"], batch["attention_mask"], media, targets=targets)  # (B, T), 0 off-target
    return -logp.sum(), int((targets != -100).sum())


@torch.no_grad()
def evaluate(model, val_examples, val_clips, feats, args, dist_env, lex, micro) -> dict:
    """Held-out loss (all clips) and greedy generations (the first eval_samples clips), over all ranks."""
    model.eval()
    mine = list(range(dist_env.rank, len(val_examples), dist_env.world))
    nll, tokens = 0.0, 0
    names = [val_clips[i].name for i in mine]
    for batch, media in micro_batches([val_examples[i] for i in mine], names, feats, micro,
                                      model.tokenizer.pad_token_id, dist_env.device):
        with model.autocast():
            s, n = sft_loss_sum(model, batch, media)
        nll, tokens = nll + s.item(), tokens + n
    nll, tokens = common.all_reduce_sum([nll, tokens], dist_env.device)
    shown = common.complete_sharded(model, val_clips[:args.eval_samples], feats, dist_env, think=args.think,
                                    max_new_tokens=args.max_new_tokens, greedy=True)
    completions = {name: texts[0] for name, texts in shown.items()}
    gts = {c.name: c.labels for c in val_clips[:args.eval_samples]}
    metrics = {"eval/loss": nll / max(1, tokens)}
    metrics.update(reward.summarize_completions(completions, gts, lex, args.think))
    shown_clips = val_clips[:min(3, args.eval_samples)]
    metrics["examples"] = [(c.name, c.labels, completions[c.name]) for c in shown_clips]
    model.train()
    return metrics


# ----------------------------------------------------------------------------------------------------------


def main(args: Args):
    # ---- setup ------------------------------------------------------------------------------------------
    from tqdm import tqdm
    check_args(args)
    dist_env = common.setup_dist(args.device)
    common.seed_everything(args.seed)
    say = tqdm.write if dist_env.main else (lambda *a, **k: None)
    # a used --out needs --resume (unchanged run) or --overwrite; unwritable folders fail here, not at step 1000
    resume_from = common.check_out(args, dist_env.main, say)
    logger = common.Logger(args.out, dist_env.main, write=say)

    # ---- data -------------------------------------------------------------------------------------------
    root = args.data or "out/synth"
    if args.data is None and not os.path.isfile(os.path.join(root, "train.csv")):
        raise SystemExit(f"error: no benchmark in {root}; run `python synth.py` first (or pass --data DIR)")
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {root}: no such folder")
    text = not args.without_subtitles
    clips = data.read_split(root, args.train_split, labels_csv=args.train_csv, need_reasons=args.think,
                            subtitles=text)
    if os.path.isfile(os.path.join(root, "val.csv")):
        train_clips, val_clips = clips, data.read_split(root, "val", need_reasons=args.think, subtitles=text)
    else:  # a fixed, seeded hold-out of the training split
        order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(1234)).tolist()
        held = set(order[:args.val_size])
        train_clips = [c for i, c in enumerate(clips) if i not in held]
        val_clips = [c for i, c in enumerate(clips) if i in held]

    # ---- model ------------------------------------------------------------------------------------------
    if resume_from or args.init:
        model = model_lib.load_model(common.resolve_checkpoint(resume_from or args.init), device=dist_env.device)
        check_same_weights(model.cfg, args, resume_from or args.init)
    else:
        cfg = model_lib.ModelConfig.from_preset(args.preset, llm=args.llm, vision=args.vision, audio=args.audio,
                                                train_llm=args.train_llm, seed=args.model_seed,
                                                random_init=args.random_init or None)
        # a random-init LLM gets a tokenizer fitted to the text it trains on (labels, subtitles, reasons)
        model = model_lib.build_model(cfg, device=dist_env.device, init_seed=args.seed,
                                      tokenizer_texts=data.clip_texts(train_clips))
    model.use_sampler(args.compile)  # the held-out evaluation generates
    if args.grad_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = model.cfg
    sizes = model_lib.count_parameters(model)
    say(f"model: preset {cfg.preset}, {sizes['trainable']:,} trainable of "
        f"{sum(v for k, v in sizes.items() if k != 'trainable'):,} parameters ({cfg.train_llm}), "
        f"device {dist_env.device}")

    signals = common.StopFlag()  # from here on Ctrl-C / SIGTERM stop the encoding, or save at a step boundary
    feats, skipped = common.clip_features(model, root, train_clips + val_clips, dist_env, args.feature_cache,
                                          args.use_faces, args.skip_bad_clips, signals)
    if skipped:
        say(f"skipped {len(skipped)} clips with bad media, e.g. {next(iter(skipped.values()))}")
    train_clips = [c for c in train_clips if c.name in feats]
    if not (resume_from or args.init):  # a new projector standardises its inputs with the training features
        media = data.stack_media(feats, [c.name for c in train_clips])
        model.projector.set_feature_stats(media["video"], media["audio"])
    val_clips = [c for c in val_clips if c.name in feats]
    tok = model.tokenizer
    train_ex = [data.tokenize_example(tok, c, args.think, cfg.n_tokens, args.max_length) for c in train_clips]
    val_ex = [data.tokenize_example(tok, c, args.think, cfg.n_tokens, args.max_length) for c in val_clips]
    if args.batch_size % dist_env.world or args.batch_size > len(train_ex):
        raise SystemExit(f"error: --batch_size {args.batch_size} must be a multiple of the {dist_env.world} ranks and "
                         f"at most the {len(train_ex)} training clips")
    steps_per_epoch = len(train_ex) // args.batch_size
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    say(f"data: {root}, {len(train_ex)} train / {len(val_ex)} held-out clips"
        + ("" if os.path.isfile(os.path.join(root, "val.csv")) else " (carved out of the training split: no val.csv)")
        + f", {total} steps of {args.batch_size} clips ({steps_per_epoch} per epoch), think={args.think}; "
        + (f"subtitles: {data.subtitle_count(train_clips + val_clips)}" if text else "without subtitles"))

    # ---- optimiser --------------------------------------------------------------------------------------
    lr = args.lr if args.lr is not None else (3e-3 if cfg.preset == "tiny" else 1e-5)
    optimizer = make_optimizer(model, lr, args.weight_decay, args.projector_lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total))
    start = 0
    if resume_from:
        start = common.load_trainer_state(resume_from, optimizer, scheduler)["step"]
        say(f"resumed from {resume_from} at step {start}")
    ddp_model = model if dist_env.world == 1 else \
        DDP(model, device_ids=[dist_env.local_rank] if dist_env.device.type == "cuda" else None)
    lex = reward.load_lexicon("builtin")

    def save(name):
        if dist_env.main:
            common.save_checkpoint(args.out, name, model, optimizer, scheduler,
                                   {"step": step, "data_position": step * args.batch_size, "args": asdict(args)},
                                   keep_last=args.keep_last)
        common.barrier()

    def run_eval(step):
        metrics = evaluate(model, val_ex, val_clips, feats, args, dist_env, lex, args.micro_batch)
        shown = metrics.pop("examples")
        logger.log(step, metrics, prefix="[eval] ")
        for name, gt, text in shown:
            say(f"  {name}  gt {gt}\n    -> {text}")

    # ---- loop -------------------------------------------------------------------------------------------
    common.start_run(args, dist_env.main, start if resume_from else None)  # all checks passed: --overwrite acts now
    if start == 0 and args.eval_every:
        run_eval(0)  # the starting point, for the curves
    model.train()
    step, t_last, tokens_seen = start, time.time(), 0
    bar = tqdm(total=total, initial=start, desc="sft", disable=not dist_env.main, dynamic_ncols=True)
    while step < total:
        idx = common.global_batch(len(train_ex), args.batch_size, step, args.seed)[dist_env.rank::dist_env.world]
        examples, names = [train_ex[i] for i in idx], [train_clips[i].name for i in idx]
        n_tokens = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
        (global_tokens,) = common.all_reduce_sum([n_tokens], dist_env.device)
        parts = list(micro_batches(examples, names, feats, args.micro_batch, tok.pad_token_id, dist_env.device))
        loss_sum = 0.0
        for j, (batch, media) in enumerate(parts):
            sync = j == len(parts) - 1
            ctx = ddp_model.no_sync() if (dist_env.world > 1 and not sync) else contextlib.nullcontext()
            with ctx, model.autocast():
                s, _ = sft_loss_sum(ddp_model, batch, media)
                # DDP averages gradients over ranks: scale by world so the update is sum / global tokens
                (s * dist_env.world / global_tokens).backward()
            loss_sum += s.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += global_tokens
        bar.update(1)

        if step % args.log_every == 0 or step == total:
            loss, = common.all_reduce_sum([loss_sum], dist_env.device)
            elapsed = time.time() - t_last
            logger.log(step, {"train/loss": loss / global_tokens, "train/lr": scheduler.get_last_lr()[0],
                              "train/grad_norm": float(grad_norm), "perf/tokens_per_s": tokens_seen / elapsed})
            t_last, tokens_seen = time.time(), 0
        if (args.eval_every and step % args.eval_every == 0) or step == total:
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step < total:
            save(f"step_{step:06d}")
        # the last step just finishes: one save (re-saving the step `latest` names is not kill -9 safe)
        if step < total and (signals.check(dist_env.device) or (args.stop_after and step - start >= args.stop_after)):
            save(f"step_{step:06d}")
            say(f"stopped at step {step} of {total}: saved {args.out}/step_{step:06d}; continue with --resume")
            break

    # ---- save -------------------------------------------------------------------------------------------
    bar.close()
    if step == total:
        save(f"step_{step:06d}")
        if dist_env.main:
            common.save_checkpoint(args.out, "final", model, state={"step": step, "args": asdict(args)})
            say(f"done: {args.out}/final")
    common.cleanup_dist()
    if step < total:
        signals.exit()  # stopped by a signal: 128 + its number, so a scheduler does not take the run for finished


if __name__ == "__main__":
    data.exit_on_bad_input(main, common.parse_args(Args))
