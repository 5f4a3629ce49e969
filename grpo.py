"""grpo.py: stage 2, GRPO with the emotion-wheel reward, hand-written and correct to the last mask.

    python grpo.py                                  # tiny preset from out/sft/final, synthetic benchmark, CPU
    torchrun --standalone --nproc_per_node=2 grpo.py
    torchrun --standalone --nproc_per_node=8 grpo.py --init out/sft_paper/final --data /data/MER2025-OV \\
        --out out/grpo_paper --clips_per_step 32 --lr 1e-6 --max_new_tokens 256

The algorithm, per step (../shared/docs/grpo.md has the derivations and the traps):
1. Rollout. Take B clips (whole groups per rank), reuse their cached encoder features, sample G completions
   per clip in one batched call of the unwrapped policy at temperature T (top_p 1, top_k 0: the sampler's
   distribution is the one we score). Mask m_{i,t} = 1 up to AND including the first EOS.
2. Reward. r_i = w_acc * EW(answer_i, gt) * P(n_p, n_g) + w_fmt * format_i (+ w_align * alignment_i
   + w_dual * dual_i), reward.score_completion. Clips whose ground truth maps to no wheel are dropped up front.
3. Advantage (grouped by clip id, never by position): A_i = (r_i - mean_g r) / (std_g r + 1e-4), std the
   population std; a group with std < 1e-6 gets A = 0 (float noise must not become a huge advantage).
   `--adv_scale none` gives Dr. GRPO's A_i = r_i - mean_g r.
4. Loss, per completion token, with l = log pi_theta(o_t | q, o_<t) from logits / T in float32:
       rho = exp(l - l_old),  loss_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
   KL_t to the frozen reference: k3 = r - 1 - log r with r = exp(l_ref - l) (the GRPO paper's estimator,
   whose gradient is that of KL(ref || pi)), or k2 = (l - l_ref)^2 / 2 (gradient of KL(pi || ref)), or
   "k3_value_k2_grad". The logged KL is always k3.
   Aggregation: grpo = mean over completions of the per-completion token mean; token-mean = sum / number of
   tokens; dr_grpo = sum / (completions * max_new_tokens). The normalisers count the whole step (all
   micro-batches, all ranks), so any micro-batch size or world size gives the same gradient.
5. Update: mu passes over the rollout, one optimiser step each. With mu = 1, l_old = l.detach() (rho = 1,
   clipping inert: the policy gradient with a group baseline) and the old log-prob pass is skipped. With
   mu > 1, l_old is computed once before the first pass by the same network in eval mode.

Reference: a frozen copy of the initial policy's trainable tensors (projector and LoRA adapters, or the whole
LLM when it trains in full) that shares every frozen tensor with the policy, so no second copy of the base LLM
exists. When GRPO starts from fresh adapters this is exactly "the same network with adapters disabled"; when it
starts from an SFT checkpoint with trained adapters (our default) it is the SFT policy, as it must be.

Departures from the paper, whose GRPO hyper-parameters are unpublished: G = 8, beta = 0.04 (DeepSeekMath's
value), eps 0.2/0.2, T = 1.0, top_p = 1 (the papers decode with top_p 0.9 at evaluation; sampling and scoring
must agree during RL), format weight 0.5, no length penalty by default (the paper's best reward was
accuracy + format). Dropout is off in every pass (rollout, old, reference and update), so the ratio compares
one function. Truncated completions are kept by default (their missing answer already earns no accuracy);
`--truncated drop` leaves them out of the loss.

Runs: a used OUT needs --resume (flags that alter the run are refused; a larger --max_steps is allowed) or
--overwrite; Ctrl-C or SIGTERM saves, then exits with 128 + the signal (common.check_out, README "Runs").
"""

import contextlib
import copy
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import model as model_lib
import reward

KL_ESTIMATORS = ("k3", "k2", "k3_value_k2_grad")
AGGREGATIONS = ("grpo", "token-mean", "dr_grpo")


