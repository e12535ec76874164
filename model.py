"""The vision-language model: a SigLIP vision encoder, a pixel-shuffle projector and a Llama decoder.

This is the Idefics3 / SmolVLM architecture (Laurencon et al. 2024; Marafioti et al. 2025), which also plays the
role LLaVA-NeXT plays in the Insight-V paper: one base MLLM from which both agents are fine-tuned. Reading order:
configs and presets, the vision tower, the projector, the decoder with its KV cache, the VLM (checkpoint.py loads
and saves it).
Every module is named like the Hugging Face checkpoint it mirrors, so loading a public checkpoint is a plain key
copy with every key and shape checked:

    vision_model.*   SiglipVisionTransformer   (transformers/models/siglip/modeling_siglip.py)
    connector.*      Idefics3Connector         (transformers/models/idefics3/modeling_idefics3.py)
    text_model.*     LlamaModel                (transformers/models/llama/modeling_llama.py)
    lm_head          the output projection, tied to text_model.embed_tokens or not
"""

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import checkpoint

# ----------------------------------------------------------------------------------------------
# Configuration

# The chat format's special tokens (SmolVLM's template, data.render_conversation): the world's tokenizer is trained
# with them, SmolVLM's has them, and VLM.from_parts adds the ones a text checkpoint's tokenizer lacks.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                  "<global-img>")


@dataclass
class VisionConfig:
    image_size: int = 48  # square input images, in pixels
    patch_size: int = 8
    hidden_size: int = 96
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 512
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2  # grouped-query attention: each KV head serves heads/kv queries
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scale_factor: int = 2  # pixel shuffle: scale**2 neighbouring patches become one image token
    image_token_id: int = 0

    @property
    def tokens_per_image(self):
        return self.vision.num_patches // self.scale_factor**2

    def to_dict(self):
        return {"model_type": "nano-insight-v", "vision": asdict(self.vision), "text": asdict(self.text),
                "scale_factor": self.scale_factor, "image_token_id": self.image_token_id}

    @classmethod
    def from_dict(cls, d):
        return cls(VisionConfig(**d["vision"]), TextConfig(**d["text"]), scale_factor=d["scale_factor"],
                   image_token_id=d["image_token_id"])


# Named presets (minGPT's habit): micro for unit tests; tiny for the synthetic world on a laptop CPU (48px scenes,
# a 3x3 grid of 16px cells: patch 8 + pixel shuffle 2 give 9 image tokens, one per cell); two public shapes, which
# share their towers: SigLIP-B/16 and SmolLM2-135M.
SIGLIP_B16 = dict(patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, rope_theta=100000.0)
PRESETS = {
    "micro": VLMConfig(VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2),
                       TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2), image_token_id=3),
    "tiny": VLMConfig(VisionConfig(), TextConfig(), image_token_id=3),  # the dataclass defaults above
    # SmolVLM-256M: SigLIP-B/16 at 512px, scale 4 (1024 patches -> 64 tokens), SmolLM2-135M, untied head.
    "smolvlm-256m": VLMConfig(VisionConfig(image_size=512, **SIGLIP_B16),
                              TextConfig(vocab_size=49280, tie_word_embeddings=False, **SMOLLM2_135M),
                              scale_factor=4, image_token_id=49190),
    # nanoVLM-222M: SigLIP-B/16 at 224px, scale 2 (196 patches -> 49 tokens), SmolLM2-135M, tied head.
    "nanovlm-222m": VLMConfig(VisionConfig(image_size=224, **SIGLIP_B16), TextConfig(vocab_size=49152, **SMOLLM2_135M),
                              image_token_id=49151),
}


