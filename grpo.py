"""grpo.py: stage 2, GRPO with the emotion-wheel reward, hand-written and correct to the last mask.

    python grpo.py                                  # tiny preset from out/sft/final, synthetic benchmark, CPU
    torchrun --standalone --nproc_per_node=2 grpo.py
    torchrun --standalone --nproc_per_node=8 grpo.py --init out/sft_paper/final --data /data/MER2025-OV \\
        --out out/grpo_paper --clips_per_step 32 --lr 1e-6 --max_new_tokens 256

A step has five parts, in this order in `grpo_step` and in this file (docs/grpo.md derives the formulas). One
record, `Episodes`, flows through them: `rollout` creates it and each later part adds what it computes.
1. Rollout: G completions per clip (whole groups per rank, cached encoder features) in one batched call of the
   policy, drawn from softmax(logits / T) with no top-p / top-k cut, so that the sampled distribution is the
   scored one. A completion's tokens run up to AND including its first stop token (EOS).
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
    shared_prefix: bool = field(default=True, metadata={"help": "compute each clip's prompt once for its G "
                                                               "completions in generation, scoring and the update "
                                                               "(exact); false: once per completion"})
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
# The record of a step: built by the rollout, completed by the reward, advantage and log-prob steps


@dataclass
class Episodes:
    """This rank's B clips x G completions of one step: completion i answers clip i // G. `rollout` fills the
    first block; the later steps add theirs; the update reads everything from here."""
    # 1. rollout: each clip once ...
    clips: list                      # B data.Clip records (name, labels, subtitle)
    prompt_ids: torch.Tensor         # (B, P) left-padded prompt tokens
    prompt_mask: torch.Tensor        # (B, P) 1 on real prompt tokens
    media: dict                      # encoder features, each (B, ...)
    group_size: int                  # G
    # ... and each completion (N = B * G rows)
    tokens: torch.Tensor             # (N, L) drawn tokens, pad after the first stop token
    mask: torch.Tensor               # (N, L) 1 up to AND INCLUDING the first stop token (model.find_stops)
    truncated: torch.Tensor          # (N,) bool: no stop token within max_new_tokens
    texts: list                      # N decoded completions, cut before the stop token (what the reward reads)
    sample_logp: torch.Tensor        # (N, L) log-probs of the drawn tokens under the sampler, 0 after the stop
    entropy: torch.Tensor            # (N, L) entropy of the sampler's distribution, 0 after the stop
    # 2. reward
    scores: list | None = None       # N dicts of reward.score_completion (total and its parts)
    rewards: torch.Tensor | None = None     # (N,) float32
    # 3. advantage
    adv: torch.Tensor | None = None         # (N,)
    zero_std_groups: float = 0.0            # fraction of this rank's groups whose rewards are all equal
    # 4. reference and old log-probs, fixed during the mu passes
    ref_logp: torch.Tensor | None = None    # (N, L)
    old_logp: torch.Tensor | None = None    # (N, L), or None when mu == 1 (then l_old = l.detach())
    # 5. update
    loss_mask: torch.Tensor | None = None   # (N, L) completion tokens that enter the loss

    @property
    def clip_of(self) -> torch.Tensor:
        """(N,) the index of the clip each completion answers: i // G."""
        return torch.arange(self.tokens.shape[0], device=self.tokens.device) // self.group_size


# ----------------------------------------------------------------------------------------------------------
# 1. Rollout: sampling only


