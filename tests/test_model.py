"""model.py against independent references: the bare transformers LM, hand-built embeddings, direct log-softmax."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import model as M

CORPUS = ["Please recognize all possible emotional states of the character.", "happy sad angry worried calm",
          "<think>the voice is low</think><answer>sad, tired</answer>"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return M.prepare_tokenizer(M.build_tokenizer(CORPUS, vocab_size=300, seed=0))


def tiny(tokenizer, **overrides):
    """The tiny preset with one placeholder token per modality (unless overridden)."""
    cfg = M.ModelConfig.from_preset("tiny", **{"n_tokens": 1, **overrides})
    return M.build_model(cfg, device="cpu", tokenizer=copy.deepcopy(tokenizer)).eval()


def bare_lm(model):
    """The plain transformers LM with the same base weights (no LoRA, no media)."""
    bare = AutoModelForCausalLM.from_config(model.llm.config).eval()
    base = {k: v for k, v in model.llm.state_dict().items() if "lora_" not in k}
    bare.load_state_dict(base)
    return bare


def media(batch=2, seed=0):
    """Random encoder features of the tiny preset's sizes."""
    arch, g = M.PRESETS["tiny"]["arch"], torch.Generator().manual_seed(seed)
    return {"video": torch.randn(batch, 8, arch["vision"]["projection_dim"], generator=g),
            "audio": torch.randn(batch, 2, arch["audio"]["hidden_size"], generator=g)}


def prompts(tokenizer, texts, with_media=True):
    texts = [("<|fused|><|audio|><|video|>" if with_media else "") + t for t in texts]
    return tokenizer(texts, return_tensors="pt", padding=True)


def visible(logits, model):
    """Logits without the media-placeholder columns (which our model pins to -inf: it never emits them)."""
    keep = [i for i in range(logits.shape[-1]) if i not in model.placeholder_ids]
    return logits[..., keep]


def randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.llm.modules():
            if isinstance(m, M.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_golden_no_media_prompt_matches_transformers(tokenizer):
    model = tiny(tokenizer, train_llm="lora")  # LoRA B = 0 at init: must not change anything
    bare = bare_lm(model)
    enc = prompts(tokenizer, ["happy sad angry", "calm"], with_media=False)
    with torch.no_grad():
        ours = model(enc["input_ids"], enc["attention_mask"])
        assert torch.isneginf(ours[..., model.placeholder_ids]).all()
        # the unpadded row 0 against transformers' own forward
        ref = bare(enc["input_ids"][:1]).logits
        assert torch.allclose(visible(ours[:1], model), visible(ref, model), atol=1e-5)
        # the left-padded row 1 against transformers on the unpadded tokens
        n = int(enc["attention_mask"][1].sum())
        ref1 = bare(enc["input_ids"][1:, -n:]).logits
        assert torch.allclose(visible(ours[1:, -n:], model), visible(ref1, model), atol=1e-5)


def test_lora_adapters_change_the_output_of_the_base(tokenizer):
    model = tiny(tokenizer, train_llm="lora")
    bare = bare_lm(model)
    randomise_lora(model)
    enc = prompts(tokenizer, ["happy sad angry", "calm"], with_media=False)
    with torch.no_grad():
        lora = visible(model(enc["input_ids"], enc["attention_mask"]), model)
        base = visible(bare(enc["input_ids"][:1]).logits, model)
        assert not torch.allclose(lora[:1], base, atol=1e-3)  # the adapters do change the output
        for m in model.llm.modules():  # ... and only they: B = 0 gives the base back
            if isinstance(m, M.LoRALinear):
                m.lora_B.zero_()
        assert torch.allclose(visible(model(enc["input_ids"], enc["attention_mask"]), model)[:1], base, atol=1e-5)


def test_lora_trains_only_adapters_and_projector(tokenizer):
    model = tiny(tokenizer, train_llm="lora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("projector.") or "lora_" in n for n in names)
    assert any("lora_A" in n for n in names)
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.train()
    assert not model.vision.training and not model.audio.training and model.llm.training


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_placeholders_receive_exactly_the_projected_features(tokenizer, n_tokens):
    model = tiny(tokenizer, n_tokens=n_tokens)
    enc = tokenizer([("<|fused|>" * n_tokens + "<|audio|>" * n_tokens + "<|video|>" * n_tokens) + t
                     for t in ["happy", "sad angry calm"]], return_tensors="pt", padding=True)
    feats = media()
    seen = {}
    hook = model.llm.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(enc["input_ids"], enc["attention_mask"], feats)
        hook.remove()
        projected = model.projector(feats["video"], feats["audio"])  # (B, 3 n, D): fused, audio, video
        table = model.llm.get_input_embeddings().weight
    ids = enc["input_ids"]
    for b in range(2):
        for j, token in enumerate(M.PLACEHOLDERS):
            pos = (ids[b] == tokenizer.convert_tokens_to_ids(token)).nonzero().flatten()
            assert len(pos) == n_tokens
            assert torch.equal(seen["embeds"][b, pos], projected[b, j * n_tokens:(j + 1) * n_tokens])
        text = ~torch.isin(ids[b], torch.tensor(model.placeholder_ids))
        assert torch.equal(seen["embeds"][b, text], table[ids[b, text]])


def test_placeholder_count_and_order_are_checked(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(ValueError, match="placeholder"):
        bad = prompts(tokenizer, ["happy"], with_media=False)
        bad["input_ids"][0, 0] = model.placeholder_ids[0]
        model(bad["input_ids"], bad["attention_mask"], media(1))
    swapped = tokenizer(["<|audio|><|fused|><|video|>x"], return_tensors="pt")
    with pytest.raises(ValueError, match="order"):
        model(swapped["input_ids"], swapped["attention_mask"], media(1))


def test_left_padding_gives_the_same_logprobs(tokenizer):
    model = tiny(tokenizer)
    feats = media()
    enc = prompts(tokenizer, ["happy", "sad angry calm worried happy"])
    with torch.no_grad():
        batch = torch.log_softmax(model(enc["input_ids"], enc["attention_mask"], feats), -1)
        for b in range(2):
            n = int(enc["attention_mask"][b].sum())
            single = torch.log_softmax(model(enc["input_ids"][b:b + 1, -n:], enc["attention_mask"][b:b + 1, -n:],
                                             {k: v[b:b + 1] for k, v in feats.items()}), -1)
            assert torch.allclose(batch[b:b + 1, -n:], single, atol=1e-5)


def test_batched_greedy_generation_equals_one_by_one(tokenizer):
    model = tiny(tokenizer)
    feats = media()
    enc = prompts(tokenizer, ["happy", "sad angry calm worried happy"])
    both = model.generate(enc["input_ids"], enc["attention_mask"], feats, max_new_tokens=12, greedy=True).tokens
    for b in range(2):
        n = int(enc["attention_mask"][b].sum())
        one = model.generate(enc["input_ids"][b:b + 1, -n:], enc["attention_mask"][b:b + 1, -n:],
                             {k: v[b:b + 1] for k, v in feats.items()}, max_new_tokens=12, greedy=True).tokens
        assert torch.equal(both[b, :one.shape[1]], one[0])


def test_generation_pads_after_eos(tokenizer):
    model = tiny(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    head = model.llm.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[eos] = 5.0  # EOS gets about a third of the mass: rows stop early, at different steps
    head.bias = torch.nn.Parameter(bias)
    enc = prompts(tokenizer, ["happy", "sad", "angry", "calm", "worried", "tense"])
    g = torch.Generator().manual_seed(0)
    gen = model.generate(enc["input_ids"], enc["attention_mask"], media(6), max_new_tokens=40, generator=g)
    out, mask = gen.tokens, gen.mask
    assert (out == eos).any(1).all() and out.shape[1] < 40  # every row stopped, and generation ended early
    assert (mask == 0).any()  # some row stopped before the longest one: there is padding to check
    assert torch.all((out == pad) | (mask == 1))  # after the first EOS there is only padding


@pytest.mark.parametrize("tokens, mask", [
    ([5, 6, 2, 0, 0], [1, 1, 1, 0, 0]),   # EOS (2) included
    ([5, 6, 7, 8, 9], [1, 1, 1, 1, 1]),   # truncated: no EOS
    ([2, 2, 2, 2, 2], [1, 0, 0, 0, 0]),   # pad == eos: only the first EOS counts
    ([5, 2, 5, 2, 5], [1, 1, 0, 0, 0]),
])
def test_completion_mask(tokens, mask):
    out = M.find_stops(torch.tensor([tokens]), stop_ids=2)
    assert out.mask.tolist() == [mask] and out.stopped.tolist() == [2 in tokens]


def test_completion_mask_with_two_stop_ids():
    tokens = torch.tensor([[5, 3, 2, 3], [5, 2, 3, 2], [5, 6, 7, 8], [3, 3, 3, 3]])
    out = M.find_stops(tokens, [2, 3])
    assert out.mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.stopped.tolist() == [True, True, False, True]


def two_stop_model(tokenizer):
    """The tiny model whose LM lists two stop ids, as Qwen2.5-Instruct's generation config does: <|im_end|>
    (the tokenizer's EOS) and <|endoftext|> (also the pad token)."""
    model = tiny(tokenizer)
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.llm.generation_config.eos_token_id = stops
    return model, stops


def test_generation_stops_at_either_stop_id(tokenizer):
    model, (im_end, endoftext) = two_stop_model(tokenizer)
    assert model.stop_ids == sorted([im_end, endoftext])
    head = model.llm.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[[im_end, endoftext]] = 4.5  # each stop gets a good share of the mass: rows stop at either, early
    head.bias = torch.nn.Parameter(bias)
    enc = prompts(tokenizer, ["happy", "sad", "angry", "calm", "worried", "tense", "glad", "low"])
    gen = model.generate(enc["input_ids"], enc["attention_mask"], media(8), max_new_tokens=40,
                         generator=torch.Generator().manual_seed(0))
    out = gen.tokens
    is_stop = (out == im_end) | (out == endoftext)
    first = is_stop.long().argmax(1)  # each row's first stop token
    ends = out[torch.arange(len(out)), first]
    assert is_stop.any(1).all() and out.shape[1] < 40  # every row stopped; generation ended early
    assert (ends == im_end).any() and (ends == endoftext).any()  # rows ended at each of the two ids
    mask = gen.mask
    assert mask.sum(1).tolist() == (first + 1).tolist()  # the mask includes the first stop of either kind
    assert torch.all((out == tokenizer.pad_token_id) | (mask == 1))  # only padding after it


def test_sft_targets_end_with_a_stop_id_whatever_the_generation_config_lists(tokenizer):
    import data
    model = tiny(tokenizer)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.llm.generation_config.eos_token_id = endoftext  # one id, and not the tokenizer's EOS
    ex = data.tokenize_example(model.tokenizer, data.Clip("c", "['happy']", "hi"), think=False, n_tokens=1)
    assert ex["labels"][-1] in model.stop_ids and endoftext in model.stop_ids


def test_completion_texts_end_before_the_first_stop(tokenizer):
    model, (im_end, endoftext) = two_stop_model(tokenizer)
    happy, sad = (tokenizer.encode(w, add_special_tokens=False) for w in ("happy", " sad"))
    # a plain word as a third stop id: special or not, the text ends before the first stop
    model.llm.generation_config.eos_token_id = [im_end, endoftext, sad[0]]
    rows = [happy + [endoftext] + happy + [im_end], happy + sad + happy, happy + [im_end] + happy]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [endoftext] * (width - len(r)) for r in rows])
    assert model.completion_texts(M.find_stops(tokens, model.stop_ids)) == ["happy", "happy", "happy"]


def test_sample_token_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = M.sample_token(logits, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    nucleus = M.sample_token(logits, top_p=0.75, generator=g)  # 0.5 + 0.3 is the smallest prefix >= 0.75
    assert set(nucleus.tolist()) == {0, 1}
    nucleus = M.sample_token(logits, top_p=0.85, generator=g)  # 0.8 < 0.85: token 2 joins
    assert set(nucleus.tolist()) == {0, 1, 2}
    plain = M.sample_token(logits, generator=g)
    freq = torch.bincount(plain, minlength=4).float() / len(plain)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    cold = M.sample_token(logits, temperature=0.05, generator=g)
    assert (cold == 0).float().mean() > 0.99


def straightforward_logprobs(hidden, head, targets, temperature, banned):
    """The reference: full (N, V) logits, banned columns at -inf, log-softmax, gather."""
    logits = head(hidden).float() / temperature
    logits[..., banned] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("autocast", [False, True])
def test_token_logprobs_values_and_gradients_equal_the_straightforward_computation(autocast):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50)
    with torch.no_grad():
        head.bias.normal_(generator=g)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    banned = [3, 17]
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[torch.isin(targets, torch.tensor(banned))] = 4  # a banned target has log-prob -inf in both
    weights = torch.randn(3, 7, generator=g)  # an arbitrary upstream gradient
    results = []
    for fn in (straightforward_logprobs, lambda *a: M.token_logprobs(*a[:4], chunk=4, banned=a[4])):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp = fn(hidden, head, targets, 0.7, banned)
        grads = torch.autograd.grad((logp * weights).sum(), [hidden, head.weight, head.bias])
        results.append((logp, *grads))
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    for want, got in zip(*results):
        assert got.dtype == want.dtype and torch.allclose(got, want, **tol), (got - want).abs().max()


def test_token_logprobs_keeps_no_vocabulary_sized_tensor_for_backward():
    N, D, V = 64, 8, 500
    head = torch.nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp = M.token_logprobs(hidden, head, torch.randint(0, V, (N,)), chunk=16)
    # inputs (hidden, weight) and per-row numbers only: far below the N x V logits
    assert sum(saved) <= N * D + V * D + 4 * N
    logp.sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None


def test_token_logprobs_refuses_a_wrapped_head():
    lora = M.LoRALinear(torch.nn.Linear(8, 20), r=2, alpha=4, dropout=0.0)
    with pytest.raises(TypeError, match="plain nn.Linear"):
        M.token_logprobs(torch.randn(3, 8), lora, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("train_llm", ["lora", "full"])
def test_checkpoint_round_trip(tokenizer, tmp_path, train_llm):
    model = tiny(tokenizer, train_llm=train_llm)
    randomise_lora(model)
    with torch.no_grad():
        model.projector.proj_fused.bias.add_(0.5)
        # an LLM weight that differs from the preset's seeded initialisation: the trained LM (full) or the
        # random-init base (lora, saved in base.safetensors) must come from the checkpoint, not be rebuilt
        model.llm.model.norm.weight.add_(0.1)
    enc = prompts(tokenizer, ["happy", "sad angry"])
    feats = media()
    model.projector.set_feature_stats(feats["video"] * 3 + 1, feats["audio"] - 2)  # buffers must travel too
    with torch.no_grad():
        want = model(enc["input_ids"], enc["attention_mask"], feats)
    M.save_model(model, str(tmp_path / "ckpt"))
    loaded = M.load_model(str(tmp_path / "ckpt"), device="cpu").eval()
    with torch.no_grad():
        assert torch.equal(loaded(enc["input_ids"], enc["attention_mask"], feats), want)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()


def test_wrong_shape_checkpoint_is_refused(tokenizer, tmp_path):
    import json
    model = tiny(tokenizer, train_llm="lora")
    M.save_model(model, str(tmp_path / "ckpt"))
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lora_r"] = 4
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"(?s)trainable.safetensors does not fit.*shape mismatch .*lora_A"):
        M.load_model(str(tmp_path / "ckpt"), device="cpu")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        M.load_model(str(tmp_path), device="cpu")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        M.ModelConfig.from_preset("huge")


def test_named_presets_carry_real_shapes():
    # public dimensions, so random_init builds real shapes without the hub
    assert M.PRESETS["paper"]["arch"]["llm"]["hidden_size"] == 3584
    assert M.PRESETS["qwen0.5b"]["arch"]["llm"]["num_hidden_layers"] == 24
    assert M.PRESETS["paper"]["arch"]["vision"]["projection_dim"] == 768


def test_forward_with_targets_scores_only_the_given_positions(tokenizer):
    model = tiny(tokenizer)
    enc = prompts(tokenizer, ["happy", "sad angry calm"])
    feats = media()
    targets = torch.full_like(enc["input_ids"], -100)
    targets[:, -3:-1] = enc["input_ids"][:, -2:]  # score the last two tokens
    with torch.no_grad():  # placeholders have logit -inf: probability 0 in both
        want = torch.log_softmax(model(enc["input_ids"], enc["attention_mask"], feats).double() / 0.7, -1)
        got = model(enc["input_ids"], enc["attention_mask"], feats, targets=targets, temperature=0.7)
    assert (got[targets == -100] == 0).all()
    picked = want[:, -3:-1].gather(-1, enc["input_ids"][:, -2:, None]).squeeze(-1)
    assert torch.allclose(got[:, -3:-1].double(), picked, atol=1e-5)


def test_feature_statistics_standardise_the_projector_inputs(tokenizer):
    model = tiny(tokenizer)
    feats = media(batch=64)
    shifted = {"video": feats["video"] * 5 + 3, "audio": feats["audio"] * 0.1 - 7}
    model.projector.set_feature_stats(shifted["video"], shifted["audio"])
    with torch.no_grad():  # standardised inputs: the shifted features give what unit features give unshifted
        a = model.projector(shifted["video"], shifted["audio"])
        model.projector.set_feature_stats(feats["video"], feats["audio"])
        b = model.projector(feats["video"], feats["audio"])
    assert torch.allclose(a, b, atol=1e-4)


def test_the_policy_never_emits_a_placeholder(tokenizer):
    model = tiny(tokenizer)
    with torch.no_grad():  # make the placeholders the most likely tokens by far
        model.llm.get_output_embeddings().weight[model.placeholder_ids] *= 500
    enc = prompts(tokenizer, ["happy", "sad"])
    out = model.generate(enc["input_ids"], enc["attention_mask"], media(), max_new_tokens=30,
                         generator=torch.Generator().manual_seed(0)).tokens
    assert out.shape[1] > 0 and not torch.isin(out, torch.tensor(model.placeholder_ids)).any()


def test_fresh_adapters_on_a_fully_trained_model(tokenizer, tmp_path):
    model = tiny(tokenizer, train_llm="full")
    enc = prompts(tokenizer, ["happy", "sad angry"])
    feats = media()
    with torch.no_grad():
        model.llm.model.norm.weight.add_(0.1)  # "trained": no longer the seeded initialisation
        before = model(enc["input_ids"], enc["attention_mask"], feats)
    M.add_lora(model, r=4, alpha=8, train_projector=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(enc["input_ids"], enc["attention_mask"], feats), before)  # B = 0
    randomise_lora(model)
    with torch.no_grad():
        after = model(enc["input_ids"], enc["attention_mask"], feats)
    M.save_model(model, str(tmp_path / "ckpt"))  # the frozen (trained) LLM travels in base.safetensors
    loaded = M.load_model(str(tmp_path / "ckpt"), device="cpu").eval()
    assert loaded.cfg.train_llm == "lora" and loaded.cfg.base_in_checkpoint
    with torch.no_grad():
        assert torch.equal(loaded(enc["input_ids"], enc["attention_mask"], feats), after)
    with pytest.raises(ValueError, match="already"):
        M.add_lora(model, r=4, alpha=8)


def test_random_init_of_a_named_model_needs_no_hub(tmp_path):
    # HF_HUB_OFFLINE=1 (conftest): any download attempt would raise here
    cfg = M.ModelConfig.from_preset("tiny", llm="Qwen/Qwen2.5-0.5B-Instruct", vision="openai/clip-vit-large-patch14",
                                    audio="TencentGameMate/chinese-hubert-large", random_init=True)
    model = M.build_model(cfg, device="cpu")
    assert model.llm.config.vocab_size == 151936 > len(model.tokenizer)  # the real vocabulary size is kept
    M.save_model(model, str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "base.safetensors").is_file()  # random weights travel with the checkpoint


# ---- the static (and compiled) sampler against the eager loop; groups against repeated prompts ----------------

def run_samplers(model, enc, feats, samplers=("eager", "static"), **kw):
    """generate with each decode loop and the same seed: {sampler: Completions}."""
    loops = {"eager": model, "static": M.StaticSampler(model),
             "compiled": M.StaticSampler(model, compiled=True, backend="eager")}  # fullgraph=True: a break raises
    return {s: loops[s].generate(enc["input_ids"], enc["attention_mask"], feats, generator=torch.Generator()
                                 .manual_seed(0), return_stats=True, **kw) for s in samplers}


def assert_same_generation(out, want):
    assert torch.equal(out.tokens, want.tokens)  # and the length: where the last row stopped
    assert torch.equal(out.mask, want.mask) and torch.equal(out.stopped, want.stopped)
    assert torch.allclose(out.logp, want.logp, atol=1e-4) and torch.allclose(out.entropy, want.entropy, atol=1e-4)


def stopping_model(tokenizer):
    """Two stop ids with a good share of the mass: rows stop at different steps, after a few tokens."""
    model, stops = two_stop_model(tokenizer)
    bias = torch.zeros(model.llm.get_output_embeddings().out_features)
    bias[stops] = 2.5
    model.llm.get_output_embeddings().bias = torch.nn.Parameter(bias)
    return model


TEXTS = ["happy", "sad angry calm worried happy sad", "calm", "worried tense glad low high"]  # left padding
GREEDY_TEXTS = ["happy", "sad angry calm worried happy sad", "calm", "tense happy sad", "angry"]


def greedy_stopping_model(tokenizer, enc, feats, limit):
    """The two-stop model with a stop bias under which greedy rows stop at different steps, the longest after
    at least 16 tokens (many decode steps, two completion checks of the static loop) and before `limit` (the
    trimming to the eager loop's length is exercised). Greedy decoding of a random model repeats itself, so
    the bias is searched, not guessed."""
    model, stops = two_stop_model(tokenizer)
    head = model.llm.get_output_embeddings()
    for b in torch.arange(0.5, 1.5, 0.02).tolist():
        bias = torch.zeros(head.out_features)
        bias[stops[0]] = b
        head.bias = torch.nn.Parameter(bias)
        out = model.generate(enc["input_ids"], enc["attention_mask"], feats, limit, greedy=True)
        n = out.mask.sum(1)
        if out.stopped.all() and 16 <= n.max() < limit and len(set(n.tolist())) >= 3:
            return model
    pytest.fail(f"no stop bias makes every greedy row stop within {limit} tokens, the longest after 16")


def test_static_sampler_greedy_equals_eager(tokenizer):
    enc, feats = prompts(tokenizer, GREEDY_TEXTS), media(5)
    model = greedy_stopping_model(tokenizer, enc, feats, limit=30)
    out = run_samplers(model, enc, feats, greedy=True, max_new_tokens=30)
    assert 16 <= out["eager"].tokens.shape[1] < 30  # many decode steps, then the trimming to the eager length
    assert_same_generation(out["static"], out["eager"])


def test_static_sampler_sampled_equals_eager_and_never_emits_a_placeholder(tokenizer):
    model = stopping_model(tokenizer)
    with torch.no_grad():  # the placeholders would be the most likely tokens by far
        model.llm.get_output_embeddings().weight[model.placeholder_ids] *= 500
    enc, feats = prompts(tokenizer, TEXTS * 2), media(8)
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_p=0.9, top_k=30)):
        out = run_samplers(model, enc, feats, max_new_tokens=24, **kw)
        assert out["eager"].tokens.shape[1] > 8  # longer than one completion check of the static loop
        assert_same_generation(out["static"], out["eager"])
        assert not torch.isin(out["static"].tokens, torch.tensor(model.placeholder_ids)).any()


