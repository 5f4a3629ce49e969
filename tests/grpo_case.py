"""A fixed GRPO update case (tiny model + a hand-made rollout), shared by test_grpo.py and, as a torchrun worker,
by the 1-rank vs 2-rank gradient test:

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


def make_case(aggregation="grpo", truncated="keep", n=8, prompt=6, length=5, seed=0):
    """A tiny policy, its frozen reference (after one perturbation of the policy, so the KL is not zero), and
    a rollout of n completions with ragged masks, left-padded prompts and two truncated rows. The settings are
    chosen so that a swapped or ignored setting shows: eps_low != eps_high, old log-probs away from the policy's
    (as after an update with mu > 1: tokens clip on both sides), max_new_tokens wider than the batch."""
    tok = M.prepare_tokenizer(M.build_tokenizer(CORPUS, vocab_size=300, seed=0))
    model = M.build_model(M.ModelConfig.from_preset("tiny", seed=seed, n_tokens=1), device="cpu",
                          tokenizer=tok).eval()
    ref = M.frozen_copy(model)
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
    att[:, prompt:] = M.completion_mask(completion, eos)
    arch = M.PRESETS["tiny"]["arch"]
    media = {"video": torch.randn(n, 8, arch["vision"]["projection_dim"], generator=g),
             "audio": torch.randn(n, 2, arch["audio"]["hidden_size"], generator=g)}
    adv = torch.randn(n, generator=g)
    settings = dict(temperature=0.8, eps_low=0.1, eps_high=0.3, beta=0.1, kl="k3", aggregation=aggregation,
                    max_new_tokens=length + 3, micro_batch=n)
    with torch.no_grad():
        ref_logp = grpo.completion_logprobs(ref, ids, att, media, prompt, settings["temperature"])
        policy_logp = grpo.completion_logprobs(model, ids, att, media, prompt, settings["temperature"])
    loss_mask = grpo.loss_mask_of(completion, eos, truncated)
    noise = 0.3 * torch.randn(n, length, generator=g) * att[:, prompt:]  # old log-probs are 0 past the EOS too
    ro = grpo.Rollout(input_ids=ids, attention=att, media=media, prompt_len=prompt, loss_mask=loss_mask, adv=adv,
                      ref_logp=ref_logp, old_logp=policy_logp + noise)
    return model, ref, ro, settings


def sub_rollout(ro, rows):
    return grpo.Rollout(input_ids=ro.input_ids[rows], attention=ro.attention[rows],
                        media={k: v[rows] for k, v in ro.media.items()}, prompt_len=ro.prompt_len,
                        loss_mask=ro.loss_mask[rows], adv=ro.adv[rows], ref_logp=ro.ref_logp[rows],
                        old_logp=None if ro.old_logp is None else ro.old_logp[rows])


def gradients(model, ro, settings, world=1, net=None):
    """Gradients of one step's loss (the normalisers count the whole step over all ranks) and the pass's stats."""
    n_seqs, n_tokens = grpo.step_normalisers(ro, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    stats = grpo.accumulate_gradients(net or model, model, ro, n_seqs, n_tokens, world, **settings)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, stats


if __name__ == "__main__":
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    d = common.setup_dist("cpu")
    model, ref, ro, settings = make_case(sys.argv[2])
    n = ro.input_ids.shape[0]
    mine = sub_rollout(ro, torch.arange(n)[d.rank * n // d.world:(d.rank + 1) * n // d.world])
    settings["micro_batch"] = 3  # also a different micro-batch split than the 1-rank reference
    grads, _ = gradients(model, mine, settings, d.world, DDP(model))
    if d.main:
        save_file({k: v.contiguous() for k, v in grads.items()}, sys.argv[1])
    common.cleanup_dist()
