"""Weights from local HF-format folders (conftest.hf_folders) with any preset, every encoder kind, clear refusals,
the whole pipeline on them as a user runs it, and the GPU's bf16 dtype path on the CPU."""

import csv
import dataclasses
import json
import math

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import data
import grpo
import model as M
import sft
from conftest import run_script


def build(folders, preset="tiny", vision="clip", audio="hubert", **overrides):
    cfg = M.ModelConfig.from_preset(preset, llm=str(folders["qwen2"]), vision=str(folders[vision]),
                                    audio=str(folders[audio]), **{"train_llm": "lora", **overrides})
    return M.build_model(cfg, device="cpu").eval()


def clip_media(batch=2, n_frames=8, size=32, audio_clips=2, seconds=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, n_frames, size, size, 3), dtype=torch.uint8, generator=g)
    audio = torch.randn(batch, audio_clips, round(seconds * data.SAMPLE_RATE), generator=g)
    return frames, audio


def hf_pixels(frames, family):
    """What a CLIP / SigLIP processor gives for frames already at the tower's size: scale, normalise."""
    mean, std = (torch.tensor(x).view(1, 3, 1, 1) for x in M.PIXEL_STATS[family])
    return (frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255 - mean) / std


def prompts(tokenizer, n_tokens, subtitles=("happy", "sad angry")):
    return data.collate_prompts(tokenizer, list(subtitles), True, n_tokens)


@pytest.mark.parametrize("preset", ["tiny", "qwen0.5b"])
def test_folders_load_with_any_preset(hf_folders, preset):
    model = build(hf_folders, preset)
    folder_llm = tf.AutoModelForCausalLM.from_pretrained(hf_folders["qwen2"])
    # the folder's LLM, not a random model of the preset's shape (the bug: 151,936 x 96 from the tiny preset)
    assert model.llm.get_input_embeddings().weight.shape == folder_llm.get_input_embeddings().weight.shape
    assert type(model.llm) is tf.Qwen2ForCausalLM
    ours = {k: v for k, v in model.llm.state_dict().items() if "lora_" not in k}  # LoRA keeps the base's names
    assert ours.keys() == folder_llm.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in folder_llm.state_dict().items())
    assert model.tokenizer.get_vocab().items() >= tf.AutoTokenizer.from_pretrained(hf_folders["qwen2"]).get_vocab().items()
    # a plain CLIPVisionModel stays one: no random projection slipped in; its pooled output is the feature
    assert type(model.vision) is tf.CLIPVisionModel and model.vision_output == "pooler_output"
    clip = tf.CLIPVisionModel.from_pretrained(hf_folders["clip"]).eval()
    hubert = tf.HubertModel.from_pretrained(hf_folders["hubert"]).eval()
    for ref, ours in ((clip, model.vision), (hubert, model.audio)):
        assert ref.state_dict().keys() == ours.state_dict().keys()
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in ref.state_dict().items())
    frames, audio = clip_media()
    feats = model.encode_media(frames, audio)
    with torch.no_grad():
        want = clip(pixel_values=hf_pixels(frames, "clip")).pooler_output.view(2, 8, -1)
    assert torch.allclose(feats["video"], want, atol=1e-5)
    assert feats["audio"].shape == (2, 2, 48)
    # config.json's record: what was built, from where
    comp = model.cfg.components
    assert comp["llm"] == {"weights": str(hf_folders["qwen2"]), "random_init": False, "class": "Qwen2ForCausalLM",
                           "model_type": "qwen2", "sizes": comp["llm"]["sizes"]}
    assert comp["llm"]["sizes"]["vocab_size"] == folder_llm.config.vocab_size
    assert comp["vision"]["class"] == "CLIPVisionModel" and comp["vision"]["features"] == "pooler_output"
    assert comp["audio"]["class"] == "HubertModel" and not comp["audio"]["random_init"]
    assert model.cfg.arch == {}  # no random component: no architecture recipe to mislead a reader


def test_mixed_folder_and_random_components_round_trip(hf_folders, tmp_path):
    # a folder LLM with the tiny preset's random encoders: only the random parts travel in base.safetensors
    cfg = M.ModelConfig.from_preset("tiny", llm=str(hf_folders["qwen2"]), train_llm="lora")
    model = build_from(cfg)
    assert not model.cfg.components["llm"]["random_init"] and model.cfg.components["vision"]["random_init"]
    assert set(model.cfg.arch) == {"vision", "audio"}
    with torch.no_grad():
        for p in model.parameters():  # "trained": adapters and projector away from their initialisation
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    M.save_model(model, str(tmp_path / "ckpt"))
    saved = load_file(str(tmp_path / "ckpt" / "base.safetensors"))
    assert saved and all(k.startswith(("vision.", "audio.")) for k in saved)
    loaded = M.load_model(str(tmp_path / "ckpt"), device="cpu").eval()
    enc, media = prompts(model.tokenizer, model.cfg.n_tokens), model.encode_media(*clip_media())
    with torch.no_grad():
        assert torch.equal(loaded(enc["input_ids"], enc["attention_mask"], media),
                           model(enc["input_ids"], enc["attention_mask"], media))
    assert torch.equal(loaded.encode_media(*clip_media())["video"], media["video"])