def get_config(name, **overrides):
    """A fresh copy of a preset; overrides name a field of VLMConfig, TextConfig or VisionConfig."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    cfg = VLMConfig.from_dict(PRESETS[name].to_dict())
    for key, value in overrides.items():
        target = next((c for c in (cfg, cfg.text, cfg.vision) if key in {f.name for f in fields(c)}), None)
        if target is None:
            raise ValueError(f"unknown config field {key!r}")
        setattr(target, key, value)
    return cfg


# ----------------------------------------------------------------------------------------------
# Vision tower: SigLIP (Zhai et al. 2023). A ViT with learned absolute positions, no class token,
# pre-LayerNorm blocks and a final LayerNorm over every patch token.

# https://github.com/huggingface/transformers/blob/main/src/transformers/models/siglip/modeling_siglip.py
class SiglipEmbeddings(nn.Module):  # SiglipVisionEmbeddings
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values):  # (N, 3, H, W)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (N, P, D), patches row-major


def attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, training=False):
    """F.scaled_dot_product_attention: (B, H, T, hd) -> (B, H, T, hd). Training on the CPU with short sequences
    takes the math kernel, as the fused kernel's backward is slow there (docs/experiments.md). It follows the
    module's mode, not grad mode, so DPO's reference pass (no grad, train mode) takes the policy's kernel."""
    math_only = training and q.device.type == "cpu" and q.shape[-2] <= 256
    with sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/siglip/modeling_siglip.py
class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (N, P, D)
        N, P, D = x.shape
        q, k, v = (proj(x).view(N, P, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, P, hd)
        y = attention(q, k, v, training=self.training)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(N, P, D))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/siglip/modeling_siglip.py
class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/siglip/modeling_siglip.py
class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/siglip/modeling_siglip.py
class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layers": layers})  # HF's SiglipEncoder, which holds nothing else
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):  # (N, 3, H, W) -> (N, P, D_vision), the last hidden state
        x = self.embeddings(pixel_values)
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.post_layernorm(x)


# ----------------------------------------------------------------------------------------------
# Projector: Idefics3's connector. Pixel shuffle (space-to-depth) folds each s x s block of patch features into
# one token with s*s times the channels (1024 patches -> 64 tokens at s = 4); one linear layer maps to the decoder.

