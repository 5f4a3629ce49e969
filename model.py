"""model.py: a compact AffectGPT (frozen encoders -> attention pooling -> pre-fusion -> projectors -> LLM + LoRA).

    frames (B, N, H, W, 3) --vision encoder (frozen)--> (B, N, Dv) --softmax attention pool--> (B, Dv) --+
    audio  (B, C, S)       --audio encoder (frozen)---> (B, C, Da) --softmax attention pool--> (B, Da) --+
                                                                                                      |
    pre-fusion: both pooled vectors -> common width, an MLP on their concatenation gives 2 softmax weights,
    the weighted sum is the fused vector. Linear projectors turn (fused, audio, video) into n_tokens LLM input
    embeddings each; they replace the placeholder tokens <|fused|>, <|audio|>, <|video|> of the prompt.

The LLM is any transformers causal LM (Qwen2.5 in the paper) with hand-written LoRA (`LoRALinear`) on the
attention and MLP projections, or trained in full. `encode_media` runs the frozen encoders once per clip, so
GRPO reuses the features for all G samples, the reference pass and every update. `frozen_copy()` gives GRPO its
reference, the initial policy: frozen copies of the trainable tensors sharing every frozen one (no second copy
of the base LLM). `generate` is the decode loop written to be read; `StaticSampler` beside it gives the same
draws from a preallocated cache and a compilable decode step; `use_sampler` (the stages' --compile) chooses
which one `decode` runs.

Presets (each also carries the public architecture dimensions, so `random_init=True` builds the real shapes
without the hub, for throughput and memory planning):
- tiny: random-init Qwen2-style LM, CLIP vision tower and HuBERT, all a few layers wide; a byte-level BPE
  tokenizer trained on the fly from the prompt texts, our lexicon and the training data's text (deterministic for
  the same texts and seed). No downloads.
  Its LLM is trained in full by default: a random base has nothing for LoRA to preserve.
- qwen0.5b: Qwen/Qwen2.5-0.5B-Instruct, google/siglip-base-patch16-224, facebook/hubert-base-ls960.
- paper: Qwen/Qwen2.5-7B-Instruct, openai/clip-vit-large-patch14, TencentGameMate/chinese-hubert-large,
  LoRA r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up, down.

Departures from AffectGPT: the temporal pooling uses a softmax over time steps (upstream has none); audio
clips are normalised to zero mean and unit variance before the encoder whatever the encoder's own feature
extractor does; frames are resized (shorter side) and centre-cropped by us, then normalised with the
encoder family's mean and std.

Weights: each component (llm, vision, audio) loads from its HF name or local HF-format folder whatever the
preset; it is random-init from the preset's arch only when it has no name, or with random_init=True (all
components). A CLIP tower uses its projection's image_embeds when its weights have a projection, else (a plain
CLIPVisionModel) its pooler_output. Frozen weights are bf16 on GPU (AFFECTRL_BF16=1: on CPU too).

A checkpoint directory holds `config.json` (the ModelConfig: names or folders, and `components`, what was
built: weights, random_init, class and sizes per component), `trainable.safetensors` (projector and LoRA, or
projector and the whole LM), `tokenizer/`, and for random-init components (or an LLM trained before fresh
adapters) `base.safetensors` (the frozen weights, which no hub or folder can give back). No pickle.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data  # the one prompt builder of every stage, the tokenizer corpus, the audio rate

PLACEHOLDERS = ("<|fused|>", "<|audio|>", "<|video|>")  # in this order in every prompt
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# normalisation of frames per vision family (CLIP's published statistics; SigLIP uses 0.5 / 0.5)
PIXEL_STATS = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
               "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}

# Public architecture facts of each named model (from their published configs), used for random_init.
_QWEN_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1e6})
_QWEN_7B = dict(_QWEN_05B, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
_SIGLIP_BASE = dict(model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=16)
_CLIP_L14 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
_HUBERT_BASE = dict(model_type="hubert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)
_HUBERT_LARGE = dict(model_type="hubert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
_TINY = {
    "llm": dict(model_type="qwen2", hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    "vision": dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=32, patch_size=4, projection_dim=32),
    "audio": dict(model_type="hubert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, conv_dim=[64] * 7, num_conv_pos_embeddings=16,
                  num_conv_pos_embedding_groups=4),
}

PRESETS = {
    "tiny": dict(llm=None, vision=None, audio=None, arch=_TINY, train_llm="full",
                 n_frames=8, audio_clips=2, clip_seconds=1.0, fusion_width=64, tokenizer_vocab=1024, n_tokens=4),
    "qwen0.5b": dict(llm="Qwen/Qwen2.5-0.5B-Instruct", vision="google/siglip-base-patch16-224",
                     audio="facebook/hubert-base-ls960",
                     arch={"llm": _QWEN_05B, "vision": _SIGLIP_BASE, "audio": _HUBERT_BASE}),
    "paper": dict(llm="Qwen/Qwen2.5-7B-Instruct", vision="openai/clip-vit-large-patch14",
                  audio="TencentGameMate/chinese-hubert-large",
                  arch={"llm": _QWEN_7B, "vision": _CLIP_L14, "audio": _HUBERT_LARGE}),
}


@dataclass
class ModelConfig:
    """Everything `build_model` needs; saved as config.json in every checkpoint."""
    preset: str = "tiny"
    llm: str | None = None        # HF name or local folder of a causal LM (None: random init from arch)
    vision: str | None = None     # CLIP / SigLIP vision tower
    audio: str | None = None      # HuBERT / Wav2Vec2 / WavLM / Whisper encoder
    arch: dict = field(default_factory=dict)  # HF config kwargs per random-init component
    random_init: bool = False     # every component from arch with random weights, names kept as labels (no hub)
    train_llm: str = "lora"       # "lora" or "full"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple = LORA_TARGETS
    train_projector: bool = True  # the projector trains (False: frozen, e.g. in GRPO with fresh adapters)
    base_in_checkpoint: bool = False  # the frozen LLM weights differ from the named ones: save them too
    n_tokens: int = 1             # LLM tokens per modality (paper: 1)
    n_frames: int = 8             # frames sampled per clip
    audio_clips: int = 8          # audio clips per clip (paper: 8 x 2 s)
    clip_seconds: float = 2.0
    fusion_width: int = 256
    tokenizer_vocab: int = 1024   # size of the on-the-fly tokenizer (random-init LLM without a name only)
    seed: int = 0
    # what build_model built, per component (written by it, checked on load): weights (name or folder, None when
    # random), random_init, class, the vision features used, and the architecture's sizes
    components: dict = field(default_factory=dict)

    def is_random(self, part: str) -> bool:
        """Whether component `part` ("llm", "vision", "audio") gets random weights from arch[part]."""
        return self.random_init or getattr(self, part) is None

    @staticmethod
    def from_preset(name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = dict(PRESETS[name], preset=name)
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return ModelConfig(**cfg)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (frozen weights stored in it, bf16 autocast around every pass); float32 on CPU, unless the
    environment sets AFFECTRL_BF16=1: then the CPU takes the GPU's dtype path (for tests and debugging)."""
    if torch.device(device).type == "cuda" or os.environ.get("AFFECTRL_BF16", "0") == "1":
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W, b frozen and B initialised to zero.

    `weight` and `bias` keep the names nn.Linear gives them, so the base state dict is unchanged by wrapping.
    A and B are float32 (they are the trained parameters) and are cast to the input's dtype for the product.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        h = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + self.scale * h



