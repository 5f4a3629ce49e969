"""grpo.py: stage 2, GRPO with the emotion-wheel reward, hand-written and correct to the last mask.

    python grpo.py                                  # tiny preset from out/sft/final, synthetic benchmark, CPU
    torchrun --standalone --nproc_per_node=2 grpo.py
    torchrun --standalone --nproc_per_node=8 grpo.py --init out/sft_paper/final --data /data/MER2025-OV \\
        --out out/grpo_paper --clips_per_step 32 --lr 1e-6 --max_new_tokens 256

A step has five parts, in this order in `main` and in this file (docs/grpo.md derives the formulas):
1. Rollout: G completions per clip (whole groups per rank, cached encoder features) in one batched call of the
   policy, drawn from softmax(logits / T) with no top-p / top-k cut, so that the sampled distribution is the
   scored one. A completion's tokens run up to AND including its first EOS.
2. Reward: r_i = w_acc * EW(answer_i, gt) * P(n_p, n_g) + w_fmt * format_i (+ w_align * alignment_i + w_dual *
   dual_i), reward.score_completion. Clips whose ground truth maps to no wheel are dropped up front.
3. Advantage, grouped by clip id: A_i = (r_i - mean_g r) / (std_g r + 1e-4) (population std), A = 0 for a group
   with std < 1e-6; `--adv_scale none` gives Dr. GRPO's A_i = r_i - mean_g r.
4. Reference (and old) log-probs, once per rollout: l_ref by the reference, model.frozen_copy of the initial
   (SFT) policy; with mu > 1, l_old by the policy before its first update (mu = 1: l_old = l.detach(), rho = 1).
5. Update: mu passes, one optimiser step each, on the per-token loss (l from logits / T, in float32)
       rho = exp(l - l_old),  loss_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
   with KL_t = k3 = r - 1 - log r, r = exp(l_ref - l) (the paper's; gradient of KL(ref || pi)), or
   k2 = (l - l_ref)^2 / 2 (gradient of KL(pi || ref)), or "k3_value_k2_grad"; the logged KL is k3. Aggregation:
   grpo = mean over completions of each one's token mean; token-mean = sum / loss tokens; dr_grpo = sum /
   (completions * max_new_tokens). The normalisers count the whole step (all micro-batches and ranks), so any
   micro-batch size or world size gives the same gradient.

Departures from the paper, whose GRPO hyper-parameters are unpublished: G = 8, beta = 0.04 (DeepSeekMath's),
eps 0.2/0.2, T = 1, no top-p / top-k cut while sampling (the papers decode with top_p 0.9 at evaluation; in RL
the sampled and scored distributions must agree, so GRPO refuses a cut), format weight 0.5, no length penalty by
default (the paper's best reward was accuracy + format). Dropout is off in every pass, so the ratio compares one
function. Truncated completions are kept by default (their missing answer earns no accuracy); `--truncated drop`
gives them no loss token, but they still count as completions in the normalisers (as in TRL), so dropping does
not rescale the loss. The learning-rate warm-up counts optimiser steps (mu per GRPO step).

Runs: a used OUT needs --resume (flags that alter the run are refused; a larger --max_steps is allowed) or
--overwrite; Ctrl-C or SIGTERM saves, then exits with 128 + the signal (common.check_out, README "Runs").
"""