def pixel_shuffle(x, s):  # (N, P, D) -> (N, P / s^2, D * s^2), numerically Idefics3Connector.pixel_shuffle
    N, P, D = x.shape
    h = w = int(math.isqrt(P))
    x = x.view(N, h, w // s, D * s)  # merge s neighbours along a row
    x = x.permute(0, 2, 1, 3).reshape(N, w // s, h // s, D * s * s)  # then s neighbours along a column
    return x.permute(0, 2, 1, 3).reshape(N, P // (s * s), D * s * s)


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/idefics3/modeling_idefics3.py
class Connector(nn.Module):  # Idefics3Connector
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        d_in = cfg.vision.hidden_size * cfg.scale_factor**2
        self.modality_projection = nn.ModuleDict({"proj": nn.Linear(d_in, cfg.text.hidden_size, bias=False)})

    def forward(self, image_features):  # (N, P, D_vision) -> (N, tokens_per_image, D_text)
        return self.modality_projection["proj"](pixel_shuffle(image_features, self.scale_factor))


# ----------------------------------------------------------------------------------------------
# Decoder: Llama (Touvron et al. 2023) as in SmolLM2. RMSNorm, rotary positions, grouped-query attention, SwiGLU.

# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
class RMSNorm(nn.Module):  # LlamaRMSNorm
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # The statistic is computed in fp32 even under bf16: a sum of squares loses precision fast.
        h = x.float()
        h = h * h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(positions, head_dim, theta, dtype):  # positions (B, T) long -> 2 x (B, T, head_dim)
    # Computed in fp32 from integer positions so that cached decoding and a full forward agree.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # Llama's split-halves layout, not interleaved pairs
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):  # (..., hd): the halves x1, x2 -> cat(-x2, x1), a 90-degree turn of each (x1[i], x2[i]) pair
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):  # x (B, H, T, hd); cos, sin (B, 1, T, hd) from rotary_cos_sin, shared by the heads
    return x * cos + rotate_half(x) * sin


# https://github.com/karpathy/nanochat/blob/master/nanochat/engine.py
class KVCache:
    """A preallocated key/value cache (nanochat's engine): one buffer per tensor, filled in place.
    k, v: (n_layers, B, n_kv_heads, max_len, head_dim). All rows share `length`, the slots filled so
    far; a left-padded row has `key_mask` False at its pads. `pos` is each row's next rotary position.
    `padded`: whether any slot so far is padding; until one is, a new token needs no mask at all."""

    def __init__(self, cfg: TextConfig, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length, self.padded, self.max_len = 0, False, max_len

    def update(self, layer, k, v):  # k, v (B, n_kv, T, hd) for the new chunk -> all keys so far
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end], self.v[layer, :, :, self.length:end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, n):
        """A new cache with every row repeated n times: prefill a prompt once, sample n paths."""
        new = KVCache.__new__(KVCache)
        new.k, new.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        new.key_mask, new.pos = self.key_mask.repeat_interleave(n, dim=0), self.pos.repeat_interleave(n, dim=0)
        new.length, new.padded, new.max_len = self.length, self.padded, self.max_len
        return new

    def select(self, rows):
        """Keep only these rows (a LongTensor of indices), e.g. to drop finished samples."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.key_mask, self.pos = self.key_mask[rows], self.pos[rows]


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):  # x (B, T, D)
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.hd).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # q (B, H, T, hd); k, v (B, KV, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, hd), S = cached + T
        # GQA: enable_gqa shares each KV head among n_heads / n_kv query heads without copying K and V (HF's
        # repeat_kv). A mask or is_causal, never both: SDPA's is_causal is top-left aligned, wrong once queries
        # and keys differ in length. q takes the cache's dtype, as autocast's SDPA would cast it.
        y = attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                      enable_gqa=self.n_kv != self.n_heads, training=self.training)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj, self.up_proj = (nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False) for _ in range(2))
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, attention_mask=None, cache=None):  # x (B, T, D) embeddings -> (B, T, D)
        B, T, _ = x.shape
        real = attention_mask.bool() if attention_mask is not None else x.new_ones(B, T, dtype=torch.bool)  # (B, T)
        start, first = (0, 0) if cache is None else (cache.length, cache.pos[:, None])  # first slot, first position
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > max_len {cache.max_len}")
        # Rotary positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
        positions = (first + real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): every head, once for all layers

        mask = None  # plain causal attention: training and unpadded full forwards take SDPA's fast path
        if cache is not None:
            cache.key_mask[:, start:start + T] = real
            cache.padded = cache.padded or (attention_mask is not None and not bool(real.all()))
        # A mask for padding or a cached prefix, but none for one new token after unpadded rows: SDPA's fused kernel.
        if (cache is None and attention_mask is not None) or (cache is not None and (T != 1 or cache.padded)):
            key_real = real if cache is None else cache.key_mask[:, :start + T]  # (B, S)
            # Causal and bottom-right aligned: query i (at slot start+i) sees key slots <= start+i.
            q_slot = torch.arange(start, start + T, device=x.device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=x.device)[None, :]  # (1, S)
            mask = (k_slot <= q_slot)[None] & key_real[:, None, :]  # (B, T, S)
            mask = mask | (k_slot == q_slot)[None]  # a padding query sees itself: no all-masked row (NaN)
            mask = mask[:, None]  # (B, 1, T, S), broadcast over heads

        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
            cache.pos += real.sum(1)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# The VLM: image placeholder tokens in the prompt are replaced, in order, by projected image tokens.

# https://github.com/huggingface/transformers/blob/main/src/transformers/models/idefics3/modeling_idefics3.py
class VLM(nn.Module):  # Idefics3ForConditionalGeneration
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        n_patches = cfg.vision.num_patches
        if n_patches % cfg.scale_factor**2 or math.isqrt(n_patches) ** 2 != n_patches:
            raise ValueError("the patch grid must be square and divisible by the pixel-shuffle scale factor")
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg.vision)
        self.connector = Connector(cfg)
        self.text_model = LlamaModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tokenizer = None  # a tokenizers.Tokenizer, when the checkpoint ships one
        self.apply(self._init_weights)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.text_model.embed_tokens.weight

    @staticmethod
    def _init_weights(module):  # GPT-2 style: small normal weights, zero biases; norms start as the identity
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def encode_images(self, pixel_values):  # (N, 3, H, W) -> (N, tokens_per_image, D_text)
        return self.connector(self.vision_model(pixel_values))

    def forward(self, input_ids, pixel_values=None, targets=None, attention_mask=None, cache=None,
                image_embeds=None, last_only=False):
        x = self.text_model.embed_tokens(input_ids)  # (B, T, D)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        if image_embeds is not None:
            slots = input_ids == self.config.image_token_id  # (B, T)
            n_slots, n_tokens = slots.sum(), image_embeds.shape[0] * image_embeds.shape[1]
            # Reading the count would stall a GPU on every training step: training rows are counted when they are
            # encoded (train_sft.encode_row); calls without gradients (decoding, evaluation) are checked here.
            if not torch.is_grad_enabled() and int(n_slots) != n_tokens:
                raise ValueError(f"the prompt has {int(n_slots)} image placeholder tokens but the images give "
                                 f"{n_tokens} ({image_embeds.shape[0]} x {image_embeds.shape[1]})")
            # masked_scatter fills the slots in row-major order: image i's tokens go to the i-th block.
            x = x.masked_scatter(slots[..., None], image_embeds.to(x.dtype))
        h = self.text_model(x, attention_mask, cache)
        logits = self.lm_head(h[:, -1:] if last_only else h)  # (B, T, V); decoding needs only the last position
        # Position t predicts token t+1: the one shift in the codebase. Loss in fp32.
        loss = None if targets is None else F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                            targets[:, 1:].flatten(), ignore_index=-100)
        return logits, loss

    def configure_optimizers(self, weight_decay, lr_text, lr_vision, lr_projector, betas=(0.9, 0.95),
                             freeze_vision=False, fused=None):
        """AdamW with weight decay on matrices only (not norms or biases) and one lr per part."""
        self.vision_model.requires_grad_(not freeze_vision)
        groups = {}
        for name, p in self.named_parameters():  # a tied weight is listed once
            if not p.requires_grad:
                continue
            part = {"vision_model": "vision", "connector": "projector"}.get(name.split(".")[0], "text")
            decay = p.dim() >= 2
            key = f"{part}/{'decay' if decay else 'no_decay'}"
            lr = {"vision": lr_vision, "projector": lr_projector, "text": lr_text}[part]
            groups.setdefault(key, dict(name=key, params=[], lr=lr, weight_decay=weight_decay if decay else 0.0))
            groups[key]["params"].append(p)
        if fused is None:  # on a GPU the fused kernel: one launch for all the parameters instead of several per tensor
            fused = next(self.parameters()).is_cuda or None
        return torch.optim.AdamW(list(groups.values()), betas=betas, fused=fused)

    # ------------------------------------------------------------------------------------------
    # Saving and loading: checkpoint.py does the work, with every key and shape checked.

    def save_pretrained(self, path):
        """config.json + model.safetensors (+ tokenizer.json), each written to a temp file and renamed."""
        checkpoint.save(self, path)

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """This project's own checkpoints, or a SmolVLM / Idefics3 checkpoint directory as published."""
        config, state, tokenizer = checkpoint.load(path)
        with checkpoint.reading_checkpoint(os.path.join(path, "config.json")):  # a section or field missing or misspelt
            config = VLMConfig.from_dict(config)
        model = checkpoint.load_into(cls(config), state, tokenizer, path)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_parts(cls, vision_dir, text_dir, scale_factor=2, image_token_id=None, dtype=None):
        """A SigLIP checkpoint + a Llama-family checkpoint; the projector is freshly initialised. The chat format's
        special tokens its tokenizer lacks are added, and the grown tokenizer is saved with the model. image_token_id=
        is for a text checkpoint without a tokenizer.json."""
        config, state, tokenizer = checkpoint.load_parts(vision_dir, text_dir, scale_factor, image_token_id,
                                                         SPECIAL_TOKENS)
        model = checkpoint.load_into(cls(VLMConfig.from_dict(config)), state, tokenizer, f"{vision_dir} + {text_dir}",
                                     fresh=("connector.",))  # the projector keeps its initialisation
        return model.to(dtype) if dtype is not None else model