def apply_lora(module: nn.Module, targets, r: int, alpha: float, dropout: float) -> int:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))
                count += 1
    if count == 0:
        raise ValueError(f"LoRA: no nn.Linear named any of {list(targets)} in {type(module).__name__}")
    return count


# ----------------------------------------------------------------------------------------------------------
# The trainable multimodal part


class AttentionPool(nn.Module):
    """Softmax attention over time: a linear score per step, the weighted sum of the steps."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x):  # (B, T, D) -> (B, D)
        w = torch.softmax(self.score(x).squeeze(-1), dim=-1)  # (B, T)
        return torch.einsum("bt,btd->bd", w, x)


class Projector(nn.Module):
    """Pooled audio and video -> pre-fusion -> (fused, audio, video) x n_tokens LLM embeddings."""

    def __init__(self, d_video: int, d_audio: int, d_llm: int, width: int, n_tokens: int):
        super().__init__()
        self.n_tokens, self.d_llm = n_tokens, d_llm
        self.pool_video, self.pool_audio = AttentionPool(d_video), AttentionPool(d_audio)
        self.common_video, self.common_audio = nn.Linear(d_video, width), nn.Linear(d_audio, width)
        self.fusion = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 2))
        self.proj_fused = nn.Linear(width, n_tokens * d_llm)
        self.proj_audio = nn.Linear(d_audio, n_tokens * d_llm)
        self.proj_video = nn.Linear(d_video, n_tokens * d_llm)
        # per-dimension statistics of the frozen features over the training set (set once by the first stage):
        # random and pretrained encoders alike put most of a feature's norm in a direction shared by every clip
        for name, dim in (("video", d_video), ("audio", d_audio)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    @torch.no_grad()
    def set_feature_stats(self, video: torch.Tensor, audio: torch.Tensor):
        """Standardise with these features' statistics: video (N, T, Dv), audio (N, C, Da)."""
        for name, x in (("video", video), ("audio", audio)):
            x = x.flatten(0, -2).float()
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp(min=1e-4))

    def forward(self, video, audio):  # (B, N, Dv), (B, C, Da) -> (B, 3 * n_tokens, d_llm)
        video = (video - self.video_mean) / self.video_std
        audio = (audio - self.audio_mean) / self.audio_std
        v, a = self.pool_video(video), self.pool_audio(audio)
        cv, ca = self.common_video(v), self.common_audio(a)
        w = torch.softmax(self.fusion(torch.cat([cv, ca], dim=-1)), dim=-1)  # (B, 2)
        fused = w[:, :1] * cv + w[:, 1:] * ca
        tokens = [self.proj_fused(fused), self.proj_audio(a), self.proj_video(v)]
        return torch.cat([t.view(-1, self.n_tokens, self.d_llm) for t in tokens], dim=1)


# ----------------------------------------------------------------------------------------------------------
# The model


class AffectGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, llm, vision, audio, tokenizer, vision_family: str,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.llm, self.vision, self.audio = llm, vision, audio
        self.vision_family = vision_family
        self.autocast_dtype = autocast_dtype  # None: float32 throughout
        # a CLIP tower with its projection gives image_embeds; a plain CLIPVisionModel (no projection in its
        # weights) gives pooler_output (its layer-normed class token), SigLIP too (its attention-pooling head)
        self.vision_output = "image_embeds" if hasattr(vision, "visual_projection") else "pooler_output"
        self.vision.requires_grad_(False).eval()
        self.audio.requires_grad_(False).eval()
        d_llm = llm.get_input_embeddings().weight.shape[1]
        self.projector = Projector(self._vision_dim(), self.audio.config.hidden_size, d_llm,
                                   cfg.fusion_width, cfg.n_tokens)
        self.placeholder_ids = tokenizer.convert_tokens_to_ids(list(PLACEHOLDERS))
        self.fast_sampler = None  # a StaticSampler when use_sampler(compiled=True) chose one
        self.image_size = self.vision.config.image_size
        mean, std = PIXEL_STATS[vision_family]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _vision_dim(self):
        c = self.vision.config
        return c.projection_dim if self.vision_output == "image_embeds" else c.hidden_size

    @property
    def device(self):
        return self.projector.proj_fused.weight.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen parts stay in eval mode (no dropout, no time masking)
        self.audio.eval()
        return self

    def autocast(self):
        """bf16 autocast on GPU (trainable weights are float32), nothing on CPU unless AFFECTRL_BF16=1."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    # -- media ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_media(self, frames: torch.Tensor, audio: torch.Tensor) -> dict:
        """Frozen encoders, once per clip. frames (B, N, H, W, 3) uint8 at image_size; audio (B, C, S) float
        at 16 kHz. Returns float32 features {"video": (B, N, Dv), "audio": (B, C, Da)}."""
        B, N = frames.shape[:2]
        dtype = next(self.vision.parameters()).dtype
        pixels = frames.to(self.device).flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
        pixels = ((pixels - self.pixel_mean) / self.pixel_std).to(dtype)
        out = self.vision(pixel_values=pixels)
        video = getattr(out, self.vision_output)  # (B*N, Dv)
        C = audio.shape[1]
        wave = audio.to(self.device).flatten(0, 1).float()  # (B*C, S)
        if getattr(self.audio.config, "model_type", "") == "whisper":
            hidden = self._whisper_features(wave)
        else:
            wave = (wave - wave.mean(-1, keepdim=True)) / (wave.std(-1, keepdim=True) + 1e-7)
            states = self.audio(input_values=wave.to(dtype), output_hidden_states=True).hidden_states
            hidden = torch.stack(states[-4:]).float().mean(0).mean(1)  # mean of the last 4 layers, then time
        return {"video": video.float().view(B, N, -1), "audio": hidden.float().view(B, C, -1)}

    def _whisper_features(self, wave):
        from transformers import WhisperFeatureExtractor
        fe = WhisperFeatureExtractor(feature_size=self.audio.config.num_mel_bins)
        feats = fe(list(wave.cpu().numpy()), sampling_rate=data.SAMPLE_RATE, return_tensors="pt").input_features
        dtype = next(self.audio.parameters()).dtype
        hidden = self.audio(input_features=feats.to(self.device, dtype)).last_hidden_state
        n = max(1, math.ceil(wave.shape[1] / 320))  # encoder frames cover 20 ms each; skip the padding
        return hidden[:, :n].float().mean(1)

    def media_embeddings(self, media: dict) -> torch.Tensor:
        """Trainable part: features -> (B, 3 * n_tokens, D) LLM embeddings (fused, audio, video)."""
        return self.projector(media["video"].to(self.device), media["audio"].to(self.device))

    def embed(self, input_ids: torch.Tensor, media: dict | None) -> torch.Tensor:
        """Token embeddings with the placeholder positions replaced by the projected media, in prompt order."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        is_media = torch.isin(input_ids, torch.tensor(self.placeholder_ids, device=input_ids.device))
        if media is None:
            if is_media.any():
                raise ValueError("prompt has media placeholders but no media features were given")
            return embeds
        n = 3 * self.cfg.n_tokens
        counts = is_media.sum(1)
        if not bool((counts == n).all()):
            raise ValueError(f"every prompt needs {n} placeholder tokens, found {counts.tolist()}")
        pattern = torch.tensor(self.placeholder_ids, device=input_ids.device).repeat_interleave(self.cfg.n_tokens)
        if not bool((input_ids[is_media].view(-1, n) == pattern).all()):
            raise ValueError(f"placeholders must come in the order {PLACEHOLDERS}, {self.cfg.n_tokens} of each")
        media_embeds = self.media_embeddings(media).to(embeds.dtype)  # (B, n, D)
        return embeds.masked_scatter(is_media.unsqueeze(-1), media_embeds)

    # -- the LM ---------------------------------------------------------------------------------------------

    def hidden_states(self, input_ids, attention_mask, media=None):
        """Last hidden states (B, T, D). NOTE: position ids come from the attention mask, so left-padded
        rows get the same positions as unpadded ones."""
        out = self.llm.base_model(inputs_embeds=self.embed(input_ids, media), attention_mask=attention_mask,
                                  position_ids=positions(attention_mask), use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids, attention_mask, media=None, targets=None, temperature=1.0, completions=None):
        """Logits (B, T, V); or, given `targets` (B, T) -- the token each position should predict, -100 where
        nothing is scored -- the float32 log-probs of those tokens under logits / temperature (0 where -100).
        Only the scored positions go through the LM head, so prompts cost no vocabulary-sized work.

        Given `completions` = (tokens (n, L), mask (n, L), prompt_of (n,)), the rows of input_ids, attention_mask
        and media are b PROMPTS, and the result is `score_completions`: the log-probs (n, L) of each completion's
        tokens given its prompt prompt_of[i], every prompt computed once. (Through forward, so that DDP sees one
        forward call per backward.)"""
        if completions is not None:
            return self.score_completions(input_ids, attention_mask, media, *completions, temperature=temperature)
        hidden = self.hidden_states(input_ids, attention_mask, media)
        head = self.llm.get_output_embeddings()
        if targets is None:
            return head(hidden).index_fill(-1, self._banned(hidden.device), float("-inf"))
        keep = targets != -100
        picked = token_logprobs(hidden[keep], head, targets[keep], temperature, banned=self.placeholder_ids)
        return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)

    def score_completions(self, prompt_ids, prompt_mask, media, tokens, mask, prompt_of, temperature=1.0):
        """Shared-prefix scoring: float32 log-probs (n, L) at temperature T of the completion tokens (n, L) where
        mask is 1 (0 elsewhere), completion i answering the left-padded prompt prompt_of[i] of (b, P).

        Why it equals scoring each completion after its own copy of the prompt: in a causal LM the keys and
        values at a prompt position depend on the prompt alone, so the G copies of a prompt compute the same
        ones. Here each prompt runs once, its keys and values are indexed for its completions (row i gets
        prompt prompt_of[i]), and the completions run on that cache: positions continue from the prompt's REAL
        length (left padding is not counted), the prompt's padding stays masked, and each completion attends
        causally among its own tokens. The prompt's last hidden state predicts the first completion token.
        Indexing passes gradients back: the prompt's gradient (LoRA, projector) is the sum of what its
        completions send, as in the plain forward. Exact without dropout (GRPO scores in eval mode)."""
        n, L = tokens.shape
        prompt = self.llm.base_model(inputs_embeds=self.embed(prompt_ids, media), attention_mask=prompt_mask,
                                     position_ids=positions(prompt_mask), use_cache=True)  # each prompt once
        cache = prompt.cache
        cache.batch_select_indices(prompt_of)  # keys, values (b, ...) -> (n, ...): row i gets its prompt's
        real = prompt_mask.sum(1)[prompt_of, None]  # (n, 1) real prompt tokens of each completion's prompt
        out = self.llm.base_model(input_ids=tokens, attention_mask=torch.cat([prompt_mask[prompt_of], mask], 1),
                                  position_ids=real + torch.arange(L, device=tokens.device), cache=cache,
                                  use_cache=True)  # (n, L, D): the completions, attending to their prompt
        # token j is predicted by the hidden state before it: the prompt's last one for j = 0
        hidden = torch.cat([prompt.last_hidden_state[prompt_of, -1:], out.last_hidden_state[:, :-1]], 1)  # (n,L,D)
        keep = mask.bool()
        picked = token_logprobs(hidden[keep], self.llm.get_output_embeddings(), tokens[keep], temperature,
                                banned=self.placeholder_ids)
        return torch.zeros((n, L), dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)

    def _banned(self, device):
        return torch.tensor(self.placeholder_ids, device=device)

    @property
    def stop_ids(self) -> list:
        """Every token that ends a completion: the tokenizer's EOS and the LM's generation-config EOS ids
        (a list for Qwen2.5-Instruct: <|im_end|> and <|endoftext|>). SFT targets end with the tokenizer's EOS."""
        ids = self.llm.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        return sorted(set(ids) | {self.tokenizer.eos_token_id})

    def completion_texts(self, out: "Completions") -> list:
        """Decoded completions, each cut before its stop token: what the reward reads."""
        before_stop = out.mask.sum(1) - out.stopped.long()  # (N,) tokens before the stop token
        return self.tokenizer.batch_decode([row[:n].tolist() for row, n in zip(out.tokens, before_stop.tolist())],
                                           skip_special_tokens=True)

    # -- generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, media, max_new_tokens=128, group_size=1, temperature=1.0,
                 top_p=1.0, top_k=0, greedy=False, generator=None, return_stats=False) -> "Completions":
        """`group_size` completions of each left-padded prompt: B prompts (B, P) give B * G rows, row i answering
        prompt i // G. The decode loop written to be read (a growing cache, a host sync per token);
        `StaticSampler` is its fast twin, and `decode` runs whichever `use_sampler` chose.

        Each prompt runs through the LM once; its keys and values are then repeated for its G rows, which share
        the prompt token for token. Sampling draws from softmax(logits / temperature), optionally cut by top_k /
        top_p (greedy: the argmax). With return_stats the Completions also hold the log-prob of each drawn token
        and the entropy of softmax(logits / temperature) (T = 1 when greedy). A row ends at its first stop token
        (any of `stop_ids`; "EOS" in the masks means any of them); pad follows it."""
        G, pad = group_size, self.tokenizer.pad_token_id
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, generator=generator,
                        return_stats=return_stats)
        stop_ids, banned = torch.tensor(self.stop_ids, device=input_ids.device), self._banned(input_ids.device)
        cache, logits, next_pos = self.prefill(input_ids, attention_mask, media, G)  # (B*G, V), (B*G, 1)
        cache.batch_repeat_interleave(G)  # keys and values (B, ...) -> (B*G, ...): row i holds prompt i // G
        attention_mask = attention_mask.repeat_interleave(G, 0)  # (B*G, P)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=input_ids.device)  # (B*G,) stopped rows
        steps = []  # (token, log-prob, entropy), each (B*G,), per step
        for _ in range(max_new_tokens):
            steps.append(next_token(logits, done, pad, **sampling))
            done |= torch.isin(steps[-1][0], stop_ids)
            if bool(done.all()):  # NOTE: a host sync per token; StaticSampler checks every few tokens
                break
            attention_mask = F.pad(attention_mask, (0, 1), value=1)  # (B*G, P + t + 1)
            out = self.llm(input_ids=steps[-1][0][:, None], attention_mask=attention_mask, position_ids=next_pos,
                           cache=cache, use_cache=True)
            logits = out.logits[:, -1].index_fill(-1, banned, float("-inf"))
            next_pos = next_pos + 1
        return _stack_steps(steps, logits.shape[0], input_ids.device, return_stats, self.stop_ids)

    def prefill(self, input_ids, attention_mask, media, group_size: int) -> tuple:
        """The prompts' pass of both decode loops, each prompt once: (its dynamic KV cache, B rows; the first
        decode step's logits (B*G, V), placeholders banned; each of the B*G rows' next position (B*G, 1))."""
        G, position_ids = group_size, positions(attention_mask)  # (B, P)
        out = self.llm(inputs_embeds=self.embed(input_ids, media), attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=True, logits_to_keep=1)
        # NOTE: the policy never emits a media placeholder: those logits are -inf here and in every scoring pass
        logits = out.logits[:, -1].repeat_interleave(G, 0).index_fill(-1, self._banned(input_ids.device),
                                                                      float("-inf"))
        return out.cache, logits, position_ids[:, -1:].repeat_interleave(G, 0) + 1

    def use_sampler(self, compiled: bool | None = None):
        """The stages' --compile: which decode loop `decode` runs. False: the eager loop `generate`; True: a
        StaticSampler whose decode step is compiled (a CUDA graph on a GPU); None: True with CUDA, where the eager
        loop is bound by per-token launches and host syncs, False on a CPU, where compiling costs more than the
        demos' generation."""
        cuda = self.device.type == "cuda"
        compiled = cuda if compiled is None else compiled
        self.fast_sampler = StaticSampler(self, compiled=True, mode="reduce-overhead" if cuda else None) \
            if compiled else None
        return self

    def decode(self, input_ids, attention_mask, media, **kwargs) -> "Completions":
        """`generate` through the decode loop that `use_sampler` chose: what the stages call."""
        if self.fast_sampler is not None:
            return self.fast_sampler.generate(input_ids, attention_mask, media, **kwargs)
        return self.generate(input_ids, attention_mask, media, **kwargs)

    def complete(self, subtitles, media, think=True, max_new_tokens=128, batch_size=32, n=1, **sampling) -> list:
        """n completions (texts) of each clip given its subtitle and encoder features (B, ...), clip after clip
        (len(subtitles) * n texts); about batch_size completions per decode call. `sampling` goes to generate
        (greedy=True, or temperature / top_p / top_k / generator)."""
        texts, per_call = [], max(1, batch_size // n)  # clips per call: their n completions share one prefill
        for i in range(0, len(subtitles), per_call):
            batch = data.collate_prompts(self.tokenizer, subtitles[i:i + per_call], think, self.cfg.n_tokens)
            part = {k: v[i:i + per_call] for k, v in media.items()}
            with self.autocast():
                out = self.decode(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device), part,
                                  max_new_tokens=max_new_tokens, group_size=n, **sampling)
            texts += self.completion_texts(out)
        return texts