@pytest.mark.parametrize("sampler", ["eager", "static"])
@pytest.mark.parametrize("greedy", [True, False])
def test_a_group_equals_its_prompt_repeated(tokenizer, sampler, greedy):
    """G completions of each prompt from one prefill (its keys and values repeated for its G rows) are the
    completions of the prompt repeated G times: the same draws from the same generator, the same log-probs.
    Prompts of different real lengths, so that rows of another clip (a cache expanded in the wrong order) differ."""
    texts, G = GREEDY_TEXTS if greedy else TEXTS, 3
    enc, feats = prompts(tokenizer, texts), media(len(texts))
    model = greedy_stopping_model(tokenizer, enc, feats, 30) if greedy else stopping_model(tokenizer)
    repeated = {"input_ids": enc["input_ids"].repeat_interleave(G, 0),
                "attention_mask": enc["attention_mask"].repeat_interleave(G, 0)}
    kw = dict(greedy=True, max_new_tokens=30) if greedy else dict(temperature=1.2, max_new_tokens=12)
    group = run_samplers(model, enc, feats, [sampler], group_size=G, **kw)[sampler]
    plain = run_samplers(model, repeated, {k: v.repeat_interleave(G, 0) for k, v in feats.items()}, [sampler],
                         **kw)[sampler]
    assert group.tokens.shape[0] == len(texts) * G and group.tokens.shape[1] > 8
    assert_same_generation(group, plain)
    if not greedy:  # the G rows of a prompt are G different draws
        assert not all(torch.equal(group.tokens[i], group.tokens[i + 1]) for i in range(0, len(texts) * G, G))


