"""Shared-prefix GRPO against the plain path: each clip's prompt computed once for its G completions must give
the log-probs, the loss and every parameter gradient of scoring each completion after its own copy of the
prompt (float32, to rounding), whatever the aggregation, KL estimator, micro-batch split, adapters, LM family,
number of passes or ranks. docs/grpo.md says why it is exact; these tests hold it."""

import pytest
import torch

import grpo
import model as M
from grpo_case import gradients, make_case


def logprobs(model, ep, shared, temperature=0.8):
    with torch.no_grad():
        return grpo.completion_logprobs(model, ep, torch.arange(ep.tokens.shape[0]), temperature, shared)


def assert_same_update(model, ep, settings, micro_batches=(8, 3)):
    """Log-probs, the pass's loss terms and every parameter gradient: shared == plain. Returns the largest
    relative gradient difference."""
    plain_logp, shared_logp = logprobs(model, ep, False), logprobs(model, ep, True)
    assert torch.allclose(shared_logp, plain_logp, atol=1e-5, rtol=0)
    assert (plain_logp[ep.mask == 1] < 0).all()  # every completion token is scored, the stop token too
    want, want_stats = gradients(model, ep, {**settings, "shared_prefix": False})
    scale = max(v.abs().max().item() for v in want.values())
    worst = 0.0
    for micro in micro_batches:  # 3: groups of 2 split over micro-batches, each part runs its prompt
        got, stats = gradients(model, ep, {**settings, "micro_batch": micro, "shared_prefix": True})
        assert got.keys() == want.keys()
        worst = max(worst, max((got[k] - want[k]).abs().max().item() for k in want) / scale)
        for key in ("loss", "pg_loss", "kl_loss", "clipped"):
            assert getattr(stats, key) == pytest.approx(getattr(want_stats, key), rel=1e-5, abs=1e-7)
    assert scale > 1e-4 and worst < 1e-5, (worst, scale)
    return worst


@pytest.mark.parametrize("kl", grpo.KL_ESTIMATORS)
@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_shared_prefix_equals_the_plain_forward(aggregation, kl):
    """The fixed case: prompts with 0, 1 and 2 padding tokens, stops at different positions, two truncated
    rows, old log-probs away from the policy (as in a second pass), a policy away from its reference."""
    model, _, ep, s = make_case(aggregation)
    assert len(set(ep.prompt_mask.sum(1).tolist())) == 3 and ep.truncated.sum() == 2
    assert_same_update(model, ep, {**s, "kl": kl})


def test_shared_prefix_equals_the_plain_forward_with_truncated_rows_dropped():
    model, _, ep, s = make_case("dr_grpo", truncated="drop")
    assert_same_update(model, ep, s)


def test_shared_prefix_under_lora_and_bf16(monkeypatch):
    """Fresh adapters trained a little (LoRA A and B both get gradients through the prompt), then the same
    comparison under bf16 autocast, to bf16's rounding."""
    model, _, ep, s = make_case()
    M.add_lora(model, r=4, alpha=8, train_projector=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, M.LoRALinear):
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    assert_same_update(model, ep, s)
    model.autocast_dtype = torch.bfloat16  # what compute_dtype picks on a GPU (or with AFFECTRL_BF16=1)
    want, _ = gradients(model, ep, {**s, "shared_prefix": False})
    got, _ = gradients(model, ep, {**s, "shared_prefix": True})
    flat = lambda grads: torch.cat([v.flatten() for v in grads.values()])  # noqa: E731
    assert torch.cosine_similarity(flat(got), flat(want), 0) > 0.999


LLM_FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0),
}


@pytest.mark.parametrize("family", sorted(LLM_FAMILIES))
def test_shared_prefix_with_other_causal_lms(family):
    """A Llama (rotary positions, grouped KV heads) and a GPT-2 (learned absolute positions, one fused QKV
    projection), trained in full: positions, caches and gradients behave as with Qwen2."""
    model, _, ep, s = make_case(llm_arch=LLM_FAMILIES[family])
    assert model.llm.config.model_type == family
    assert_same_update(model, ep, s)


def test_a_step_with_shared_prefix_equals_the_plain_step(sft_ckpt, synth_data):
    """grpo_step as main runs it, at T = 0.7 with mu = 2 and micro-batches of 5 (groups of 4 split over them),
    from two copies of the same policy: the same draws (a prompt prefilled once for its group, or once per
    completion), the same l_ref and l_old, the same loss terms in both passes, the same weights after them
    (SGD: Adam would turn the rounding noise of a near-zero gradient into a full step of either sign)."""
    import data
    import reward
    clips = data.read_split(str(synth_data), "train")[:3]
    runs = {}
    for shared in (True, False):
        policy = M.load_model(str(sft_ckpt / "final"), device="cpu")
        ref = M.frozen_copy(policy)
        args = grpo.Args(group_size=4, clips_per_step=3, max_new_tokens=16, temperature=0.7, mu=2, micro_batch=5,
                         lr=1e-3, warmup_steps=1, shared_prefix=shared)
        ds = data.ClipDataset(str(synth_data), clips, 8, policy.image_size, 2, 1.0)
        feats = data.encode_clips(ds, policy.encode_media, progress=False)
        params = [p for p in policy.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        ep, passes, _ = grpo.grpo_step(policy=policy, ddp_policy=policy, ref=ref, optimizer=optimizer,
                                       scheduler=scheduler, params=params, clips=clips, feats=feats,
                                       lex=reward.load_lexicon("builtin"), args=args,
                                       generator=torch.Generator().manual_seed(0), world=1)
        runs[shared] = ep, passes, [p.detach() - p0 for p, p0 in zip(params, start)]  # what the two steps moved
    (ep, passes, moved), (plain_ep, plain_passes, plain_moved) = runs[True], runs[False]
    assert torch.equal(ep.tokens, plain_ep.tokens) and ep.texts == plain_ep.texts
    m = ep.mask.bool()
    assert m.sum() > 40 and ep.adv.abs().sum() > 0  # a real update: tokens, and rewards that differ in a group
    for key in ("sample_logp", "ref_logp", "old_logp"):
        assert torch.allclose(getattr(ep, key)[m], getattr(plain_ep, key)[m], atol=1e-5), key
    for a, b in zip(passes, plain_passes):
        for key in ("loss", "pg_loss", "kl_loss", "clipped"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-4, abs=1e-6), key
    assert passes[1].clipped > 0 or passes[1].ratio_dev > 1e-3  # the second pass saw a moved policy
    scale = max(d.abs().max().item() for d in plain_moved)
    worst = max((a - b).abs().max().item() for a, b in zip(moved, plain_moved))
    assert scale > 1e-4 and worst < 1e-4 * scale, (worst, scale)