@dataclass
class Completions:
    """What a decode loop returns for N rows; every mask of a GRPO step comes from here."""
    tokens: torch.Tensor                  # (N, L) long: drawn tokens, pad after each row's first stop token
    mask: torch.Tensor                    # (N, L) long: 1 up to AND INCLUDING the first stop token, 0 after it
    stopped: torch.Tensor                 # (N,) bool: the row drew a stop token (False: cut at max_new_tokens)
    logp: torch.Tensor | None = None      # (N, L) float32: log-prob of each drawn token under softmax(logits / T)
    entropy: torch.Tensor | None = None   # (N, L) float32: entropy of that distribution; both 0 after the stop


def find_stops(tokens: torch.Tensor, stop_ids, logp=None, entropy=None) -> Completions:
    """Completions of drawn tokens (N, L): where each row ends (its first token of `stop_ids`, one id or a list).
    NOTE: the mask is built from stop positions, never from `token == pad`: when pad is a stop id that would mask
    the stop itself, and the policy would never learn to stop."""
    is_stop = torch.isin(tokens, torch.as_tensor(stop_ids, device=tokens.device)).long()  # (N, L)
    mask = ((is_stop.cumsum(-1) - is_stop) == 0).long()  # (N, L) 0 only after a stop token
    return Completions(tokens, mask, is_stop.any(-1), logp, entropy)