def test_the_reference_copies_no_decode_cache(tokenizer):
    """frozen_copy of a policy that has generated with the static sampler: the reference gets no copy of the
    policy's sampler and its KV cache (rows x slots per layer, gigabytes at the paper's sizes), and scores and
    decodes as the policy does."""
    model = stopping_model(tokenizer)
    model.fast_sampler = M.StaticSampler(model)  # what use_sampler(True) does, uncompiled
    enc, feats = prompts(tokenizer, TEXTS), media(4)
    tokens = model.decode(enc["input_ids"], enc["attention_mask"], feats, max_new_tokens=8, greedy=True).tokens
    ref = M.frozen_copy(model)
    assert ref.fast_sampler is None and model.fast_sampler.cache is not None
    ids = torch.cat([enc["input_ids"], tokens], 1)
    att = torch.cat([enc["attention_mask"], torch.ones_like(tokens)], 1)
    with torch.no_grad():
        assert torch.equal(ref(ids, att, feats), model(ids, att, feats))
    assert torch.equal(ref.decode(enc["input_ids"], enc["attention_mask"], feats, max_new_tokens=8,
                                  greedy=True).tokens, tokens)


def test_compiled_decode_step_has_no_graph_break_and_equals_eager(tokenizer):
    model = stopping_model(tokenizer)
    enc, feats = prompts(tokenizer, TEXTS), media(4)
    out = run_samplers(model, enc, feats, ("eager", "compiled"), temperature=0.9, max_new_tokens=12)
    assert_same_generation(out["compiled"], out["eager"])


def test_use_sampler_chooses_the_decode_loop(tokenizer):
    model = tiny(tokenizer)
    assert model.use_sampler(None).fast_sampler is None  # a CPU: the eager loop
    assert model.use_sampler(False).fast_sampler is None
    fast = model.use_sampler(True).fast_sampler
    assert isinstance(fast, M.StaticSampler) and fast.compiled and fast.model is model
