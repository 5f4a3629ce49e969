"""A fixed GRPO update case (tiny model + a hand-made step record), shared by test_grpo.py and, as a torchrun
worker, by the 1-rank vs 2-rank gradient test:

    torchrun --standalone --nproc_per_node=2 tests/grpo_case.py OUT.safetensors AGGREGATION
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402

CORPUS = ["Please recognize all possible emotional states.", "happy sad angry worried calm",
          "<think>low voice</think><answer>sad, tired</answer>"] * 4


def episodes(model, prompt_ids, prompt_mask, media, tokens, group_size) -> grpo.Episodes:
    """A step record from tensors: B prompts (B, P) with their media (B, ...), and B * G completions (N, L)."""
    out = M.find_stops(tokens, model.stop_ids)
    N = tokens.shape[0]
    return grpo.Episodes(clips=[None] * prompt_ids.shape[0], prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                         media=media, group_size=group_size, tokens=tokens, mask=out.mask, truncated=~out.stopped,
                         texts=[""] * N, sample_logp=torch.zeros(tokens.shape), entropy=torch.zeros(tokens.shape))


def make_case(aggregation="grpo", truncated="keep", clips=4, group=2, prompt=6, length=5, seed=0, llm_arch=None):
    """A tiny policy, its frozen reference (after one perturbation of the policy, so the KL is not zero), and
    a step record of `clips` x `group` completions with ragged masks, left-padded prompts of different real
    lengths and two truncated rows. The settings are chosen so that a swapped or ignored setting shows:
    eps_low != eps_high, old log-probs away from the policy's (as after an update with mu > 1: tokens clip on
    both sides), max_new_tokens wider than the batch. `llm_arch`: another random-init causal LM (HF config
    kwargs) in place of the tiny preset's Qwen2."""
    tok = M.prepare_tokenizer(M.build_tokenizer(CORPUS, vocab_size=300, seed=0))
    arch = dict(M.PRESETS["tiny"]["arch"], **({"llm": llm_arch} if llm_arch else {}))
    model = M.build_model(M.ModelConfig.from_preset("tiny", seed=seed, n_tokens=1, arch=arch), device="cpu",
                          tokenizer=tok).eval()
    ref = M.frozen_copy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the policy has moved away from the reference a little
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    V, n = len(tok), clips * group
    placeholders = torch.tensor(model.placeholder_ids)
    prompt_ids = torch.randint(10, V - 10, (clips, prompt), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    for c in range(clips):  # left padding of c % 3 tokens (placeholders move right)
        pad = c % 3
        prompt_ids[c, pad:pad + 3] = placeholders
        prompt_ids[c, :pad] = tok.pad_token_id
        prompt_mask[c, :pad] = 0
    tokens = torch.randint(10, V - 10, (n, length), generator=g)
    eos = tok.eos_token_id
    for i in range(n):  # EOS at a row-dependent place; two rows are truncated (no EOS)
        if i % 4 != 3:
            tokens[i, i % length] = eos
            tokens[i, i % length + 1:] = tok.pad_token_id
    arch = M.PRESETS["tiny"]["arch"]
    media = {"video": torch.randn(clips, 8, arch["vision"]["projection_dim"], generator=g),
             "audio": torch.randn(clips, 2, arch["audio"]["hidden_size"], generator=g)}
    ep = episodes(model, prompt_ids, prompt_mask, media, tokens, group)
    ep.adv = torch.randn(n, generator=g)
    settings = dict(temperature=0.8, eps_low=0.1, eps_high=0.3, beta=0.1, kl="k3", aggregation=aggregation,
                    max_new_tokens=length + 3, micro_batch=n)
    rows = torch.arange(n)
    with torch.no_grad():
        ep.ref_logp = grpo.completion_logprobs(ref, ep, rows, settings["temperature"])
        policy_logp = grpo.completion_logprobs(model, ep, rows, settings["temperature"])
    ep.loss_mask = grpo.loss_mask_of(ep.mask, ep.truncated, truncated)
    noise = 0.3 * torch.randn(n, length, generator=g) * ep.mask  # old log-probs are 0 past the EOS too
    ep.old_logp = policy_logp + noise
    return model, ref, ep, settings


def sub_episodes(ep, clips) -> grpo.Episodes:
    """The record of some of its clips (a rank's share): those clips' prompts and all their completions."""
    G = ep.group_size
    rows = (clips[:, None] * G + torch.arange(G)).flatten()
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    return grpo.Episodes(
        clips=[ep.clips[c] for c in clips.tolist()], prompt_ids=ep.prompt_ids[clips], prompt_mask=ep.prompt_mask[clips],
        media={k: v[clips] for k, v in ep.media.items()}, group_size=G, tokens=ep.tokens[rows], mask=ep.mask[rows],
        truncated=ep.truncated[rows], texts=[ep.texts[i] for i in rows.tolist()], sample_logp=ep.sample_logp[rows],
        entropy=ep.entropy[rows], adv=pick(ep.adv), ref_logp=pick(ep.ref_logp), old_logp=pick(ep.old_logp),
        loss_mask=pick(ep.loss_mask))


def full_sequences(ep) -> tuple:
    """Each completion with its own copy of its prompt: ids, attention (N, P + L), media (N, ...)."""
    clip = ep.clip_of
    return (torch.cat([ep.prompt_ids[clip], ep.tokens], 1), torch.cat([ep.prompt_mask[clip], ep.mask], 1),
            {k: v[clip] for k, v in ep.media.items()})


def gradients(model, ep, settings, world=1, net=None):
    """Gradients of one step's loss (the normalisers count the whole step over all ranks) and the pass's stats."""
    n_seqs, n_tokens = grpo.step_normalisers(ep, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    stats = grpo.accumulate_gradients(net or model, model, ep, n_seqs=n_seqs, n_tokens=n_tokens, world=world,
                                      **settings)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, stats


if __name__ == "__main__":
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist_env = common.setup_dist("cpu")
    model, ref, ep, settings = make_case(sys.argv[2])
    B = ep.prompt_ids.shape[0]
    rank, world = dist_env.rank, dist_env.world
    mine = sub_episodes(ep, torch.arange(B)[rank * B // world:(rank + 1) * B // world])  # whole groups per rank
    settings["micro_batch"] = 3  # also a different micro-batch split than the 1-rank reference
    grads, _ = gradients(model, mine, settings, dist_env.world, DDP(model))
    if dist_env.main:
        save_file({k: v.contiguous() for k, v in grads.items()}, sys.argv[1])
    common.cleanup_dist()