class StaticSampler:
    """`AffectGPT.generate` with a preallocated KV cache and a fixed-shape decode step (`decode_step`), compiled
    with fullgraph=True when `compiled` (mode "reduce-overhead": one CUDA graph per shape). Same tokens,
    log-probs and entropies as the eager loop (to float rounding) and the same draws from `generator`; but the
    rows' completion is checked every `check_every` tokens only (no host sync per token), so up to
    check_every - 1 extra draws may be taken from the generator after the last row stopped. Prompts are
    left-padded to a multiple of `bucket` columns, so that varying prompt lengths reuse a few compiled shapes."""

    def __init__(self, model: "AffectGPT", compiled: bool = False, backend: str = "inductor",
                 mode: str | None = None, check_every: int = 8, bucket: int = 64):
        self.model, self.check_every, self.bucket = model, check_every, bucket
        # dynamic=False: one specialised graph per (rows, cache length); prompts come in buckets of `bucket`
        self.step = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=backend, mode=mode) \
            if compiled else decode_step
        self.compiled = compiled
        self.cache, self.cache_key = None, None

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, media, max_new_tokens=128, group_size=1, return_stats=False,
                 **sampling) -> Completions:
        """The same arguments and results as AffectGPT.generate."""
        model, G = self.model, group_size
        B, P0 = input_ids.shape
        P = -(-P0 // self.bucket) * self.bucket
        dev, pad = input_ids.device, model.tokenizer.pad_token_id
        input_ids = F.pad(input_ids, (P - P0, 0), value=pad)  # more left padding: masked, positions unchanged
        attention_mask = F.pad(attention_mask, (P - P0, 0), value=0)  # (B, P)
        # the prompts run once each (a dynamic cache), then fill the G rows of each in the static cache
        prompt_cache, logits, first_pos = model.prefill(input_ids, attention_mask, media, G)  # (B*G, V), (B*G, 1)
        S = P + max_new_tokens
        cache = self._static_cache(B * G, S, dev)
        for layer, prompt in zip(cache.layers, prompt_cache.layers):  # slots 0..P-1 of row i: prompt i // G
            layer.update(prompt.keys.repeat_interleave(G, 0), prompt.values.repeat_interleave(G, 0))
        banned, stop_ids = model._banned(dev), torch.tensor(model.stop_ids, device=dev)
        keep = F.pad(attention_mask, (0, max_new_tokens), value=0).bool().repeat_interleave(G, 0)  # (B*G, S)
        start = torch.tensor(P, device=dev)  # cache slot of the first generated token
        slot = start.clone()  # 0-d: the slot the next token goes into
        done = torch.zeros(B * G, dtype=torch.bool, device=dev)
        steps = []
        for t in range(max_new_tokens):
            steps.append(next_token(logits, done, pad, return_stats=return_stats, **sampling))
            done |= torch.isin(steps[-1][0], stop_ids)
            if t + 1 == max_new_tokens or ((t + 1) % self.check_every == 0 and bool(done.all())):
                break
            if self.compiled and dev.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
            logits = self.step(model.llm, steps[-1][0], slot, start, keep, first_pos, cache, banned)
            slot = slot + 1
        out = _stack_steps(steps, B * G, dev, return_stats, model.stop_ids)
        n = int(out.mask.sum(1).max()) if out.tokens.shape[1] else 0  # the eager loop stops at the longest row
        return Completions(out.tokens[:, :n], out.mask[:, :n], out.stopped,
                           *(None if x is None else x[:, :n] for x in (out.logp, out.entropy)))

    def _static_cache(self, rows, S, device):
        """A StaticCache of `rows` x S slots, reused while the shape stays (its tensors keep their addresses:
        CUDA graphs replay instead of re-recording)."""
        from transformers import StaticCache
        key = (rows, S, str(device), torch.is_autocast_enabled(device.type))
        if self.cache_key != key:
            self.cache, self.cache_key = StaticCache(config=self.model.llm.config, max_cache_len=S), key
        self.cache.reset()
        return self.cache


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) = the count of real tokens before each one. NOTE: left padding is not counted, so a
    left-padded prompt gets the positions it has alone (rotary embeddings would not see a whole-row shift, but
    a gap inside a row they do)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_token(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """One token per row from softmax(logits / T), with optional top-k and nucleus (top-p) cuts."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token(logits, done, pad, temperature=1.0, top_p=1.0, top_k=0, greedy=False, generator=None,
               return_stats=False):
    """One decode step's choice: (token, log-prob, entropy) per row, (B,) each; finished rows get pad and 0.
    The log-prob and entropy are those of softmax(logits / T) (T = 1 when greedy), None without return_stats."""
    tok = logits.float().argmax(-1) if greedy else sample_token(logits, temperature, top_p, top_k, generator)
    tok = torch.where(done, torch.full_like(tok, pad), tok)
    if not return_stats:
        return tok, None, None
    logp_all = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), -1)
    logp = logp_all.gather(-1, tok[:, None]).squeeze(-1).masked_fill(done, 0.0)
    plogp = (logp_all.exp() * logp_all).nan_to_num(0.0)  # 0 * log 0 = 0 for banned tokens
    return tok, logp, -plogp.sum(-1).masked_fill(done, 0.0)


def _stack_steps(steps, rows, device, return_stats, stop_ids) -> Completions:
    """[(token, logp, entropy)] per step -> Completions: tokens (rows, L) [, logps, entropies (rows, L)]."""
    tokens, logps, entropies = (list(col) for col in zip(*steps)) if steps else ([], [], [])
    stack = lambda xs, dtype: torch.stack(xs, 1) if xs else torch.zeros(rows, 0, dtype=dtype,  # noqa: E731
                                                                        device=device)
    stats = (stack(logps, torch.float32), stack(entropies, torch.float32)) if return_stats else (None, None)
    return find_stops(stack(tokens, torch.long), stop_ids, *stats)


def decode_step(llm, tok, slot, start, keep, first_pos, cache, banned):
    """One fixed-shape decode step of the static sampler, written for torch.compile(fullgraph=True): every
    shape is the same at every step and nothing reads a value on the host. tok (B,) is the token that goes into
    cache slot `slot` (0-d tensor); generated tokens fill slots start.. (0-d), keep (B, S) marks the prompt's
    real tokens, first_pos (B, 1) is each row's position at slot `start`. Returns the next logits (B, V) with
    the banned ids at -inf."""
    k = torch.arange(keep.shape[1], device=keep.device)
    seen = keep | ((k >= start) & (k <= slot))  # (B, S): real prompt tokens and the generated ones so far
    mask = _attention_bias(seen[:, None, None, :], llm.config._attn_implementation)  # (B, 1, 1, S)
    out = llm(input_ids=tok[:, None], attention_mask=mask, position_ids=first_pos + (slot - start), cache=cache,
              use_cache=True)
    return out.logits[:, -1].index_fill(-1, banned, float("-inf"))


def _attention_bias(allowed: torch.Tensor, impl: str) -> torch.Tensor:
    """A 4D mask (B, 1, Q, S) as transformers' attention implementations take it: bool for sdpa, additive
    float for eager. The static sampler builds its own masks (transformers' are sized by the cache's fill)."""
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    raise ValueError(f"the static sampler supports the sdpa and eager attention implementations, not {impl!r}")


class _ChunkedLogprob(torch.autograd.Function):
    """log softmax(x W^T + b)[target] / T by chunks of rows, forward AND backward: backward recomputes each
    chunk's logits instead of keeping them, so the extra memory is about one (chunk, V) float32 tensor, not
    (N, V). Gradient of logp_t with respect to the logits z: (onehot(t) - softmax(z)) / T."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, banned, dtype):
        # hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) -> (N,) float32
        lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        out = torch.empty_like(lse)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)  # what autocast would multiply
        for i in range(0, hidden.shape[0], chunk):
            z = _chunk_logits(hidden[i:i + chunk], w, b, temperature, banned, dtype)  # (chunk, V)
            lse[i:i + chunk] = z.logsumexp(-1)
            out[i:i + chunk] = z.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - lse[i:i + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse, banned)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        hidden, weight, bias, targets, lse, banned = ctx.saved_tensors
        T, dtype = ctx.temperature, ctx.dtype
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[i:i + ctx.chunk], grad_out[i:i + ctx.chunk, None]
            z = _chunk_logits(h, w, b, T, banned, dtype)  # recomputed (chunk, V); banned columns give p = 0
            dz = z.sub_(lse[i:i + ctx.chunk, None]).exp_().mul_(-g)  # -g * softmax(z), in place
            dz.scatter_add_(-1, targets[i:i + ctx.chunk, None], g)  # + g at the target
            dz = dz.div_(T).to(dtype)  # d/d(x W^T + b): the 1/T of the temperature
            if need_h:
                grad_h[i:i + ctx.chunk] = (dz @ w).to(hidden.dtype)
            if need_w and dtype == torch.float32:
                grad_w.addmm_(dz.t(), h)  # in place: no second (V, D) temporary
            elif need_w:
                grad_w += (dz.t() @ h.to(dtype)).float()
            if need_b:
                grad_b += dz.float().sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return grad_h, cast(grad_w, weight), cast(grad_b, bias), None, None, None, None, None