import contextlib
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
REWARD_PARTS = ("accuracy", "format", "length_penalty", "alignment", "dual")  # logged, from score_completion
LOSS_SETTINGS = ("temperature", "eps_low", "eps_high", "beta", "kl", "aggregation", "max_new_tokens", "micro_batch")


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
    without_subtitles: bool = field(default=False, metadata={"help": "no text modality: read no subtitle file "
                                                                     "(without it, a missing one is an error)"})
    skip_bad_clips: bool = field(default=False, metadata={"help": "leave out clips with bad media (counted)"})
    feature_cache: str = field(default="out/features", metadata={"help": "folder for cached encoder features"})
    lora_r: int = field(default=0, metadata={"help": "train fresh LoRA adapters of this rank (alpha = 2r) on "
                                                     "the SFT policy instead of what SFT trained (0: off)"})
    freeze_projector: bool = field(default=False, metadata={"help": "with --lora_r: keep the projector frozen"})
    # rollout
    group_size: int = field(default=8, metadata={"help": "G, completions per clip"})
    clips_per_step: int = field(default=16, metadata={"help": "B, clips per step over all ranks"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (scoring uses the same)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus cut: GRPO accepts only 1 (it scores no cut)"})
    top_k: int = field(default=0, metadata={"help": "top-k cut: GRPO accepts only 0 (it scores no cut)"})
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
    mu: int = field(default=1, metadata={"help": "optimiser steps per rollout (logs average over them)"})
    eps_low: float = field(default=0.2, metadata={"help": "ratio clip below 1"})
    eps_high: float = field(default=0.2, metadata={"help": "ratio clip above 1"})
    beta: float = field(default=0.04, metadata={"help": "KL weight"})
    kl: str = field(default="k3", metadata={"help": "KL estimator in the loss: k3 | k2 | k3_value_k2_grad"})
    aggregation: str = field(default="grpo", metadata={"help": "grpo | token-mean | dr_grpo"})
    adv_scale: str = field(default="std", metadata={"help": "std (GRPO) | none (Dr. GRPO)"})
    # optimisation
    lr: float | None = field(default=None, metadata={"help": "learning rate (tiny: 2e-4, others: 1e-6)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up optimiser steps (mu a step)"})
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
    compile: bool | None = field(default=None, metadata={"help": "true | false: sample with the compiled static "
                                                          "KV-cache decode step (default: true with CUDA)"})


# ----------------------------------------------------------------------------------------------------------
# 1. Rollout: sampling only


@dataclass
class Samples:
    """This rank's G completions per clip, drawn from softmax(logits / T) of the policy."""
    input_ids: torch.Tensor    # (N, P + L) [left-padded prompt | completion], N = G x this rank's clips
    attention: torch.Tensor    # (N, P + L) 1 on prompt tokens and on completion tokens up to the first EOS
    media: dict                # encoder features repeated G times, each (N, ...)
    prompt_len: int            # P
    sample_logp: torch.Tensor  # (N, L) log-probs of the drawn tokens under the sampler, 0 after the first EOS
    entropy: torch.Tensor      # (N, L) entropy of the sampler's distribution, 0 after the first EOS
    truncated: torch.Tensor    # (N,) bool: no EOS within max_new_tokens
    texts: list                # N decoded completions
    seconds: float             # generation time


@torch.no_grad()
def rollout(model, clips, feats, group_size: int, think: bool, max_new_tokens: int, temperature: float,
            generator) -> Samples:
    """G completions for each clip in one batched call of the (unwrapped) policy."""
    t0, G = time.time(), group_size
    model.eval()  # NOTE: dropout off, so that the sampler, l_old, l_ref and the update see one function
    prompts = data.collate_prompts(model.tokenizer, [c.subtitle for c in clips], think, model.cfg.n_tokens)
    # each clip's features are encoded once (cached) and repeated for its G samples: (B, ...) -> (B*G, ...)
    media = {k: v.repeat_interleave(G, 0).to(model.device)
             for k, v in data.stack_media(feats, [c.name for c in clips]).items()}
    ids = prompts["input_ids"].repeat_interleave(G, 0).to(model.device)        # (B*G, P), left-padded
    att = prompts["attention_mask"].repeat_interleave(G, 0).to(model.device)   # (B*G, P)
    with model.autocast():  # no top-p / top-k cut: the distribution we sample is the one the loss scores
        tokens, sample_logp, entropy = model.generate(ids, att, media, max_new_tokens, temperature,
                                                      generator=generator, return_stats=True)  # (B*G, L) x 3
    # the completion's attention covers everything up to and including the first stop token (any of the LM's
    # stop ids; pad may be one of them)
    stop = model.stop_ids
    mask = model_lib.completion_mask(tokens, stop)
    return Samples(input_ids=torch.cat([ids, tokens], 1), attention=torch.cat([att, mask], 1), media=media,
                   prompt_len=ids.shape[1], sample_logp=sample_logp, entropy=entropy,
                   truncated=~torch.isin(tokens, torch.tensor(stop, device=tokens.device)).any(1),
                   texts=model.completion_texts(tokens),  # the reward sees the text before the stop token
                   seconds=time.time() - t0)


# ----------------------------------------------------------------------------------------------------------
# 2. Reward: reward.score_completion, called in main
# 3. Advantages


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "std", eps: float = 1e-4,
                     tol: float = 1e-6) -> tuple:
    """A_i = (r_i - mean_g) / (std_g + eps) within each group (population std), or r_i - mean_g for
    scale="none"; groups whose std < tol get A = 0. Returns (advantages (N,), fraction of zero-std groups)."""
    adv = torch.zeros_like(rewards)
    groups = group_ids.unique()
    flat = 0
    for g in groups:
        idx = group_ids == g  # by id: a shuffled batch still normalises each clip's own samples
        r = rewards[idx]
        std = r.std(unbiased=False) if r.numel() > 1 else r.new_zeros(())
        if std < tol:  # every sample scored the same: no signal, and (r - mean) / eps would amplify noise
            flat += 1
            continue
        adv[idx] = (r - r.mean()) / (std + eps) if scale == "std" else r - r.mean()
    return adv, flat / max(1, len(groups))


# ----------------------------------------------------------------------------------------------------------
# 4. Log-probs of the sampled completions (reference, old, and the update's own)


def completion_logprobs(net, input_ids, attention, media, prompt_len: int, temperature: float) -> torch.Tensor:
    """log pi(o_t | q, o_<t) at temperature T of every completion token, 0 where attention is 0.
    input_ids, attention (n, P + L); media (n, ...) -> (n, L) float32."""
    P = prompt_len
    targets = torch.full_like(input_ids, -100)  # -100: this position predicts nothing we score
    # position t predicts token t + 1: completion token j sits at P + j and is predicted at P + j - 1
    targets[:, P - 1:-1] = input_ids[:, P:].masked_fill(attention[:, P:] == 0, -100)
    return net(input_ids, attention, media, targets=targets, temperature=temperature)[:, P - 1:-1]


@torch.no_grad()
def score_samples(net, s: Samples, temperature: float, micro_batch: int) -> torch.Tensor:
    """completion_logprobs of all of this rank's samples, micro-batch by micro-batch, without gradients: (N, L)."""
    net.eval()
    parts = []
    for i in range(0, s.input_ids.shape[0], micro_batch):
        rows = slice(i, i + micro_batch)
        with net.autocast():
            parts.append(completion_logprobs(net, s.input_ids[rows], s.attention[rows],
                                             {k: v[rows] for k, v in s.media.items()}, s.prompt_len, temperature))
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------------
# 5. Update: the per-token loss, its aggregation, and the micro-batched backward


def loss_mask_of(tokens: torch.Tensor, stop_ids, truncated: str = "keep") -> torch.Tensor:
    """Completion tokens that enter the loss: up to and including the first stop token (any of `stop_ids`);
    rows without one (truncated) are kept or dropped whole. NOTE: built from stop positions, never from pad
    (pad may be a stop id). tokens (N, L) -> (N, L)."""
    mask = model_lib.completion_mask(tokens, stop_ids)
    if truncated == "drop":
        mask = mask * torch.isin(tokens, torch.as_tensor(stop_ids, device=tokens.device)).any(1, keepdim=True)
    return mask


def clipped_surrogate(logp, old_logp, adv, eps_low, eps_high) -> tuple:
    """-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) per token, and where the clip was active.
    logp, old_logp (N, L); adv (N,) -> (N, L), (N, L)."""
    rho = (logp - old_logp).exp()
    a = adv[:, None]
    unclipped, clipped = rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a
    # the min keeps the pessimistic term: a clipped token (clipped < unclipped) gets no gradient
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> tuple:
    """Per-token KL term for the loss and the k3 value for logging, both (N, L). NOTE: k1 = l - l_ref has zero
    expected gradient, so it is not offered."""
    log_r = ref_logp - logp  # log(pi_ref / pi) at the sampled token
    # NOTE: only exp's argument is capped (e^20 stays finite in float32) and the cap passes the gradient through:
    # clamping log_r itself would zero the KL gradient on exactly the most divergent tokens
    capped = log_r + (log_r.clamp(max=20.0) - log_r).detach()
    k3 = capped.exp() - 1 - log_r
    k2 = 0.5 * log_r ** 2  # a polynomial: nothing to guard
    if estimator == "k3":
        term = k3
    elif estimator == "k2":
        term = k2
    elif estimator == "k3_value_k2_grad":
        term = k2 + (k3 - k2).detach()
    else:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return term, k3.detach()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, kind: str, n_seqs: float, n_tokens: float,
              max_len: int) -> torch.Tensor:
    """This micro-batch's share of the step's loss. n_seqs / n_tokens count the WHOLE step (all micro-batches,
    all ranks): every completion (also those without a loss token), and the loss tokens. per_token, mask (n, L)."""
    masked = per_token * mask
    if kind == "grpo":  # mean over completions of each completion's token mean (DeepSeekMath)
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if kind == "token-mean":  # DAPO: every token of the step weighs the same
        return masked.sum() / n_tokens
    if kind == "dr_grpo":  # a constant normaliser (max_new_tokens, not this batch's width): no length bias
        return masked.sum() / (n_seqs * max_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {kind!r}")


@dataclass
class Rollout:
    """Everything one update needs from a step's samples on this rank; fixed during the mu passes."""
    input_ids: torch.Tensor        # (N, P + L)
    attention: torch.Tensor        # (N, P + L)
    media: dict                    # (N, ...)
    prompt_len: int                # P
    loss_mask: torch.Tensor        # (N, L) completion tokens that enter the loss
    adv: torch.Tensor              # (N,)
    ref_logp: torch.Tensor         # (N, L)
    old_logp: torch.Tensor | None  # (N, L), or None when mu == 1 (then l_old = l.detach())


def step_normalisers(ro: Rollout, device) -> tuple:
    """(completions, loss tokens) of the whole step, over all ranks: grpo's and dr_grpo's completion count
    includes completions without a loss token (--truncated drop), as in TRL, so dropping does not rescale."""
    n_seqs, n_tokens = common.all_reduce_sum([ro.loss_mask.shape[0], ro.loss_mask.sum().item()], device)
    return n_seqs, max(1.0, n_tokens)


@dataclass
class PassStats:
    """One pass over the rollout on this rank: its share of the step's loss terms, and clipped tokens."""
    loss: float = 0.0
    pg_loss: float = 0.0
    kl_loss: float = 0.0
    clipped: float = 0.0
    grad_norm: float = 0.0  # set after the backward, over all ranks


def accumulate_gradients(net, model, ro: Rollout, n_seqs: float, n_tokens: float, world: int, *, temperature,
                         eps_low, eps_high, beta, kl, aggregation, max_new_tokens, micro_batch) -> PassStats:
    """Backward of this rank's share of the step loss, micro-batch by micro-batch (no_sync but the last).
    The keywords are the Args of the same names (LOSS_SETTINGS)."""
    N = ro.input_ids.shape[0]
    stats = PassStats()
    model.eval()  # NOTE: dropout stays off in the update too, so rho compares the same function
    for start in range(0, N, micro_batch):
        rows = slice(start, start + micro_batch)
        # DDP all-reduces gradients on the last micro-batch only; the others accumulate locally
        last = start + micro_batch >= N
        sync = contextlib.nullcontext() if (world == 1 or last) else net.no_sync()
        with sync, model.autocast():
            logp = completion_logprobs(net, ro.input_ids[rows], ro.attention[rows],
                                       {k: v[rows] for k, v in ro.media.items()}, ro.prompt_len,
                                       temperature)  # (n, L)
            mask = ro.loss_mask[rows].float()  # (n, L)
            # mu == 1: l_old is l itself, so rho = 1 and the gradient is the plain policy gradient
            old = logp.detach() if ro.old_logp is None else ro.old_logp[rows]
            pg, clipped = clipped_surrogate(logp, old, ro.adv[rows], eps_low, eps_high)
            kl_term, _ = kl_penalty(logp, ro.ref_logp[rows], kl)
            pg_part, kl_part = [aggregate(x, mask, aggregation, n_seqs, n_tokens, max_new_tokens)
                                for x in (pg, kl_term)]
            total = pg_part + beta * kl_part
            # DDP averages gradients over ranks; the normalisers already count all ranks, so undo the average
            (total * world).backward()
        stats.loss += total.item()
        stats.pg_loss += pg_part.item()
        stats.kl_loss += kl_part.item()
        stats.clipped += (clipped * mask).sum().item()
    return stats


# ----------------------------------------------------------------------------------------------------------
# Logging and arguments


def step_metrics(s: Samples, ro: Rollout, scores: list, flat_groups: float, passes: list, device) -> dict:
    """Metrics of one step: sums over this rank by name, all-reduced, then turned into means."""
    m = s.attention[:, s.prompt_len:].float()  # (N, L) generated tokens up to the first EOS
    k3 = kl_penalty(s.sample_logp, ro.ref_logp)[1] * m  # (N, L) k3 at the sampled tokens
    local = {"completions": len(scores), "reward": sum(x["total"] for x in scores),
             "reward_sq": sum(x["total"] ** 2 for x in scores), "labels": sum(x["n_pred"] for x in scores),
             **{k: sum(x[k] for x in scores) for k in REWARD_PARTS},
             "tokens": m.sum().item(), "kl": k3.sum().item(), "entropy": (s.entropy * m).sum().item(),
             "nll": -(s.sample_logp * m).sum().item(), "truncated": s.truncated.sum().item(),
             "zero_std_groups": flat_groups, "ranks": 1.0,
             "loss_tokens": ro.loss_mask.sum().item() * len(passes),  # every pass sees every loss token
             **{k: sum(getattr(p, k) for p in passes) for k in ("loss", "pg_loss", "kl_loss", "clipped")}}
    tot = dict(zip(local, common.all_reduce_sum([float(v) for v in local.values()], device)))
    n, tokens, mean = tot["completions"], max(1.0, tot["tokens"]), tot["reward"] / tot["completions"]
    return {"reward/total": mean, "reward/total_std": max(0.0, tot["reward_sq"] / n - mean ** 2) ** 0.5,
            **{f"reward/{k}": tot[k] / n for k in REWARD_PARTS},
            "rollout/n_labels": tot["labels"] / n,
            "train/kl": tot["kl"] / tokens, "rollout/entropy": tot["entropy"] / tokens,
            "rollout/nll": tot["nll"] / tokens, "rollout/truncated": tot["truncated"] / n,
            "rollout/zero_std_groups": tot["zero_std_groups"] / tot["ranks"],  # every rank holds as many groups
            # the loss terms are means over the mu passes; the clip fraction is over all passes' loss tokens
            "train/loss": tot["loss"] / len(passes), "train/pg_loss": tot["pg_loss"] / len(passes),
            "train/kl_loss": tot["kl_loss"] / len(passes),
            "train/clip_fraction": tot["clipped"] / max(1.0, tot["loss_tokens"]),
            "train/grad_norm": sum(p.grad_norm for p in passes) / len(passes),
            "rollout/length_mean": tokens / n,
            "rollout/length_max": common.all_reduce_max(m.sum(1).max().item(), device)}


def check_args(args: Args):
    """Refuse bad arguments before any work, with one message naming every bad flag."""
    problems = []
    for name, allowed in (("kl", KL_ESTIMATORS), ("aggregation", AGGREGATIONS), ("adv_scale", ("std", "none")),
                          ("truncated", ("keep", "drop")), ("penalty", reward.PENALTIES),
                          ("accuracy", tuple(reward.ACCURACY))):
        if getattr(args, name) not in allowed:
            problems.append(f"--{name} {getattr(args, name)!r}: choose one of {', '.join(allowed)}")
    if args.group_size < 2:
        problems.append(f"--group_size {args.group_size}: must be at least 2 (a group of one has no baseline)")
    problems += common.at_least(args, 1, "clips_per_step", "mu", "micro_batch", "max_new_tokens", "log_every")
    problems += common.at_least(args, 0, "lora_r", "max_steps", "warmup_steps", "eval_every", "eval_samples",
                                "save_every", "show_every", "keep_last", "stop_after", "weight_decay", "grad_clip",
                                "eps_low", "eps_high", "beta")
    problems += common.positive(args, "lr", "temperature")
    if args.level not in (1, 2):
        problems.append(f"--level {args.level}: choose 1 or 2")
    if args.top_p != 1.0 or args.top_k != 0:  # the loss scores softmax(logits / T): sampling must not cut it
        problems.append(f"--top_p {args.top_p} --top_k {args.top_k}: GRPO samples without a cut (top_p 1, top_k 0), "
                        f"as the loss scores the uncut distribution (use --temperature to sharpen)")
    problems += common.check_device(args.device)
    root = args.data or "out/synth"  # a held-out split named on purpose must exist (the default may not)
    if args.eval_split != "val" and os.path.isdir(root) and not os.path.isfile(f"{root}/{args.eval_split}.csv"):
        problems.append(f"--eval_split {args.eval_split}: no {args.eval_split}.csv in {root}")
    common.refuse(problems)


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
    loss_settings = {k: getattr(args, k) for k in LOSS_SETTINGS}
    reward_settings = dict(think=args.think, penalty=args.penalty, w_format=args.w_format, w_align=args.w_align,
                           w_dual=args.w_dual, level=args.level, accuracy=args.accuracy)

    # ---- model: the policy, and the reference = the initial policy ----------------------------------------
    model = model_lib.load_model(init, device=d.device)
    if args.lora_r:  # fresh adapters on the SFT policy; then the reference is "adapters disabled"
        torch.manual_seed(args.seed)
        model_lib.add_lora(model, args.lora_r, 2.0 * args.lora_r, train_projector=not args.freeze_projector)
    ref = model_lib.frozen_copy(model)
    model.compile_sampler(args.compile)  # the policy generates; the reference only scores
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
    train = data.read_split(root, split, subtitles=not args.without_subtitles)
    no_signal = [c for c in train if reward.ew_score(reward.parse_labels(c.labels), reward.parse_labels(c.labels),
                                                     lex, args.level) is None]
    train = [c for c in train if c not in no_signal]
    held = data.read_split(root, args.eval_split, subtitles=not args.without_subtitles)[:args.eval_samples] \
        if os.path.isfile(os.path.join(root, f"{args.eval_split}.csv")) else []
    stop = common.StopFlag()  # from here on Ctrl-C / SIGTERM stop the encoding, or save at a step boundary
    feats, skipped = common.clip_features(model, root, train + held, d, args.feature_cache, args.use_faces,
                                          args.skip_bad_clips, stop)
    train, held = [c for c in train if c.name in feats], [c for c in held if c.name in feats]
    if args.clips_per_step % d.world or args.clips_per_step > len(train):
        raise SystemExit(f"error: --clips_per_step {args.clips_per_step} must be a multiple of the {d.world} ranks "
                         f"and at most the {len(train)} usable training clips")
    say(f"GRPO from {init}: {len(train)} clips of {split}.csv ({len(no_signal)} dropped: ground truth maps to no "
        f"wheel; {len(skipped)} bad media), {len(held)} held-out, {args.max_steps} steps of "
        f"{args.clips_per_step} clips x G={args.group_size}; mu={args.mu}"
        + (" (old log-probs skipped: rho = 1)" if args.mu == 1 else ""))

    # ---- optimiser --------------------------------------------------------------------------------------
    lr = args.lr if args.lr is not None else (2e-4 if cfg.preset == "tiny" else 1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    # stepped once per optimiser step, so the warm-up counts optimiser steps (mu per GRPO step)
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

    def run_eval(step):  # greedy decoding of the held-out clips, sharded over ranks: EW-F, format, labels
        if held:
            out = common.complete_sharded(model, held, feats, d, think=args.think,
                                          max_new_tokens=args.max_new_tokens, greedy=True)
            logger.log(step, reward.summarize_completions({n: t[0] for n, t in out.items()},
                                                          {c.name: c.labels for c in held}, lex, args.think,
                                                          args.level), prefix="[eval] ")

    # ---- loop -------------------------------------------------------------------------------------------
    common.start_run(args, d.main, start if resume_from else None)  # all checks passed: --overwrite acts now
    if start == 0:
        run_eval(0)
    bar = tqdm(total=args.max_steps, initial=start, desc="grpo", disable=not d.main, dynamic_ncols=True)
    step, G = start, args.group_size
    while step < args.max_steps:
        t0 = time.time()
        # 1. rollout: this rank's whole groups; the sampler is seeded by (seed, step, rank), so a resumed run
        # draws what an uninterrupted one would without saving generator states
        idx = common.global_batch(len(train), args.clips_per_step, step, args.seed)[d.rank::d.world]
        clips = [train[i] for i in idx]
        gen = torch.Generator(d.device).manual_seed(args.seed * 1_000_003 + step * 1009 + d.rank)
        s = rollout(model, clips, feats, G, args.think, args.max_new_tokens, args.temperature, gen)  # N = B*G

        # 2. reward: completion i answers clip i // G
        t_reward = time.time()
        scores = [reward.score_completion(text, clips[i // G].labels, lex, **reward_settings)
                  for i, text in enumerate(s.texts)]
        rewards = torch.tensor([x["total"] for x in scores], dtype=torch.float32, device=d.device)  # (N,)

        # 3. advantages within each clip's group (a group never straddles ranks, so no gather is needed)
        group_ids = torch.arange(len(clips), device=d.device).repeat_interleave(G)  # (N,)
        adv, flat_groups = group_advantages(rewards, group_ids, args.adv_scale)  # (N,)

        # 4. reference (and, with mu > 1, old) log-probs: fixed for all mu passes, so computed once, no grad
        t_reference = time.time()
        ref_logp = score_samples(ref, s, args.temperature, args.micro_batch)  # (N, L)
        # l_old must be the sampling policy's, i.e. before the first optimiser step; mu = 1 uses l.detach()
        old_logp = score_samples(model, s, args.temperature, args.micro_batch) if args.mu > 1 else None

        # 5. update: mu optimiser steps on this rollout
        t_update = time.time()
        ro = Rollout(input_ids=s.input_ids, attention=s.attention, media=s.media, prompt_len=s.prompt_len,
                     loss_mask=loss_mask_of(s.input_ids[:, s.prompt_len:], model.stop_ids, args.truncated),  # (N, L)
                     adv=adv, ref_logp=ref_logp, old_logp=old_logp)
        # the normalisers count the whole step over all ranks, so every rank's micro-batches add up exactly
        n_seqs, n_tokens = step_normalisers(ro, d.device)
        passes = []
        for _ in range(args.mu):
            passes.append(accumulate_gradients(net, model, ro, n_seqs, n_tokens, d.world, **loss_settings))
            passes[-1].grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")))
            optimizer.step()
            scheduler.step()  # per optimiser step: --warmup_steps counts these
            optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        # ---- log, show, evaluate, save (metrics are all-reduced, so every rank takes part) ----
        if step % args.log_every == 0 or step == args.max_steps:
            metrics = step_metrics(s, ro, scores, flat_groups, passes, d.device)
            elapsed, n_done = time.time() - t0, args.clips_per_step * G
            gen_tokens = metrics["rollout/length_mean"] * n_done
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "perf/step_time": elapsed,
                            "perf/samples_per_s": n_done / elapsed, "perf/gen_tokens_per_s": gen_tokens / s.seconds,
                            "perf/generate_time": s.seconds, "perf/reward_time": t_reference - t_reward,
                            "perf/reference_time": t_update - t_reference, "perf/update_time": time.time() - t_update})
            logger.log(step, metrics)
        if args.show_every and step % args.show_every == 0:
            for i in range(min(2, G)):  # two samples of this rank's first clip, with their reward's parts
                x = scores[i]
                say(f"  sample of {clips[0].name} (gt {clips[0].labels}): {s.texts[i]!r}\n"
                    f"    reward {x['total']:.3f} = acc {x['accuracy']:.3f} x pen {x['length_penalty']:.2f} "
                    f"+ {args.w_format} x format {x['format']:.0f}; answer {x['answer']}")
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save(f"step_{step:06d}", step)
        # a signal on any rank stops all ranks at this step boundary, with a checkpoint to resume from; the last
        # step just finishes: one save (re-saving the step `latest` names is not kill -9 safe)
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
