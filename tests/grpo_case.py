"""A fixed GRPO update case (tiny model + a hand-made rollout), shared by test_grpo.py and, as a torchrun worker,
by the 1-rank vs 2-rank gradient test:

    torchrun --standalone --nproc_per_node=2 tests/grpo_case.py OUT.safetensors AGGREGATION
"""

import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402

CORPUS = ["Please recognize all possible emotional states.", "happy sad angry worried calm",
          "<think>low voice</think><answer>sad, tired</answer>"] * 4


def make_case(aggregation="grpo", n=8, prompt=6, length=5, seed=0):
    """A tiny policy, its frozen reference (after one perturbation of the policy, so the KL is not zero), and
    a rollout of n completions with ragged masks, left-padded prompts and truncated rows."""
    tok = M.prepare_tokenizer(M.build_tokenizer(CORPUS, vocab_size=300, seed=0))
    model = M.build_model(M.ModelConfig.from_preset("tiny", seed=seed, n_tokens=1), device="cpu",
                          tokenizer=tok).eval()
    ref = grpo.frozen_copy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the policy has moved away from the reference a little
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    V = len(tok)
    placeholders = torch.tensor(model.placeholder_ids)
    ids = torch.randint(10, V - 10, (n, prompt + length), generator=g)
    ids[:, :3] = placeholders
    att = torch.ones_like(ids)
    for i in range(n):  # left padding of i % 3 tokens (placeholders move right)
        pad = i % 3
        ids[i, pad:pad + 3] = placeholders
        ids[i, :pad] = tok.pad_token_id
        att[i, :pad] = 0
    completion = ids[:, prompt:]
    eos = tok.eos_token_id
    for i in range(n):  # EOS at a row-dependent place; two rows are truncated (no EOS)
        if i % 4 != 3:
            completion[i, i % length] = eos
            completion[i, i % length + 1:] = tok.pad_token_id
    mask = M.completion_mask(completion, eos)
    att[:, prompt:] = mask
    arch = M.PRESETS["tiny"]["arch"]
    media = {"video": torch.randn(n, 8, arch["vision"]["projection_dim"], generator=g),
             "audio": torch.randn(n, 2, arch["audio"]["hidden_size"], generator=g)}
    adv = torch.randn(n, generator=g)
    args = SimpleNamespace(micro_batch=n, temperature=0.8, eps_low=0.2, eps_high=0.2, kl="k3", beta=0.1,
                           aggregation=aggregation, max_new_tokens=length, mu=1)
    ro = grpo.Rollout(ids, att, grpo.loss_mask_of(completion, eos), media, adv, None, None, prompt)
    with torch.no_grad():
        rows = torch.arange(n)
        ro.ref_logp = grpo.completion_logprobs(ref, ro, rows, args.temperature)
        ro.old_logp = grpo.completion_logprobs(model, ro, rows, args.temperature) + 0.05 * torch.randn(
            n, length, generator=g)  # as if mu > 1: ratios differ from 1, clipping can act
    return model, ref, ro, args


def sub_rollout(ro, rows):
    return grpo.Rollout(ro.input_ids[rows], ro.attention[rows], ro.loss_mask[rows],
                        {k: v[rows] for k, v in ro.media.items()}, ro.adv[rows],
                        None if ro.old_logp is None else ro.old_logp[rows], ro.ref_logp[rows], ro.prompt_len)


def gradients(model, ro, args, world=1, net=None):
    """Gradients of one step's loss (the normalisers count the whole step over all ranks)."""
    n_seqs, n_tokens = common.all_reduce_sum([float((ro.loss_mask.sum(1) > 0).sum()), float(ro.loss_mask.sum())],
                                             torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    grpo.accumulate_gradients(net or model, model, ro, args, n_seqs, n_tokens, world)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    d = common.setup_dist("cpu")
    model, ref, ro, args = make_case(sys.argv[2])
    n = ro.input_ids.shape[0]
    mine = sub_rollout(ro, torch.arange(n)[d.rank * n // d.world:(d.rank + 1) * n // d.world])
    args.micro_batch = 3  # also a different micro-batch split than the 1-rank reference
    grads = gradients(model, mine, args, d.world, DDP(model))
    if d.main:
        save_file({k: v.contiguous() for k, v in grads.items()}, sys.argv[1])
    common.cleanup_dist()