def _chunk_logits(h, w, b, temperature, banned, dtype):
    """float32 logits / T of one chunk of rows, banned columns at -inf: (chunk, V)."""
    z = F.linear(h.to(dtype), w, b).float().div_(temperature)
    return z.index_fill_(-1, banned, float("-inf")) if len(banned) else z


def token_logprobs(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 512, banned=()) -> torch.Tensor:
    """log softmax(lm_head(hidden) / T)[target] in float32; `banned` token ids get probability 0. hidden (..., D),
    targets (...) -> (...). Memory-bounded in forward and backward: no float32 (N, V) tensor larger than
    (chunk, V) is materialised or kept for backward (`_ChunkedLogprob`). Under autocast the head multiplies in
    the autocast dtype, as `lm_head(hidden)` would."""
    if type(lm_head) is not nn.Linear:  # LoRA or another wrapper on the head would be silently ignored here
        raise TypeError(f"token_logprobs needs a plain nn.Linear LM head, got {type(lm_head).__name__}")
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if flat_h.shape[0] == 0:
        return hidden.new_zeros(targets.shape, dtype=torch.float32)
    banned = torch.tensor(list(banned), dtype=torch.long, device=hidden.device)
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(dev, enabled=False):  # the casts are explicit inside, the same in backward
        out = _ChunkedLogprob.apply(flat_h, lm_head.weight, lm_head.bias, flat_t, temperature, chunk, banned,
                                    dtype)
    return out.view(targets.shape)


# ----------------------------------------------------------------------------------------------------------
# Building, saving, loading


def _hf_config(kwargs: dict):
    from transformers import AutoConfig
    kwargs = dict(kwargs)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _vision_family(model_type: str) -> str:
    if model_type.startswith("clip"):
        return "clip"
    if model_type.startswith("siglip"):
        return "siglip"
    raise ValueError(f"vision encoder of type {model_type!r}: only CLIP and SigLIP vision towers are supported")


AUDIO_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio", "whisper")


def check_weights(part: str, source: str) -> str | None:
    """Why `source` (an HF name or a local folder) cannot serve as component `part`, or None if it can. Reads
    only the config (local folders, or the hub cache)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source):
        if not os.path.isdir(source):
            return f"{source}: no such folder"
        if not os.path.isfile(os.path.join(source, "config.json")):
            return f"{source}: not a Hugging Face model folder (no config.json)"
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except Exception as e:  # not found offline, unreadable config, unknown model type
        return f"{source}: cannot read its config ({type(e).__name__}: {str(e).splitlines()[0]})"
    ok = {"llm": model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
          "vision": model_type.startswith(("clip", "siglip")), "audio": model_type in AUDIO_TYPES}[part]
    if not ok:
        wanted = {"llm": "a causal LM", "vision": "a CLIP or SigLIP model",
                  "audio": "one of " + ", ".join(AUDIO_TYPES)}[part]
        return f"{source}: a {model_type!r} model, but --{part} needs {wanted}"
    return None


def _load_vision(name, arch, random_init, dtype):
    """A CLIP or SigLIP vision tower. CLIP keeps its projection when the weights have one (CLIPModel,
    CLIPVisionModelWithProjection); a plain CLIPVisionModel is loaded as such, never with a random projection."""
    from transformers import AutoConfig, CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel
    config = _hf_config(arch) if random_init else AutoConfig.from_pretrained(name)
    family = _vision_family(config.model_type)
    if random_init:
        cls = CLIPVisionModelWithProjection if family == "clip" else SiglipVisionModel
        return cls._from_config(config, dtype=dtype), family
    if family == "siglip":
        return SiglipVisionModel.from_pretrained(name, dtype=dtype), family
    cls = CLIPVisionModelWithProjection if _has_clip_projection(name, config) else CLIPVisionModel
    return cls.from_pretrained(name, dtype=dtype), family


def _has_clip_projection(name, config) -> bool:
    """Whether CLIP weights hold `visual_projection` (CLIPModel and CLIPVisionModelWithProjection do, a plain
    CLIPVisionModel does not): from the tensor names of a local folder, else from the config's architectures."""
    if os.path.isdir(name):
        from safetensors import safe_open
        files = [f for f in os.listdir(name) if f.endswith(".safetensors")]
        if files:
            for f in files:
                with safe_open(os.path.join(name, f), "pt") as st:
                    if any("visual_projection." in k for k in st.keys()):
                        return True
            return False
    return (config.architectures or ["CLIPModel"])[0] != "CLIPVisionModel"