@torch.no_grad()
def rollout(policy, clips: list, feats: dict, *, group_size: int, think: bool, max_new_tokens: int,
            temperature: float, generator, shared_prefix: bool = True) -> Episodes:
    """G completions for each clip in one batched call of the (unwrapped) policy: each prompt is prefilled once
    and its keys and values serve its G rows (shared_prefix=False: the prompt repeated G times, the same draws)."""
    policy.eval()  # NOTE: dropout off, so that the sampler, l_old, l_ref and the update see one function
    G, dev = group_size, policy.device
    prompts = data.collate_prompts(policy.tokenizer, [c.subtitle for c in clips], think, policy.cfg.n_tokens)
    prompt_ids, prompt_mask = prompts["input_ids"].to(dev), prompts["attention_mask"].to(dev)  # (B, P)
    # each clip's features were encoded once (cached); its G completions share them, and its prompt
    media = {k: v.to(dev) for k, v in data.stack_media(feats, [c.name for c in clips]).items()}  # (B, ...)
    ids, mask, rows_media, per_prompt = prompt_ids, prompt_mask, media, G
    if not shared_prefix:  # every completion gets its own copy of the prompt: (B, ...) -> (B*G, ...)
        ids, mask, per_prompt = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0), 1
        rows_media = {k: v.repeat_interleave(G, 0) for k, v in media.items()}
    with policy.autocast():  # no top-p / top-k cut: the distribution we sample is the one the loss scores
        out = policy.decode(ids, mask, rows_media, max_new_tokens=max_new_tokens, group_size=per_prompt,
                            temperature=temperature, generator=generator, return_stats=True)  # B * G rows
    return Episodes(clips=clips, prompt_ids=prompt_ids, prompt_mask=prompt_mask, media=media, group_size=G,
                    tokens=out.tokens, mask=out.mask, truncated=~out.stopped, texts=policy.completion_texts(out),
                    sample_logp=out.logp, entropy=out.entropy)


# ----------------------------------------------------------------------------------------------------------
# 2. Reward