def build_from(cfg):
    return M.build_model(cfg, device="cpu").eval()


@pytest.mark.parametrize("vision,audio", [("clip_proj", "whisper"), ("siglip", "hubert")])
def test_every_encoder_kind(hf_folders, tmp_path, vision, audio):
    model = build(hf_folders, vision=vision, audio=audio)
    frames, wave = clip_media()
    feats = model.encode_media(frames, wave)
    family = "siglip" if vision == "siglip" else "clip"
    cls = {"clip_proj": tf.CLIPVisionModelWithProjection, "siglip": tf.SiglipVisionModel,
           "clip": tf.CLIPVisionModel}[vision]
    ref = cls.from_pretrained(hf_folders[vision]).eval()
    with torch.no_grad():
        out = ref(pixel_values=hf_pixels(frames, family))
    want = out.image_embeds if vision == "clip_proj" else out.pooler_output
    assert torch.allclose(feats["video"], want.view(2, 8, -1), atol=1e-5)
    assert feats["video"].shape[-1] == (24 if vision == "clip_proj" else 40)
    if audio == "whisper":  # the encoder of the folder's WhisperModel, mean over the frames the clip covers
        whisper = tf.WhisperModel.from_pretrained(hf_folders["whisper"]).get_encoder().eval()
        fe = tf.WhisperFeatureExtractor(feature_size=80)
        mel = fe(list(wave.flatten(0, 1).numpy()), sampling_rate=data.SAMPLE_RATE, return_tensors="pt").input_features
        with torch.no_grad():
            want = whisper(input_features=mel).last_hidden_state[:, :50].mean(1)  # 1 s = 50 frames of 20 ms
        assert torch.allclose(feats["audio"], want.view(2, 2, -1), atol=1e-5)
    enc = prompts(model.tokenizer, model.cfg.n_tokens)
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"], feats)
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool).index_fill(0, torch.tensor(model.placeholder_ids), True)
    assert torch.isfinite(logits[..., ~banned]).all() and (logits[..., banned] == float("-inf")).all()
    M.save_model(model, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt" / "base.safetensors").exists()  # every frozen weight comes from a folder
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["vision"] == str(hf_folders[vision]) and saved["components"]["vision"]["class"] == cls.__name__
    loaded = M.load_model(str(tmp_path / "ckpt"), device="cpu").eval()
    with torch.no_grad():
        assert torch.equal(loaded(enc["input_ids"], enc["attention_mask"], feats), logits)


def test_bad_weights_are_refused_with_a_clear_message(hf_folders, tmp_path):
    def refused(match, **kw):
        with pytest.raises(SystemExit, match=match):
            sft.check_args(sft.Args(**kw))
    refused(r"--random_init draws random weights.*--llm", llm=str(hf_folders["qwen2"]), random_init=True)
    refused(r"--vision .*hubert.*a 'hubert' model, but --vision needs a CLIP or SigLIP", vision=str(hf_folders["hubert"]))
    refused(r"--audio .*clip.*but --audio needs one of hubert", audio=str(hf_folders["clip"]))
    refused(r"--llm .*nowhere: no such folder", llm=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    refused(r"--llm .*empty: not a Hugging Face model folder \(no config.json\)", llm=str(tmp_path / "empty"))
    sft.check_args(sft.Args(llm=str(hf_folders["qwen2"]), vision=str(hf_folders["siglip"]),
                            audio=str(hf_folders["whisper"])))  # good folders pass
    # a checkpoint refuses to load when its folder now holds another architecture
    llm = tmp_path / "llm"
    tf.Qwen2ForCausalLM.from_pretrained(hf_folders["qwen2"]).save_pretrained(llm)
    tf.AutoTokenizer.from_pretrained(hf_folders["qwen2"]).save_pretrained(llm)
    cfg = M.ModelConfig.from_preset("tiny", llm=str(llm), train_llm="lora")
    M.save_model(build_from(cfg), str(tmp_path / "ckpt"))
    with pytest.raises(SystemExit, match="--llm .*but .*ckpt was built on"):
        sft.check_same_weights(M.load_model(str(tmp_path / "ckpt"), device="cpu").cfg,
                               sft.Args(llm=str(hf_folders["qwen2"])), str(tmp_path / "ckpt"))
    other = tf.Qwen2Config.from_pretrained(llm)
    other.num_hidden_layers, other.layer_types = 1, other.layer_types[:1]
    tf.Qwen2ForCausalLM(other).save_pretrained(llm)  # another model in the same folder
    with pytest.raises(ValueError, match=r"config.json: the llm was trained as .*now builds"):
        M.load_model(str(tmp_path / "ckpt"), device="cpu")


# ----------------------------------------------------------------------------------------------------------
# bf16: the GPU's dtype path (frozen weights in bf16, autocast around every pass, float32 trainables) on the CPU


def encoded(model, synth_data, names):
    clips = [c for c in data.read_split(str(synth_data), "train", need_reasons=True) if c.name in names]
    ds = data.ClipDataset(str(synth_data), clips, model.cfg.n_frames, model.image_size, model.cfg.audio_clips,
                          model.cfg.clip_seconds)
    with model.autocast():
        return clips, data.encode_clips(ds, model.encode_media, progress=False)


def trainable_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


@pytest.mark.parametrize("train_llm", ["lora", "full"])
def test_bf16_sft_and_grpo_steps_on_cpu(hf_folders, synth_data, monkeypatch, train_llm):
    names = [c.name for c in data.read_split(str(synth_data), "train")[:2]]
    fp32 = build(hf_folders, lora_dropout=0.0, train_llm=train_llm)  # no dropout: one function in both dtypes
    monkeypatch.setenv("AFFECTRL_BF16", "1")
    bf16 = build(hf_folders, lora_dropout=0.0, train_llm=train_llm)
    assert bf16.autocast_dtype == torch.bfloat16 and fp32.autocast_dtype is None
    assert {p.dtype for p in bf16.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    # the LLM's blocks compute in bf16 even where their weights are float32 (full training): autocast is on
    seen = []
    bf16.llm.model.layers[0].mlp.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    assert torch.equal(trainable_values(bf16), trainable_values(fp32))  # the same start in both dtypes
    models = {"fp32": fp32, "bf16": bf16}
    clips, feats = {}, {}
    for name, model in models.items():  # each model's own encoders, in its own dtype
        clips[name], feats[name] = encoded(model, synth_data, names)
        media = data.stack_media(feats[name], names)
        model.projector.set_feature_stats(media["video"], media["audio"])

    # SFT: one step of the masked loss
    losses, grads = {}, {}
    for name, model in models.items():
        examples = [data.tokenize_example(model.tokenizer, c, True, model.cfg.n_tokens) for c in clips[name]]
        batch = data.collate_train(examples, model.tokenizer.pad_token_id)
        model.train()
        with model.autocast():
            total, count = sft.sft_loss_sum(model, batch, data.stack_media(feats[name], names))
        (total / count).backward()
        losses[name], grads[name] = (total / count).item(), trainable_grads(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.isfinite(torch.tensor(losses["bf16"])) and torch.isfinite(grads["bf16"]).all()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.cosine_similarity(grads["bf16"], grads["fp32"], 0) > 0.99
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}  # after the step too

    # GRPO: a bf16 rollout (sampling, reference scoring), then the update of the same samples in both dtypes
    args = grpo.Args(group_size=3, max_new_tokens=8, micro_batch=8)
    ep = grpo.rollout(bf16, clips["bf16"], feats["bf16"], group_size=3, think=True, max_new_tokens=8,
                      temperature=args.temperature, generator=torch.Generator().manual_seed(0))
    ep.loss_mask = grpo.loss_mask_of(ep.mask, ep.truncated)
    ep.adv = torch.randn(ep.tokens.shape[0], generator=torch.Generator().manual_seed(0))  # random models earn none
    eps = {"bf16": ep, "fp32": dataclasses.replace(ep, media=data.stack_media(feats["fp32"], names))}
    for name, e in eps.items():
        e.ref_logp = grpo.episode_logprobs(M.frozen_copy(models[name]), e, temperature=args.temperature,
                                           micro_batch=8)
    for name, e in eps.items():
        stats = grpo.accumulate_gradients(
            models[name], models[name], e, n_seqs=float(ep.tokens.shape[0]), n_tokens=float(ep.loss_mask.sum()),
            world=1, temperature=args.temperature, eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
            kl=args.kl, aggregation=args.aggregation, max_new_tokens=args.max_new_tokens, micro_batch=8)
        grads[name] = trainable_grads(models[name])
        assert math.isfinite(stats.loss) and torch.isfinite(grads[name]).all()
    keep = ep.loss_mask.bool()
    assert torch.isfinite(eps["bf16"].ref_logp).all()
    assert torch.allclose(eps["bf16"].ref_logp[keep], eps["fp32"].ref_logp[keep], atol=0.1)
    assert torch.cosine_similarity(grads["bf16"], grads["fp32"], 0) > 0.98


def trainable_values(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline on folders, as a user runs it


def test_sft_grpo_eval_on_folders_with_resume(hf_folders, synth_data, tmp_path):
    folders = ["--llm", hf_folders["qwen2"], "--vision", hf_folders["clip"], "--audio", hf_folders["hubert"]]
    cache = ["--feature_cache", tmp_path / "features", "--data", synth_data]
    sft_flags = [*folders, *cache, "--out", tmp_path / "sft", "--train_llm", "lora", "--batch_size", 4,
                 "--micro_batch", 4, "--max_steps", 3, "--eval_every", 0, "--eval_samples", 3, "--max_new_tokens", 12,
                 "--log_every", 1]
    run_script("sft.py", *sft_flags, "--stop_after", 1)
    done = run_script("sft.py", *sft_flags, "--resume")  # the same command line, continued
    grpo_flags = [*cache, "--init", tmp_path / "sft", "--out", tmp_path / "grpo", "--group_size", 2,
                  "--clips_per_step", 2, "--max_new_tokens", 8, "--max_steps", 2, "--eval_every", 0,
                  "--eval_samples", 2, "--show_every", 0]
    run_script("grpo.py", *grpo_flags, "--stop_after", 1)
    run_script("grpo.py", *grpo_flags, "--resume")
    run_script("eval.py", "--ckpt", tmp_path / "grpo", "--data", synth_data, "--out", tmp_path / "eval",
               "--max_new_tokens", 8, "--feature_cache", tmp_path / "features")

    # what was trained, as config.json says: the folders, nothing random, the classes built
    for stage in ("sft", "grpo"):
        saved = json.loads((tmp_path / stage / "final" / "config.json").read_text())
        assert [saved[p] for p in ("llm", "vision", "audio")] == [str(hf_folders[k]) for k in ("qwen2", "clip", "hubert")]
        assert {p: (c["weights"], c["random_init"], c["class"]) for p, c in saved["components"].items()} == {
            "llm": (str(hf_folders["qwen2"]), False, "Qwen2ForCausalLM"),
            "vision": (str(hf_folders["clip"]), False, "CLIPVisionModel"),
            "audio": (str(hf_folders["hubert"]), False, "HubertModel")}
        assert saved["components"]["vision"]["features"] == "pooler_output" and saved["arch"] == {}
        assert not (tmp_path / stage / "final" / "base.safetensors").exists()  # the folders hold every frozen weight
    losses = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [m["step"] for m in losses if "train/loss" in m] == [1, 2, 3]  # 1 before the stop, 2 and 3 resumed
    assert json.loads((tmp_path / "grpo" / "final" / "trainer_state.json").read_text())["step"] == 2

    # the SFT checkpoint in this process writes the greedy completions its trained model printed at the end
    sft_model = M.load_model(str(tmp_path / "sft" / "final"), device="cpu").eval()
    val = data.read_split(str(synth_data), "val")[:3]
    media = encode_split(sft_model, synth_data, val)
    texts = sft_model.complete([c.subtitle for c in val], media, max_new_tokens=12, greedy=True)
    for c, text in zip(val, texts):
        assert f"  {c.name}  gt {c.labels}\n    -> {text}\n" in done.stdout

    # the final GRPO checkpoint: the folders' shapes and frozen weights, and eval.py's greedy completions
    model = M.load_model(str(tmp_path / "grpo" / "final"), device="cpu").eval()
    folder_llm = tf.AutoModelForCausalLM.from_pretrained(hf_folders["qwen2"])
    assert model.llm.get_input_embeddings().weight.shape == folder_llm.get_input_embeddings().weight.shape
    base = {k: v for k, v in model.llm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in folder_llm.state_dict().items())
    clip = tf.CLIPVisionModel.from_pretrained(hf_folders["clip"]).state_dict()
    assert all(torch.equal(model.vision.state_dict()[k], v) for k, v in clip.items())
    trained = load_file(str(tmp_path / "grpo" / "final" / "trainable.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # adapters moved off zero
    test = data.read_split(str(synth_data), "test")
    media = encode_split(model, synth_data, test)
    texts = model.complete([c.subtitle for c in test], media, max_new_tokens=8, batch_size=64, greedy=True)
    with open(tmp_path / "eval" / "per_clip.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["decoding"] == "greedy"]
    assert {r["name"]: r["completion"] for r in rows} == {c.name: t for c, t in zip(test, texts)}


def encode_split(model, root, clips) -> dict:
    ds = data.ClipDataset(str(root), clips, model.cfg.n_frames, model.image_size, model.cfg.audio_clips,
                          model.cfg.clip_seconds)
    feats = data.encode_clips(ds, model.encode_media, progress=False)
    return data.stack_media(feats, [c.name for c in clips])