def _load_audio(name, arch, random_init, dtype):
    from transformers import AutoModel
    model = AutoModel.from_config(_hf_config(arch), dtype=dtype) if random_init else \
        AutoModel.from_pretrained(name, dtype=dtype)
    if model.config.model_type == "whisper":
        model = model.get_encoder()
    return model


def weights_name(source: str | None) -> str | None:
    """A local folder as an absolute path (the next stage finds it from any directory); HF names as given."""
    return os.path.abspath(source) if source is not None and os.path.isdir(source) else source


SIZE_KEYS = ("vocab_size", "hidden_size", "d_model", "intermediate_size", "num_hidden_layers", "encoder_layers",
             "num_attention_heads", "num_key_value_heads", "image_size", "patch_size", "projection_dim",
             "num_mel_bins")


def describe_component(module: nn.Module, weights: str | None, random_init: bool) -> dict:
    """What config.json records of a built component: where its weights came from and its architecture."""
    c = module.config
    return {"weights": weights, "random_init": random_init, "class": type(module).__name__,
            "model_type": c.model_type, "sizes": {k: getattr(c, k) for k in SIZE_KEYS if hasattr(c, k)}}


def build_tokenizer(texts, vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer trained on `texts` (ChatML specials, placeholders, think/answer tags),
    deterministic for a seed. For random-init LLMs without a tokenizer of their own."""
    import random
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = list(texts)  # repetitions count: frequent phrases become few tokens
    random.Random(seed).shuffle(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in TAGS])  # plain text tokens, kept on decode
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")
    fast.chat_template = CHATML
    return fast


def prepare_tokenizer(tokenizer):
    """Add the placeholders; left padding for generation; a pad token if the LLM has none."""
    tokenizer.add_tokens(list(PLACEHOLDERS), special_tokens=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML
    return tokenizer


def build_model(cfg: ModelConfig, device=None, tokenizer=None, init_seed: int | None = None,
                tokenizer_texts=()) -> AffectGPT:
    """Build the model of a config: each component's weights from its name or folder, or random init from
    `cfg.arch` seeded by cfg.seed (the same "pretrained" base for every run) when it has no name or
    cfg.random_init; the new trainable parts (projector, adapters) are initialised from init_seed (default:
    cfg.seed), so training seeds vary them and not the frozen encoders. The returned model's cfg records what
    was built (`components`; local folders as absolute paths) and keeps arch only for random components.
    A random-init LLM without a tokenizer gets one trained on data.tokenizer_corpus(tokenizer_texts): give it
    the text of the data it will train on (data.clip_texts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = torch.device(device) if device is not None else default_device()
    dtype = compute_dtype(device)
    names = {part: weights_name(getattr(cfg, part)) for part in ("llm", "vision", "audio")}
    for part, n in names.items():
        if n is not None and os.path.isabs(n) and not os.path.isdir(n) and not cfg.random_init:
            raise FileNotFoundError(f"{part} weights: the folder {n} does not exist (any more)")
    cfg = dataclasses.replace(cfg, **names)
    random = {part: cfg.is_random(part) for part in names}
    torch.manual_seed(cfg.seed)  # random-init weights are a function of the seed
    if tokenizer is None:
        if not random["llm"]:
            tokenizer = AutoTokenizer.from_pretrained(cfg.llm, padding_side="left")
        else:  # no hub: a small tokenizer trained on the fly (the LLM keeps its real vocabulary size)
            tokenizer = build_tokenizer(data.tokenizer_corpus(tokenizer_texts), cfg.tokenizer_vocab, cfg.seed)
    tokenizer = prepare_tokenizer(tokenizer)
    # an LLM trained in full keeps float32 master weights: load it so, not rounded to bf16 and cast back
    llm_dtype = torch.float32 if cfg.train_llm == "full" else dtype
    if random["llm"]:
        llm_arch = dict(cfg.arch["llm"])
        if cfg.llm is None:
            llm_arch["vocab_size"] = len(tokenizer)
        llm = AutoModelForCausalLM.from_config(_hf_config(llm_arch), dtype=llm_dtype)
    else:
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=llm_dtype)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        # NOTE: only rows of tokens the LLM never had (e.g. our placeholders, which are replaced by media
        # embeddings on input and banned on output) get new, unsaved values here
        llm.resize_token_embeddings(len(tokenizer))
    llm.config.pad_token_id, llm.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    vision, family = _load_vision(cfg.vision, cfg.arch.get("vision"), random["vision"], dtype)
    audio = _load_audio(cfg.audio, cfg.arch.get("audio"), random["audio"], dtype)
    built = {"llm": llm, "vision": vision, "audio": audio}
    components = {part: describe_component(m, getattr(cfg, part), random[part]) for part, m in built.items()}
    components["vision"]["features"] = "image_embeds" if hasattr(vision, "visual_projection") else "pooler_output"
    cfg = dataclasses.replace(cfg, components=components,
                              arch={part: a for part, a in cfg.arch.items() if random.get(part, True)})
    torch.manual_seed(cfg.seed if init_seed is None else init_seed)
    if cfg.train_llm == "lora":
        llm.requires_grad_(False)
        apply_lora(llm, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    elif cfg.train_llm == "full":
        llm.float().requires_grad_(True)  # full training keeps float32 master weights (bf16 autocast on GPU)
    else:
        raise ValueError(f"train_llm must be 'lora' or 'full', got {cfg.train_llm!r}")
    model = AffectGPT(cfg, llm, vision, audio, tokenizer, family,
                      autocast_dtype=None if dtype == torch.float32 else dtype)
    model.projector.requires_grad_(cfg.train_projector)
    return model.to(device)


def add_lora(model: AffectGPT, r: int, alpha: float, dropout: float = 0.0, targets=LORA_TARGETS,
             train_projector: bool = True) -> AffectGPT:
    """Freeze the LLM as it is (e.g. trained in full by SFT) and train fresh adapters on top of it; the config
    then records that the frozen weights belong in the checkpoint."""
    if any(isinstance(m, LoRALinear) for m in model.llm.modules()):
        raise ValueError("the model has LoRA adapters already")
    model.llm.requires_grad_(False)
    apply_lora(model.llm, targets, r, alpha, dropout)
    model.projector.requires_grad_(train_projector)
    model.cfg = dataclasses.replace(model.cfg, train_llm="lora", lora_r=r, lora_alpha=alpha, lora_dropout=dropout,
                                    lora_targets=tuple(targets), train_projector=train_projector,
                                    base_in_checkpoint=True)
    return model


def frozen_copy(model: AffectGPT) -> AffectGPT:
    """A frozen snapshot of `model` as it is now (GRPO's reference): its own copies of the trainable tensors
    (projector, adapters, or the whole LLM) and every frozen tensor shared, not copied. With fresh adapters it
    computes what the base LLM under them does; after SFT trained the adapters, it is the SFT policy. The
    reference only scores: it decodes with the eager loop and gets no copy of the policy's StaticSampler (its
    KV cache holds rows x slots per layer, gigabytes at the paper's sizes)."""
    # memo: deepcopy hands back these objects instead of copying them (None for the sampler: left out)
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    shared.update({id(b): b for name, b in model.named_buffers() if not name.startswith("projector.")})
    shared[id(model.fast_sampler)] = None
    return copy.deepcopy(model, memo=shared).requires_grad_(False).eval()


def trainable_state_dict(model: AffectGPT, keep_vars: bool = False) -> dict:
    """What training changes: the whole projector (with its feature statistics) and the LLM's trainable
    parameters (adapters, or all of it)."""
    out = {f"projector.{n}": t for n, t in model.projector.state_dict(keep_vars=keep_vars).items()}
    out.update({n: p if keep_vars else p.detach() for n, p in model.named_parameters()
                if p.requires_grad and not n.startswith("projector.")})
    return out


def _frozen_state_dict(model: AffectGPT) -> dict:
    """The frozen tensors that no named model or folder can give back: those of random-init components, and
    the LLM's when it changed (base_in_checkpoint). Tied weights appear under each of their names."""
    parts = _base_parts(model.cfg)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {n: t for n, t in model.state_dict(keep_vars=True).items()
            if id(t) not in trainable and n.split(".", 1)[0] in parts}


def _base_parts(cfg: ModelConfig) -> set:
    parts = {part for part in ("llm", "vision", "audio") if cfg.is_random(part)}
    return parts | {"llm"} if cfg.base_in_checkpoint else parts


def _save_tensors(tensors: dict, path: str):
    # clone: tied weights share storage, which safetensors refuses
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, path)


def save_model(model: AffectGPT, path: str):
    """Write config.json, trainable.safetensors, tokenizer/ and, for random-init parts, base.safetensors."""
    os.makedirs(path, exist_ok=True)
    cfg = dataclasses.asdict(model.cfg)
    cfg["lora_targets"] = list(cfg["lora_targets"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    _save_tensors(trainable_state_dict(model), os.path.join(path, "trainable.safetensors"))
    if _base_parts(model.cfg):
        _save_tensors(_frozen_state_dict(model), os.path.join(path, "base.safetensors"))
    model.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))


class CheckpointError(data.DataError):
    """A checkpoint that cannot be loaded as it is (an edited or damaged config.json, weights that do not fit):
    names the file and the problem; the stages end with its message, not a traceback."""


def _load_into(model: nn.Module, tensors: dict, expected: dict, file: str):
    """Copy tensors into the model's parameters/buffers, refusing missing, unexpected or mis-shaped ones."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
           for k in sorted(set(tensors) & set(expected)) if tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        lines = ([f"shape mismatch {b}" for b in bad[:10]] + [f"missing {k}" for k in missing[:10]]
                 + [f"unexpected {k}" for k in unexpected[:10]])
        raise CheckpointError(f"{file} does not fit the model built from its config.json ({len(bad)} shape "
                              f"mismatches, {len(missing)} missing, {len(unexpected)} unexpected tensors):\n  "
                              + "\n  ".join(lines))
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)


def load_model(path: str, device=None) -> AffectGPT:
    """Rebuild a saved model: same encoders, LLM, LoRA, tokenizer; weights loaded and shape-checked."""
    from transformers import AutoTokenizer
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path} is not a checkpoint (no config.json)")
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
        raw["lora_targets"] = tuple(raw["lora_targets"])
        cfg = ModelConfig(**raw)
    except (ValueError, TypeError, KeyError) as e:  # not JSON, or not the fields of a ModelConfig
        raise CheckpointError(f"{cfg_file}: not a config.json that AffectRL wrote ({type(e).__name__}: {e})") from None
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), padding_side="left")
    model = build_model(cfg, device=device, tokenizer=tokenizer)
    for part, saved in cfg.components.items():  # the named weights must still be what was trained on
        now = model.cfg.components[part]
        if {k: saved.get(k) for k in now} != now:
            raise CheckpointError(f"{cfg_file}: the {part} was trained as {saved}, but {saved.get('weights')} "
                                  f"now builds {now}")
    if _base_parts(cfg):
        file = os.path.join(path, "base.safetensors")
        _load_into(model, load_file(file), _frozen_state_dict(model), file)
    return load_trainable(model, path)


def load_trainable(model: AffectGPT, path: str) -> AffectGPT:
    """Load a checkpoint's trainable.safetensors into a model of the same shape (e.g. to resume)."""
    file = os.path.join(path, "trainable.safetensors")
    _load_into(model, load_file(file), trainable_state_dict(model, keep_vars=True), file)
    return model


def count_parameters(model: AffectGPT) -> dict:
    n = lambda m, trainable=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)  # noqa
    return {"llm": n(model.llm), "vision": n(model.vision), "audio": n(model.audio),
            "projector": n(model.projector), "trainable": n(model, True)}