def add_rewards(ep: Episodes, lex, *, think: bool, penalty: str, w_format: float, w_align: float,
                w_dual: float, level: int, accuracy: str):
    """Adds each completion's reward (reward.score_completion against its clip's labels) to the record."""
    G = ep.group_size
    ep.scores = [reward.score_completion(text, ep.clips[i // G].labels, lex, think=think, penalty=penalty,
                                         w_format=w_format, w_align=w_align, w_dual=w_dual, level=level,
                                         accuracy=accuracy) for i, text in enumerate(ep.texts)]
    ep.rewards = torch.tensor([s["total"] for s in ep.scores], dtype=torch.float32, device=ep.tokens.device)


# ----------------------------------------------------------------------------------------------------------
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


def completion_logprobs(model, ep: Episodes, rows: torch.Tensor, temperature: float,
                        shared_prefix: bool = True) -> torch.Tensor:
    """log pi(o_t | q, o_<t) at temperature T of the completion tokens of `rows` (n,), 0 after each one's stop
    token: (n, L) float32. `model` is the policy, its DDP wrapper or the reference.

    shared_prefix: each clip's prompt runs once for the rows that answer it (model.score_completions, exact:
    docs/grpo.md); otherwise each row is [its own copy of the prompt | completion], the plain forward."""
    clip = ep.clip_of[rows]  # (n,) the clip each row answers
    if shared_prefix:  # the clips of these rows, once each (a group split over micro-batches: once per part)
        clips, prompt_of = clip.unique(return_inverse=True)  # (b,), (n,) each row's index into clips
        return model(ep.prompt_ids[clips], ep.prompt_mask[clips], {k: v[clips] for k, v in ep.media.items()},
                     temperature=temperature, completions=(ep.tokens[rows], ep.mask[rows], prompt_of))
    P = ep.prompt_ids.shape[1]
    ids = torch.cat([ep.prompt_ids[clip], ep.tokens[rows]], 1)  # (n, P + L) [left-padded prompt | completion]
    attention = torch.cat([ep.prompt_mask[clip], ep.mask[rows]], 1)  # (n, P + L)
    # position t predicts token t + 1: completion token j sits at P + j and is predicted at P + j - 1
    targets = torch.full_like(ids, -100)  # -100: this position predicts nothing we score
    targets[:, P - 1:-1] = ep.tokens[rows].masked_fill(ep.mask[rows] == 0, -100)
    media = {k: v[clip] for k, v in ep.media.items()}  # (n, ...)
    return model(ids, attention, media, targets=targets, temperature=temperature)[:, P - 1:-1]  # (n, L)


@torch.no_grad()
def episode_logprobs(scorer, ep: Episodes, *, temperature: float, micro_batch: int,
                            shared_prefix: bool = True) -> torch.Tensor:
    """completion_logprobs of every completion of the record under `scorer` (the reference, or the policy before
    its first update), micro-batch by micro-batch, without gradients: (N, L)."""
    scorer.eval()
    N = ep.tokens.shape[0]
    parts = []
    for start in range(0, N, micro_batch):
        rows = torch.arange(start, min(start + micro_batch, N), device=ep.tokens.device)  # (n,)
        with scorer.autocast():
            parts.append(completion_logprobs(scorer, ep, rows, temperature, shared_prefix))
    return torch.cat(parts)  # (N, L)


# ----------------------------------------------------------------------------------------------------------
# 5. Update: the per-token loss, its aggregation, and the micro-batched backward


def loss_mask_of(mask: torch.Tensor, truncated: torch.Tensor, rule: str = "keep") -> torch.Tensor:
    """Completion tokens that enter the loss: the completion mask (N, L) (up to and including the first stop
    token); with rule "drop", none of the rows that never stopped (truncated (N,) bool)."""
    return mask * ~truncated[:, None] if rule == "drop" else mask


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


def step_normalisers(ep: Episodes, device) -> tuple:
    """(completions, loss tokens) of the whole step, over all ranks: grpo's and dr_grpo's completion count
    includes completions without a loss token (--truncated drop), as in TRL, so dropping does not rescale."""
    n_seqs, n_tokens = common.all_reduce_sum([ep.loss_mask.shape[0], ep.loss_mask.sum().item()], device)
    return n_seqs, max(1.0, n_tokens)


@dataclass
class PassStats:
    """One pass over the rollout on this rank: its share of the step's loss terms, clipped tokens, and the
    largest |rho - 1| on a loss token (0 up to rounding in a step's first pass, which scores the sampler)."""
    loss: float = 0.0
    pg_loss: float = 0.0
    kl_loss: float = 0.0
    clipped: float = 0.0
    ratio_dev: float = 0.0
    grad_norm: float = 0.0  # set after the backward, over all ranks


def accumulate_gradients(ddp_policy, policy, ep: Episodes, *, n_seqs: float, n_tokens: float, world: int,
                         temperature: float, eps_low: float, eps_high: float, beta: float, kl: str,
                         aggregation: str, max_new_tokens: int, micro_batch: int,
                         shared_prefix: bool = True) -> PassStats:
    """Backward of this rank's share of the step loss, micro-batch by micro-batch (no_sync but the last).
    `ddp_policy` is the policy's DDP wrapper (the policy itself on one rank): the loss runs through it. A group
    split over two micro-batches is exact with shared_prefix too: each part runs the prompt once and sends
    its share of the prompt's gradient."""
    N = ep.tokens.shape[0]
    stats = PassStats()
    policy.eval()  # NOTE: dropout stays off in the update too, so rho compares the same function
    for start in range(0, N, micro_batch):
        rows = torch.arange(start, min(start + micro_batch, N), device=ep.tokens.device)  # (n,)
        # DDP all-reduces gradients on the last micro-batch only; the others accumulate locally
        last = start + micro_batch >= N
        sync = contextlib.nullcontext() if (world == 1 or last) else ddp_policy.no_sync()
        with sync, policy.autocast():
            logp = completion_logprobs(ddp_policy, ep, rows, temperature, shared_prefix)  # (n, L)
            mask = ep.loss_mask[rows].float()  # (n, L)
            # mu == 1: l_old is l itself, so rho = 1 and the gradient is the plain policy gradient
            old = logp.detach() if ep.old_logp is None else ep.old_logp[rows]  # (n, L)
            pg, clipped = clipped_surrogate(logp, old, ep.adv[rows], eps_low, eps_high)  # (n, L) x 2
            kl_term, _ = kl_penalty(logp, ep.ref_logp[rows], kl)  # (n, L)
            pg_part, kl_part = [aggregate(x, mask, aggregation, n_seqs, n_tokens, max_new_tokens)
                                for x in (pg, kl_term)]  # scalars: this micro-batch's share of the step's terms
            total = pg_part + beta * kl_part
            # DDP averages gradients over ranks; the normalisers already count all ranks, so undo the average
            (total * world).backward()
        stats.loss += total.item()
        stats.pg_loss += pg_part.item()
        stats.kl_loss += kl_part.item()
        stats.clipped += (clipped * mask).sum().item()
        ratio_dev = ((logp.detach() - old).exp() - 1).abs() * mask  # (n, L) |rho - 1| on loss tokens
        stats.ratio_dev = max(stats.ratio_dev, ratio_dev.max().item() if ratio_dev.numel() else 0.0)
    return stats


# ----------------------------------------------------------------------------------------------------------
# One GRPO step: the five parts in order


def clock(device) -> float:
    """time.time() once the device has finished its queued work (a GPU runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def grpo_step(*, policy, ddp_policy, ref, optimizer, scheduler, params: list, clips: list, feats: dict, lex,
              args: "Args", generator, world: int) -> tuple:
    """Rollout -> reward -> advantage -> reference (and old) log-probs -> mu optimiser steps, on this rank's
    clips. Returns (the step's Episodes, one PassStats per pass, the seconds of each part)."""
    t0 = clock(policy.device)
    # 1. rollout: G completions per clip from the policy as it is now (the record: B clips, N = B * G rows)
    ep = rollout(policy, clips, feats, group_size=args.group_size, think=args.think,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, generator=generator,
                 shared_prefix=args.shared_prefix)
    t_reward = clock(policy.device)
    # 2. reward: completion i answers clip i // G
    add_rewards(ep, lex, think=args.think, penalty=args.penalty, w_format=args.w_format, w_align=args.w_align,
                w_dual=args.w_dual, level=args.level, accuracy=args.accuracy)  # ep.scores, ep.rewards (N,)
    # 3. advantages within each clip's group (a group never straddles ranks, so no gather is needed)
    ep.adv, ep.zero_std_groups = group_advantages(ep.rewards, ep.clip_of, args.adv_scale)  # (N,)
    t_reference = clock(policy.device)
    # 4. reference (and, with mu > 1, old) log-probs: fixed for all mu passes, so computed once, without grad;
    # NOTE: both at the sampling temperature. l_old must be the sampling policy's: before the first optimiser
    # step (mu = 1 uses l.detach() instead)
    ep.ref_logp = episode_logprobs(ref, ep, temperature=args.temperature, micro_batch=args.micro_batch,
                                   shared_prefix=args.shared_prefix)
    if args.mu > 1:
        ep.old_logp = episode_logprobs(policy, ep, temperature=args.temperature, micro_batch=args.micro_batch,
                                       shared_prefix=args.shared_prefix)
    t_update = clock(policy.device)
    # 5. update: mu optimiser steps on this rollout; the normalisers count the whole step over all ranks
    ep.loss_mask = loss_mask_of(ep.mask, ep.truncated, args.truncated)  # (N, L)
    n_seqs, n_tokens = step_normalisers(ep, policy.device)
    passes = []
    for _ in range(args.mu):  # pass 1 has rho = 1 (l_old is this very policy); later passes move it
        passes.append(accumulate_gradients(
            ddp_policy, policy, ep, n_seqs=n_seqs, n_tokens=n_tokens, world=world, temperature=args.temperature,
            eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, kl=args.kl, aggregation=args.aggregation,
            max_new_tokens=args.max_new_tokens, micro_batch=args.micro_batch, shared_prefix=args.shared_prefix))
        # clip the gradient of the whole step (all ranks: DDP has all-reduced it), then one optimiser step
        passes[-1].grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")))
        optimizer.step()
        scheduler.step()  # per optimiser step: --warmup_steps counts these
        optimizer.zero_grad(set_to_none=True)
    seconds = {"generate": t_reward - t0, "reward": t_reference - t_reward, "reference": t_update - t_reference,
               "update": clock(policy.device) - t_update}
    return ep, passes, seconds


# ----------------------------------------------------------------------------------------------------------
# Logging


def step_metrics(ep: Episodes, passes: list, device) -> dict:
    """Metrics of one step: sums over this rank by name, all-reduced, then turned into means."""
    m = ep.mask.float()  # (N, L) generated tokens up to the first stop token
    k3 = kl_penalty(ep.sample_logp, ep.ref_logp)[1] * m  # (N, L) k3 at the sampled tokens
    scores = ep.scores
    local = {"completions": len(scores), "reward": sum(x["total"] for x in scores),
             "reward_sq": sum(x["total"] ** 2 for x in scores), "labels": sum(x["n_pred"] for x in scores),
             **{k: sum(x[k] for x in scores) for k in REWARD_PARTS},
             "tokens": m.sum().item(), "kl": k3.sum().item(), "entropy": (ep.entropy * m).sum().item(),
             "nll": -(ep.sample_logp * m).sum().item(), "truncated": ep.truncated.sum().item(),
             "zero_std_groups": ep.zero_std_groups, "ranks": 1.0,
             "loss_tokens": ep.loss_mask.sum().item() * len(passes),  # every pass sees every loss token
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
            # the first pass scores the policy that sampled: rho = 1 up to rounding, or l_old is wrong
            "train/first_pass_ratio_dev": common.all_reduce_max(passes[0].ratio_dev, device),
            "train/grad_norm": sum(p.grad_norm for p in passes) / len(passes),
            "rollout/length_mean": tokens / n,
            "rollout/length_max": common.all_reduce_max(m.sum(1).max().item(), device)}


def show_samples(ep: Episodes, w_format: float, say):
    """Two completions of this rank's first clip, with their reward's parts."""
    clip = ep.clips[0]
    for text, x in list(zip(ep.texts, ep.scores))[:min(2, ep.group_size)]:
        say(f"  sample of {clip.name} (gt {clip.labels}): {text!r}\n"
            f"    reward {x['total']:.3f} = acc {x['accuracy']:.3f} x pen {x['length_penalty']:.2f} "
            f"+ {w_format} x format {x['format']:.0f}; answer {x['answer']}")


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
# Set-up


def load_policy(args: Args, device, resume_from: str | None) -> tuple:
    """(checkpoint, policy, reference): the policy from the SFT checkpoint (with fresh LoRA adapters under
    --lora_r), the reference a frozen copy of it as it starts, then the policy's weights of the run it resumes."""
    try:
        init = common.resolve_checkpoint(args.init)
    except FileNotFoundError:
        raise SystemExit(f"error: no SFT checkpoint at {args.init}; run `python sft.py` first "
                         f"(or pass --init PATH)") from None
    policy = model_lib.load_model(init, device=device)
    if args.lora_r:  # fresh adapters on the SFT policy; then the reference is the SFT policy without them
        torch.manual_seed(args.seed)
        model_lib.add_lora(policy, args.lora_r, 2.0 * args.lora_r, train_projector=not args.freeze_projector)
    ref = model_lib.frozen_copy(policy)  # the initial policy, frozen; it only scores
    policy.use_sampler(args.compile)  # the policy generates: the eager loop, or the compiled static one
    if resume_from:
        model_lib.load_trainable(policy, resume_from)
    return init, policy, ref


def load_clips(policy, args: Args, dist_env, lex, signals, say) -> tuple:
    """(training clips, held-out clips, their encoder features): clips whose ground truth maps to no wheel
    give no reward signal and are left out; bad media stops the run or, with --skip_bad_clips, is left out."""
    root = args.data or "out/synth"
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {root}: no such folder")
    split = args.train_split
    if split == "rl" and not os.path.isfile(os.path.join(root, "rl.csv")):
        split = "train"  # datasets without a separate RL split train on their training split
        say(f"note: {root} has no rl.csv: GRPO trains on train.csv (--train_split names another split)")
    clips = data.read_split(root, split, subtitles=not args.without_subtitles)
    train = [c for c in clips if reward.has_signal(c.labels, lex, args.level)]
    n_silent = len(clips) - len(train)
    held = data.read_split(root, args.eval_split, subtitles=not args.without_subtitles)[:args.eval_samples] \
        if os.path.isfile(os.path.join(root, f"{args.eval_split}.csv")) else []
    feats, skipped = common.clip_features(policy, root, train + held, dist_env, args.feature_cache, args.use_faces,
                                          args.skip_bad_clips, signals)
    usable = lambda cs: [c for c in cs if c.name in feats]  # noqa: E731
    train, held = usable(train), usable(held)
    if args.clips_per_step % dist_env.world or args.clips_per_step > len(train):
        raise SystemExit(f"error: --clips_per_step {args.clips_per_step} must be a multiple of the "
                         f"{dist_env.world} ranks and at most the {len(train)} usable training clips")
    say(f"GRPO: {len(train)} clips of {split}.csv ({n_silent} dropped: "
        f"ground truth maps to no wheel; {len(skipped)} bad media), {len(held)} held-out, {args.max_steps} steps "
        f"of {args.clips_per_step} clips x G={args.group_size}; mu={args.mu}"
        + (" (old log-probs skipped: rho = 1)" if args.mu == 1 else ""))
    return train, held, feats


def make_optimizer(policy, args: Args) -> tuple:
    """(trainable parameters, AdamW, a linear warm-up stepped once per optimiser step: mu per GRPO step)."""
    lr = args.lr if args.lr is not None else (2e-4 if policy.cfg.preset == "tiny" else 1e-6)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    warmup = max(1, args.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return params, optimizer, scheduler


def save_step(args: Args, dist_env, init: str, step: int, policy, optimizer, scheduler):
    """OUT/step_XXXXXX with the trainer state (rank 0 writes; every rank waits)."""
    if dist_env.main:
        common.save_checkpoint(args.out, f"step_{step:06d}", policy, optimizer, scheduler,
                               {"step": step, "data_position": step * args.clips_per_step, "init": init,
                                "args": asdict(args)}, keep_last=args.keep_last)
    common.barrier()


def evaluate_held_out(policy, held: list, feats: dict, lex, args: Args, dist_env, logger, step: int):
    """Greedy decoding of the held-out clips, sharded over ranks: EW-F, format rate, labels per answer."""
    if held:
        out = common.complete_sharded(policy, held, feats, dist_env, think=args.think,
                                      max_new_tokens=args.max_new_tokens, greedy=True)
        logger.log(step, reward.summarize_completions({n: t[0] for n, t in out.items()},
                                                      {c.name: c.labels for c in held}, lex, args.think,
                                                      args.level), prefix="[eval] ")


# ----------------------------------------------------------------------------------------------------------


def main(args: Args):
    # ---- setup: checks, ranks, output folder, model, data, optimiser --------------------------------------
    from tqdm import tqdm
    check_args(args)
    dist_env = common.setup_dist(args.device)
    common.seed_everything(args.seed)
    say = tqdm.write if dist_env.main else (lambda *a, **k: None)
    # a used --out needs --resume (unchanged run, or more steps) or --overwrite; unwritable folders fail here
    resume_from = common.check_out(args, dist_env.main, say, grow=("max_steps",))
    logger = common.Logger(args.out, dist_env.main, write=say)
    init, policy, ref = load_policy(args, dist_env.device, resume_from)
    say(f"policy and reference from {init}")
    lex = reward.load_lexicon(args.lexicon)
    signals = common.StopFlag()  # from here on Ctrl-C / SIGTERM stop the encoding, or save at a step boundary
    train, held, feats = load_clips(policy, args, dist_env, lex, signals, say)
    params, optimizer, scheduler = make_optimizer(policy, args)
    start = common.load_trainer_state(resume_from, optimizer, scheduler)["step"] if resume_from else 0
    if resume_from:
        say(f"resumed from {resume_from} at step {start}")
    ddp_policy = policy if dist_env.world == 1 else \
        DDP(policy, device_ids=[dist_env.local_rank] if dist_env.device.type == "cuda" else None)

    # ---- loop ---------------------------------------------------------------------------------------------
    common.start_run(args, dist_env.main, start if resume_from else None)  # checks passed: --overwrite acts now
    if start == 0:
        evaluate_held_out(policy, held, feats, lex, args, dist_env, logger, 0)
    bar = tqdm(total=args.max_steps, initial=start, desc="grpo", disable=not dist_env.main, dynamic_ncols=True)
    step = start
    while step < args.max_steps:
        t0 = time.time()
        # this rank's whole groups; the sampler is seeded by (seed, step, rank), so a resumed run draws what an
        # uninterrupted one would without saving generator states
        idx = common.global_batch(len(train), args.clips_per_step, step, args.seed)[dist_env.rank::dist_env.world]
        generator = torch.Generator(dist_env.device).manual_seed(args.seed * 1_000_003 + step * 1009 + dist_env.rank)
        ep, passes, seconds = grpo_step(policy=policy, ddp_policy=ddp_policy, ref=ref, optimizer=optimizer,
                                        scheduler=scheduler, params=params, clips=[train[i] for i in idx],
                                        feats=feats, lex=lex, args=args, generator=generator, world=dist_env.world)
        step += 1
        bar.update(1)

        # ---- log, show, evaluate, save (metrics are all-reduced, so every rank takes part) ----
        if step % args.log_every == 0 or step == args.max_steps:
            metrics = step_metrics(ep, passes, dist_env.device)
            elapsed, n_done = time.time() - t0, args.clips_per_step * args.group_size
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "perf/step_time": elapsed,
                            "perf/samples_per_s": n_done / elapsed,
                            "perf/gen_tokens_per_s": metrics["rollout/length_mean"] * n_done / seconds["generate"],
                            **{f"perf/{part}_time": s for part, s in seconds.items()}})
            logger.log(step, metrics)
        if args.show_every and step % args.show_every == 0:
            show_samples(ep, args.w_format, say)
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            evaluate_held_out(policy, held, feats, lex, args, dist_env, logger, step)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save_step(args, dist_env, init, step, policy, optimizer, scheduler)
        # a signal on any rank stops all ranks at this step boundary, with a checkpoint to resume from; the last
        # step just finishes: one save (re-saving the step `latest` names is not kill -9 safe)
        if step < args.max_steps and (signals.check(dist_env.device)
                                      or (args.stop_after and step - start >= args.stop_after)):
            save_step(args, dist_env, init, step, policy, optimizer, scheduler)
            say(f"stopped at step {step} of {args.max_steps}: saved {args.out}/step_{step:06d}; "
                f"continue with --resume")
            break

    # ---- save ---------------------------------------------------------------------------------------------
    bar.close()
    if step == args.max_steps:
        save_step(args, dist_env, init, step, policy, optimizer, scheduler)
        if dist_env.main:
            common.save_checkpoint(args.out, "final", policy, state={"step": step, "args": asdict(args)})
            say(f"done: {args.out}/final")
    common.cleanup_dist()
    if step < args.max_steps:
        signals.exit()  # stopped by a signal: 128 + its number, so a scheduler does not take the run for finished


if __name__ == "__main__":
    data.exit_on_bad_input(main, common.parse_args(Args))