@dataclass
class Args:
    # model and data
    init: str = field(default="out/sft", metadata={"help": "SFT checkpoint or run folder to start from"})
    data: str | None = field(default=None, metadata={"help": "OV-MER-layout folder (default: out/synth)"})
    train_split: str = field(default="rl", metadata={"help": "labels CSV DATA/{train_split}.csv (rl: the "
                                                             "cleaner GRPO split; falls back to train)"})
    eval_split: str = field(default="val", metadata={"help": "held-out labels CSV for the greedy evaluation"})
    lexicon: str = field(default="builtin", metadata={"help": "'builtin' or the official wheel folder"})
    think: bool = field(default=True, metadata={"help": "<think> + <answer> format (--no-think: answer only)"})
    use_faces: bool = field(default=False, metadata={"help": "read openface_face/ crops instead of video"})
    skip_bad_clips: bool = field(default=False, metadata={"help": "leave out clips with bad media (counted)"})
    feature_cache: str = field(default="out/features", metadata={"help": "folder for cached encoder features"})
    lora_r: int = field(default=0, metadata={"help": "train fresh LoRA adapters of this rank (alpha = 2r) on "
                                                     "the SFT policy instead of what SFT trained (0: off)"})
    freeze_projector: bool = field(default=False, metadata={"help": "with --lora_r: keep the projector frozen"})
    # rollout
    group_size: int = field(default=8, metadata={"help": "G, completions per clip"})
    clips_per_step: int = field(default=16, metadata={"help": "B, clips per step over all ranks"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (scoring uses the same)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus cut while sampling (1: off, recommended)"})
    top_k: int = field(default=0, metadata={"help": "top-k cut while sampling (0: off, recommended)"})
    max_new_tokens: int = field(default=80, metadata={"help": "completion length limit"})
    truncated: str = field(default="keep", metadata={"help": "completions without EOS: keep | drop (from loss)"})
    # reward
    w_format: float = field(default=0.5, metadata={"help": "format reward weight"})
    w_align: float = field(default=0.0, metadata={"help": "alignment reward weight (think vs answer)"})
    w_dual: float = field(default=0.0, metadata={"help": "dual reward weight (think vs ground truth)"})
    penalty: str = field(default="none", metadata={"help": "length penalty: none | p1 | p2 | p3"})
    accuracy: str = field(default="f1", metadata={"help": "accuracy reward: f1 (per-sample EW-F) | recall "
                                                          "(no precision pressure; shows reward hacking)"})
    level: int = field(default=1, metadata={"help": "emotion-wheel level of the accuracy reward"})
    # loss
    mu: int = field(default=1, metadata={"help": "optimiser steps per rollout batch"})
    eps_low: float = field(default=0.2, metadata={"help": "ratio clip below 1"})
    eps_high: float = field(default=0.2, metadata={"help": "ratio clip above 1"})
    beta: float = field(default=0.04, metadata={"help": "KL weight"})
    kl: str = field(default="k3", metadata={"help": "KL estimator in the loss: k3 | k2 | k3_value_k2_grad"})
    aggregation: str = field(default="grpo", metadata={"help": "grpo | token-mean | dr_grpo"})
    adv_scale: str = field(default="std", metadata={"help": "std (GRPO) | none (Dr. GRPO)"})
    # optimisation
    lr: float | None = field(default=None, metadata={"help": "learning rate (tiny: 2e-4, others: 1e-6)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps, then constant"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    micro_batch: int = field(default=64, metadata={"help": "completions per forward pass per rank"})
    max_steps: int = field(default=60, metadata={"help": "GRPO steps"})
    seed: int = field(default=0, metadata={"help": "data order and sampling (plus the rank)"})
    # logging and checkpoints
    out: str = field(default="out/grpo", metadata={"help": "output folder"})
    log_every: int = field(default=1, metadata={"help": "steps between log lines"})
    show_every: int = field(default=20, metadata={"help": "steps between printed sample completions (0: off)"})
    eval_every: int = field(default=20, metadata={"help": "steps between held-out evaluations (0: ends only)"})
    eval_samples: int = field(default=100, metadata={"help": "held-out clips generated greedily"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints (0: end only)"})
    keep_last: int = field(default=2, metadata={"help": "step checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/latest (flags that change the run "
                                                           "are refused; a larger --max_steps is allowed)"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run in OUT (its checkpoints, logs and "
                                                             "args.json) and start over"})
    stop_after: int = field(default=0, metadata={"help": "save and stop after this many steps (0: off)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)"})


# ----------------------------------------------------------------------------------------------------------
# The algorithm, as small pure functions (tensors in, tensors out)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "std", eps: float = 1e-4,
                     tol: float = 1e-6) -> tuple:
    """A_i = (r_i - mean_g) / (std_g + eps) within each group (population std), or r_i - mean_g for
    scale="none"; groups whose std < tol get A = 0. Returns (advantages (N,), fraction of zero-std groups)."""
    adv = torch.zeros_like(rewards)
    groups = group_ids.unique()
    flat = 0
    for g in groups:
        idx = group_ids == g
        r = rewards[idx]
        std = r.std(unbiased=False) if r.numel() > 1 else r.new_zeros(())
        if std < tol:
            flat += 1
            continue
        adv[idx] = (r - r.mean()) / (std + eps) if scale == "std" else r - r.mean()
    return adv, flat / max(1, len(groups))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> tuple:
    """Per-token KL term for the loss and the k3 value for logging. NOTE: k1 = l - l_ref has zero expected
    gradient, so it is not offered; (l_ref - l) is clamped to +-20 before exp."""
    delta = (ref_logp - logp).clamp(-20, 20)  # log r
    k3 = delta.exp() - 1 - delta
    k2 = 0.5 * delta ** 2
    if estimator == "k3":
        term = k3
    elif estimator == "k2":
        term = k2
    elif estimator == "k3_value_k2_grad":
        term = k2 + (k3 - k2).detach()
    else:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return term, k3.detach()


def clipped_surrogate(logp, old_logp, adv, eps_low, eps_high) -> tuple:
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) per token, and where the clip was active.
    logp, old_logp (N, L); adv (N,)."""
    rho = (logp - old_logp).exp()
    a = adv[:, None]
    unclipped, clipped = rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, kind: str, n_seqs: float, n_tokens: float,
              max_len: int) -> torch.Tensor:
    """This micro-batch's share of the step's loss. n_seqs / n_tokens count the WHOLE step (all micro-batches,
    all ranks): sequences with any unmasked token, and unmasked tokens."""
    masked = per_token * mask
    if kind == "grpo":  # mean over completions of each completion's token mean (DeepSeekMath)
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if kind == "token-mean":  # DAPO: every token of the step weighs the same
        return masked.sum() / n_tokens
    if kind == "dr_grpo":  # a constant normaliser: no length bias
        return masked.sum() / (n_seqs * max_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {kind!r}")


def loss_mask_of(tokens: torch.Tensor, eos_id: int, truncated: str = "keep") -> torch.Tensor:
    """Completion tokens that enter the loss: up to and including the first EOS; rows without EOS (truncated)
    are kept or dropped whole. NOTE: built from EOS positions, never from pad (pad may equal eos)."""
    mask = model_lib.completion_mask(tokens, eos_id)
    if truncated == "drop":
        mask = mask * (tokens == eos_id).any(1, keepdim=True)
    return mask


def frozen_copy(model):
    """The reference policy: a deep copy that shares every frozen tensor with `model` and holds its own frozen
    copies of the trainable ones (projector, adapters, or the full LLM)."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    shared.update({id(b): b for name, b in model.named_buffers() if not name.startswith("projector.")})
    ref = copy.deepcopy(model, memo=shared)
    return ref.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------------
# Rollout and update


@dataclass
class Rollout:
    """One step's samples on this rank. input_ids = [left-padded prompt | completion]; P = prompt width."""
    input_ids: torch.Tensor    # (N, P + L)
    attention: torch.Tensor    # (N, P + L)
    loss_mask: torch.Tensor    # (N, L) completion tokens that enter the loss
    media: dict                # features repeated G times, (N, ...)
    adv: torch.Tensor          # (N,)
    old_logp: torch.Tensor | None  # (N, L) or None when mu == 1
    ref_logp: torch.Tensor     # (N, L)
    prompt_len: int


def completion_logprobs(net, ro: Rollout, rows, temperature: float) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of the completion tokens of rows `rows`, at temperature T: (n, L)."""
    ids, att = ro.input_ids[rows], ro.attention[rows]
    P, L = ro.prompt_len, ro.loss_mask.shape[1]
    targets = torch.full_like(ids, -100)
    # position t predicts token t + 1: the completion token j sits at P + j and is predicted at P + j - 1
    targets[:, P - 1:P + L - 1] = ids[:, P:].masked_fill(att[:, P:] == 0, -100)
    media = {k: v[rows] for k, v in ro.media.items()}
    return net(ids, att, media, targets=targets, temperature=temperature)[:, P - 1:P + L - 1]


def accumulate_gradients(net, model, ro: Rollout, args, n_seqs: float, n_tokens: float, world: int) -> dict:
    """Backward of this rank's share of the step loss, micro-batch by micro-batch (no_sync but the last).
    Returns summed statistics for logging."""
    N = ro.input_ids.shape[0]
    chunks = [torch.arange(i, min(i + args.micro_batch, N)) for i in range(0, N, args.micro_batch)]
    stats = {"loss": 0.0, "pg": 0.0, "kl_loss": 0.0, "clip": 0.0}
    for j, rows in enumerate(chunks):
        sync = j == len(chunks) - 1
        ctx = net.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
        with ctx, model.autocast():
            logp = completion_logprobs(net, ro, rows, args.temperature)
            mask = ro.loss_mask[rows].float()
            old = logp.detach() if ro.old_logp is None else ro.old_logp[rows]
            pg, clipped = clipped_surrogate(logp, old, ro.adv[rows], args.eps_low, args.eps_high)
            kl_term, _ = kl_penalty(logp, ro.ref_logp[rows], args.kl)
            parts = [aggregate(x, mask, args.aggregation, n_seqs, n_tokens, args.max_new_tokens)
                     for x in (pg, kl_term)]
            loss = parts[0] + args.beta * parts[1]
            # DDP averages gradients over ranks; the normalisers already count all ranks
            (loss * world).backward()
        stats["loss"] += loss.item()
        stats["pg"] += parts[0].item()
        stats["kl_loss"] += parts[1].item()
        stats["clip"] += (clipped * mask).sum().item()
    return stats


@torch.no_grad()
def rollout(model, ref, clips, feats, args, lex, generator) -> tuple:
    """Sample G completions per clip, score them, and build the Rollout plus per-completion records."""
    G, tok = args.group_size, model.tokenizer
    t0 = time.time()
    model.eval()
    prompts = data.collate_prompts(tok, [c.subtitle for c in clips], args.think, model.cfg.n_tokens)
    media = {k: v.repeat_interleave(G, 0).to(model.device)
             for k, v in data.stack_media(feats, [c.name for c in clips]).items()}
    ids = prompts["input_ids"].repeat_interleave(G, 0).to(model.device)
    att = prompts["attention_mask"].repeat_interleave(G, 0).to(model.device)
    with model.autocast():
        tokens, sample_logp, entropy = model.generate(ids, att, media, args.max_new_tokens, args.temperature,
                                                      args.top_p, args.top_k, generator=generator,
                                                      return_stats=True)
    t_gen = time.time()
    mask = model_lib.completion_mask(tokens, tok.eos_token_id)  # attention: everything up to the first EOS
    truncated = ~(tokens == tok.eos_token_id).any(1)
    texts = tok.batch_decode(tokens, skip_special_tokens=True)
    scores = [reward.score_completion(t, clips[i // G].labels, lex, think=args.think, penalty=args.penalty,
                                      w_format=args.w_format, w_align=args.w_align, w_dual=args.w_dual,
                                      level=args.level, accuracy=args.accuracy) for i, t in enumerate(texts)]
    t_rew = time.time()
    rewards = torch.tensor([s["total"] for s in scores], dtype=torch.float32, device=model.device)
    group_ids = torch.arange(len(clips), device=model.device).repeat_interleave(G)
    adv, flat = group_advantages(rewards, group_ids, args.adv_scale)
    ro = Rollout(torch.cat([ids, tokens], 1), torch.cat([att, mask], 1),
                 loss_mask_of(tokens, tok.eos_token_id, args.truncated), media, adv, None, None, ids.shape[1])
    chunks = [torch.arange(i, min(i + args.micro_batch, len(ids)), device=model.device)
              for i in range(0, len(ids), args.micro_batch)]
    with model.autocast():
        if args.mu > 1:  # l_old once, by the policy itself, before any update
            ro.old_logp = torch.cat([completion_logprobs(model, ro, rows, args.temperature) for rows in chunks])
        ro.ref_logp = torch.cat([completion_logprobs(ref, ro, rows, args.temperature) for rows in chunks])
    info = {"rewards": rewards, "scores": scores, "texts": texts, "mask": mask, "truncated": truncated,
            "entropy": entropy, "sample_logp": sample_logp, "flat_groups": flat,
            "time": {"generate": t_gen - t0, "reward": t_rew - t_gen, "reference": time.time() - t_rew}}
    return ro, info


def step_metrics(ro: Rollout, info: dict, stats: dict, d, args) -> dict:
    """All-reduced metrics of one step (sums over ranks, then means)."""
    s, m = info["scores"], info["mask"].float()
    comp = ["accuracy", "format", "length_penalty", "alignment", "dual", "n_pred"]
    lengths = m.sum(1)
    ref_k3 = kl_penalty(info["sample_logp"], ro.ref_logp)[1] * m  # k3 at the sampled tokens, per token
    local = [len(s), sum(x["total"] for x in s), sum(x["total"] ** 2 for x in s)]
    local += [sum(x[k] for x in s) for k in comp]
    local += [m.sum().item(), ref_k3.sum().item(), (info["entropy"] * m).sum().item(),
              -(info["sample_logp"] * m).sum().item(), info["truncated"].float().sum().item(),
              info["flat_groups"], 1.0, stats["clip"], stats["loss"], stats["pg"], stats["kl_loss"],
              ro.loss_mask.sum().item()]
    tot = common.all_reduce_sum(local, d.device)
    n, tokens = tot[0], max(1.0, tot[3 + len(comp)])
    mean = tot[1] / n
    out = {"reward/total": mean, "reward/total_std": max(0.0, tot[2] / n - mean ** 2) ** 0.5}
    out.update({f"reward/{k}": tot[3 + i] / n for i, k in enumerate(comp)})
    out["rollout/n_labels"] = out.pop("reward/n_pred")
    i = 3 + len(comp)
    out.update({"train/kl": tot[i + 1] / tokens, "rollout/entropy": tot[i + 2] / tokens,
                "rollout/nll": tot[i + 3] / tokens, "rollout/truncated": tot[i + 4] / n,
                "rollout/zero_std_groups": tot[i + 5] / tot[i + 6],
                "train/clip_fraction": tot[i + 7] / max(1.0, tot[i + 11]),  # of the tokens in the loss
                "train/loss": tot[i + 8], "train/pg_loss": tot[i + 9], "train/kl_loss": tot[i + 10],
                "rollout/length_mean": tokens / n,
                "rollout/length_max": common.all_reduce_max(lengths.max().item(), d.device)})
    return out


@torch.no_grad()
def evaluate(model, clips, feats, args, d, lex) -> dict:
    """Greedy decoding on held-out clips (sharded over ranks): EW-F, format rate, mean label count."""
    out = common.complete_sharded(model, clips, feats, d, think=args.think, max_new_tokens=args.max_new_tokens,
                                  greedy=True)
    completions = {name: texts[0] for name, texts in out.items()}
    return reward.summarize_completions(completions, {c.name: c.labels for c in clips}, lex, args.think, args.level)


def check_args(args: Args):
    problems = []
    for name, allowed in (("kl", KL_ESTIMATORS), ("aggregation", AGGREGATIONS), ("adv_scale", ("std", "none")),
                          ("truncated", ("keep", "drop")), ("penalty", reward.PENALTIES),
                          ("accuracy", tuple(reward.ACCURACY))):
        if getattr(args, name) not in allowed:
            problems.append(f"--{name} {getattr(args, name)!r}: choose one of {', '.join(allowed)}")
    for name in ("group_size", "clips_per_step", "mu", "micro_batch", "max_new_tokens", "log_every"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if args.group_size < 2:
        problems.append("--group_size must be at least 2 (a group of one has no baseline)")
    if args.temperature <= 0:
        problems.append("--temperature must be > 0")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------


def main(args: Args):
    # ---- setup ------------------------------------------------------------------------------------------
    from tqdm import tqdm
    check_args(args)
    d = common.setup_dist(args.device)
    common.seed_everything(args.seed)
    say = tqdm.write if d.main else (lambda *a, **k: None)
    # a used --out needs --resume (unchanged run, or more steps) or --overwrite; unwritable folders fail here
    resume_from = common.check_out(args, d.main, say, grow=("max_steps",))
    logger = common.Logger(args.out, d.main, write=say)
    try:
        init = common.resolve_checkpoint(args.init)
    except FileNotFoundError:
        raise SystemExit(f"error: no SFT checkpoint at {args.init}; run `python sft.py` first "
                         f"(or pass --init PATH)") from None

    # ---- model: the policy, and the reference = the initial policy ----------------------------------------
    model = model_lib.load_model(init, device=d.device)
    if args.lora_r:  # fresh adapters on the SFT policy; then the reference is "adapters disabled"
        torch.manual_seed(args.seed)
        model_lib.add_lora(model, args.lora_r, 2.0 * args.lora_r, train_projector=not args.freeze_projector)
    ref = frozen_copy(model)
    if resume_from:
        model_lib.load_trainable(model, resume_from)
    cfg = model.cfg

    # ---- data -------------------------------------------------------------------------------------------
    root = args.data or "out/synth"
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {root}: no such folder")
    lex = reward.load_lexicon(args.lexicon)
    split = args.train_split
    if split == "rl" and not os.path.isfile(os.path.join(root, "rl.csv")):
        split = "train"  # datasets without a separate RL split train on their training split
    train = data.read_split(root, split)
    no_signal = [c for c in train if reward.ew_score(reward.parse_labels(c.labels), reward.parse_labels(c.labels),
                                                     lex, args.level) is None]
    train = [c for c in train if c not in no_signal]
    held = data.read_split(root, args.eval_split)[:args.eval_samples] \
        if os.path.isfile(os.path.join(root, f"{args.eval_split}.csv")) else []
    ds = data.ClipDataset(root, train + held, cfg.n_frames, model.image_size, cfg.audio_clips, cfg.clip_seconds,
                          args.use_faces, args.skip_bad_clips)
    stop = common.StopFlag()  # from here on Ctrl-C / SIGTERM stop the encoding, or save at a step boundary
    feats = common.cached_features(model, ds, args.feature_cache, d, skip_bad=args.skip_bad_clips, stop=stop)
    train = [c for c in train if c.name in feats]
    held = [c for c in held if c.name in feats]
    if args.clips_per_step % d.world or args.clips_per_step > len(train):
        raise SystemExit(f"error: --clips_per_step {args.clips_per_step} must be a multiple of the {d.world} ranks "
                         f"and at most the {len(train)} usable training clips")
    say(f"GRPO from {init}: {len(train)} clips of {split}.csv ({len(no_signal)} dropped: ground truth maps to no "
        f"wheel; {len(ds.skipped)} bad media), {len(held)} held-out, {args.max_steps} steps of "
        f"{args.clips_per_step} clips x G={args.group_size}; mu={args.mu}"
        + (" (old log-probs skipped: rho = 1)" if args.mu == 1 else ""))

    # ---- optimiser --------------------------------------------------------------------------------------
    lr = args.lr if args.lr is not None else (2e-4 if cfg.preset == "tiny" else 1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    start = common.load_trainer_state(resume_from, optimizer, scheduler)["step"] if resume_from else 0
    if resume_from:
        say(f"resumed from {resume_from} at step {start}")
    net = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world > 1 else model

    def save(name, step):
        if d.main:
            common.save_checkpoint(args.out, name, model, optimizer, scheduler,
                                   {"step": step, "data_position": step * args.clips_per_step, "init": init,
                                    "args": asdict(args)}, keep_last=args.keep_last)
        common.barrier()

    def run_eval(step):
        if held:
            logger.log(step, evaluate(model, held, feats, args, d, lex), prefix="[eval] ")

    # ---- loop -------------------------------------------------------------------------------------------
    common.start_run(args, d.main, start if resume_from else None)  # all checks passed: --overwrite acts now
    if start == 0:
        run_eval(0)
    bar = tqdm(total=args.max_steps, initial=start, desc="grpo", disable=not d.main, dynamic_ncols=True)
    step = start
    while step < args.max_steps:
        t0 = time.time()
        # rollout: whole groups per rank; the sampler is seeded by (seed, step, rank), so resuming needs no state
        idx = common.global_batch(len(train), args.clips_per_step, step, args.seed)[d.rank::d.world]
        gen = torch.Generator(d.device).manual_seed(args.seed * 1_000_003 + step * 1009 + d.rank)
        ro, info = rollout(model, ref, [train[i] for i in idx], feats, args, lex, gen)
        # the step's normalisers, counted over all ranks
        n_seqs, n_tokens = common.all_reduce_sum([float((ro.loss_mask.sum(1) > 0).sum()),
                                                  float(ro.loss_mask.sum())], d.device)
        t_update = time.time()
        stats = {}
        for _ in range(args.mu):
            stats = accumulate_gradients(net, model, ro, args, max(1.0, n_seqs), max(1.0, n_tokens), d.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.max_steps:
            metrics = step_metrics(ro, info, stats, d, args)
            elapsed = time.time() - t0
            n_done = args.clips_per_step * args.group_size
            metrics.update({"train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                            "perf/step_time": elapsed, "perf/samples_per_s": n_done / elapsed,
                            "perf/gen_tokens_per_s": metrics["rollout/length_mean"] * n_done
                            / max(1e-9, info["time"]["generate"]),
                            **{f"perf/{k}_time": v for k, v in info["time"].items()},
                            "perf/update_time": time.time() - t_update})
            logger.log(step, metrics)
        if args.show_every and step % args.show_every == 0:
            for i in range(min(2, len(info["texts"]))):
                s = info["scores"][i]
                say(f"  sample of {train[idx[0]].name} (gt {train[idx[0]].labels}): {info['texts'][i]!r}\n"
                    f"    reward {s['total']:.3f} = acc {s['accuracy']:.3f} x pen {s['length_penalty']:.2f} "
                    f"+ {args.w_format} x format {s['format']:.0f}; answer {s['answer']}")
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save(f"step_{step:06d}", step)
        # the last step just finishes: one save (re-saving the step `latest` names is not kill -9 safe)
        if step < args.max_steps and (stop.check(d.device) or (args.stop_after and step - start >= args.stop_after)):
            save(f"step_{step:06d}", step)
            say(f"stopped at step {step} of {args.max_steps}: saved {args.out}/step_{step:06d}; continue with --resume")
            break

    # ---- save -------------------------------------------------------------------------------------------
    bar.close()
    if step == args.max_steps:
        save(f"step_{step:06d}", step)
        if d.main:
            common.save_checkpoint(args.out, "final", model, state={"step": step, "args": asdict(args)})
            say(f"done: {args.out}/final")
    common.cleanup_dist()
    if step < args.max_steps:
        stop.exit()  # stopped by a signal: 128 + its number, so a scheduler does not take the run for finished


if __name__ == "__main__":
    data.exit_on_bad_input(main, common.parse_args(Args))
