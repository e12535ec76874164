"""The vision-language model: a SigLIP vision encoder, a pixel-shuffle projector and a Llama decoder.

This is the Idefics3 / SmolVLM architecture (Laurencon et al. 2024; Marafioti et al. 2025), which
also plays the role LLaVA-NeXT plays in the Insight-V paper: one base MLLM from which both agents
are fine-tuned. Every module is named like the Hugging Face checkpoint it mirrors, so loading a
public checkpoint is a plain key copy with every key and shape checked:

    vision_model.*   SiglipVisionTransformer   (transformers/models/siglip/modeling_siglip.py)
    connector.*      Idefics3Connector         (transformers/models/idefics3/modeling_idefics3.py)
    text_model.*     LlamaModel                (transformers/models/llama/modeling_llama.py)
    lm_head          the output projection, tied to text_model.embed_tokens or not

Reading order: configs and presets, the vision tower, the projector, the decoder with its KV cache,
the VLM that joins them, then loading and saving.
"""

import argparse
import contextlib
import json
import math
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.attention
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------
# Configuration


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
        return cls(VisionConfig(**d["vision"]), TextConfig(**d["text"]), d["scale_factor"], d["image_token_id"])


# Named presets (minGPT's habit): tests and the CPU demo pick a model by name.
# micro: unit tests. tiny: the synthetic world on a laptop CPU (48px scenes, a 3x3 grid of 16px cells;
# patch 8 + pixel shuffle 2 gives exactly 9 image tokens, one per cell). The other two are the
# shapes of public models, for random-init benchmarks and for checking a loaded config.
PRESETS = {
    "micro": VLMConfig(VisionConfig(32, 8, 32, 64, 1, 2), TextConfig(256, 64, 128, 2, 4, 2), 2, 3),
    "tiny": VLMConfig(VisionConfig(48, 8, 96, 384, 3, 4), TextConfig(512, 192, 512, 4, 6, 2), 2, 3),
    # SmolVLM-256M: SigLIP-B/16 at 512px, scale 4 (1024 patches -> 64 tokens), SmolLM2-135M, untied head.
    "smolvlm-256m": VLMConfig(VisionConfig(512, 16, 768, 3072, 12, 12),
                              TextConfig(49280, 576, 1536, 30, 9, 3, 100000.0, 1e-5, False), 4, 49190),
    # nanoVLM-222M: SigLIP-B/16 at 224px, scale 2 (196 patches -> 49 tokens), SmolLM2-135M, tied head.
    "nanovlm-222m": VLMConfig(VisionConfig(224, 16, 768, 3072, 12, 12),
                              TextConfig(49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, True), 2, 49151),
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


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values):  # (N, 3, H, W)
        # The patch convolution (kernel = stride = p) is one matrix product over flattened patches,
        # and we compute it as one. The usual conv -> flatten -> transpose ends in a transposed view,
        # and elementwise ops keep their input's memory layout, so the whole residual stream of
        # the tower would run strided, with a copy in every LayerNorm. Row-major from the start,
        # the smolvlm-256m training step takes ~3.1 s instead of ~3.6 s on a 2-core CPU (same numbers
        # up to summation order; bench.py: 0.92x -> 1.17x the reference's speed).
        w = self.patch_embedding.weight  # (D, C, p, p): Conv2d's parameter, so checkpoints load as they are
        D, C, p, _ = w.shape
        N, _, H, W = pixel_values.shape
        patches = pixel_values.to(w.dtype).reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(N, (H // p) * (W // p), C * p * p)  # (N, P, C*p*p), patches row-major
        x = F.linear(patches, w.reshape(D, C * p * p), self.patch_embedding.bias)  # (N, P, D)
        return x + self.position_embedding.weight


def attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, training=False):
    """F.scaled_dot_product_attention, with one choice of kernel. (B, H, T, hd) -> (B, H, T, hd).

    When a module in training mode runs on the CPU with short sequences we take SDPA's math path
    (matmul, softmax, matmul) instead of the fused flash kernel: the flash kernel's backward is
    slow at these shapes (tiny preset, 32 rows x ~100 tokens, 6 heads of 32: 24 ms per layer call,
    a third of the whole step), and the math path makes the training step ~30% faster. With long
    sequences the fused kernel wins (1024 SigLIP patches at smolvlm-256m: step 6.4 s fused, 10.5 s
    math), and in eval mode (decoding: at batch 16 the math path decodes 2x slower) the fused kernel
    is kept. The choice follows the module's mode, not torch.is_grad_enabled(), so that DPO's
    reference log-probs (no_grad, train mode) take exactly the policy's kernels. Without an explicit
    mask, the math path is math_attention below: the same bits, a little faster.
    """
    math_path = training and q.device.type == "cpu" and q.shape[-2] <= 256
    if math_path and attn_mask is None:
        return math_attention(q, k, v, is_causal, enable_gqa)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if math_path else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)


_CAUSAL_MASKS = {}  # (L, S, device) -> (L, S) additive mask: 0 where key j <= query i, -inf elsewhere


def math_attention(q, k, v, is_causal=False, enable_gqa=False):
    """SDPA's math path without a mask other than the causal one, op for op, so bit for bit.

    What ATen's _scaled_dot_product_attention_math does (tests/test_model.py holds us to it, values
    and gradients): autocast hands it low-precision inputs, it computes in fp32 with q and k each
    scaled by hd**-1/4, adds the causal mask, softmaxes and returns the input dtype. Done here, we
    skip two things it does on every call: building the causal mask (we keep one per length), and
    checking every row for "all keys masked" (_safe_softmax), which a causal mask never does.
    At the tiny preset's shapes (32 rows x 100 tokens, 6 heads on 2 KV heads) a forward and backward
    takes 11-14 ms instead of 15-17, and a training step ~6% less (README, performance section).
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):  # SDPA is on autocast's lower-precision list
        low = torch.get_autocast_dtype(device)
        q, k, v = q.to(low), k.to(low), v.to(low)
    dtype = q.dtype
    with torch.autocast(device, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        if enable_gqa and k.shape[-3] != q.shape[-3]:  # each KV head serves n_heads / n_kv query heads
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
        scores = (q * scale) @ (k.transpose(-2, -1) * scale)  # (B, H, T, S)
        if is_causal:  # top-left aligned, as SDPA's (training has as many queries as keys)
            L, S = scores.shape[-2:]
            mask = _CAUSAL_MASKS.get((L, S, q.device))
            if mask is None:  # one per length, at most 256 x 256 floats
                mask = torch.zeros(L, S, device=q.device).masked_fill(
                    torch.ones(L, S, dtype=torch.bool, device=q.device).tril().logical_not(), float("-inf"))
                _CAUSAL_MASKS[(L, S, q.device)] = mask
            scores = scores + mask
        return (scores.softmax(dim=-1) @ v).to(dtype)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):  # (N, P, D)
        N, P, D = x.shape
        q, k, v = (proj(x).view(N, P, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, P, hd)
        y = attention(q, k, v, training=self.training)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(N, P, D))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


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


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):  # (N, 3, H, W) -> (N, P, D_vision), the last hidden state
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ----------------------------------------------------------------------------------------------
# Projector: Idefics3's connector. Pixel shuffle (space-to-depth) folds each s x s block of patch
# features into one token with s*s times the channels, so a 1024-patch image costs the language
# model only 64 tokens at s = 4; then one linear layer maps to the decoder width.


def pixel_shuffle(x, s):  # (N, P, D) -> (N, P / s^2, D * s^2), numerically Idefics3Connector.pixel_shuffle
    N, P, D = x.shape
    h = w = int(math.isqrt(P))
    x = x.view(N, h, w // s, D * s)  # merge s neighbours along a row
    x = x.permute(0, 2, 1, 3).reshape(N, w // s, h // s, D * s * s)  # then s neighbours along a column
    return x.permute(0, 2, 1, 3).reshape(N, P // (s * s), D * s * s)


class Connector(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        d_in = cfg.vision.hidden_size * cfg.scale_factor**2
        self.modality_projection = nn.ModuleDict({"proj": nn.Linear(d_in, cfg.text.hidden_size, bias=False)})

    def forward(self, image_features):  # (N, P, D_vision) -> (N, tokens_per_image, D_text)
        return self.modality_projection["proj"](pixel_shuffle(image_features, self.scale_factor))


# ----------------------------------------------------------------------------------------------
# Decoder: Llama (Touvron et al. 2023) as in SmolLM2. RMSNorm, rotary positions, grouped-query
# attention, SwiGLU, no biases.


PACKED_MAX_ROWS = 64  # up to here the packed product's bits are checked equal to F.linear's


def linear(x, weight, decode=None):  # x (..., in), weight (out, in) -> (..., out), no bias
    """F.linear, with faster routes for the few rows of a decode step, all measured on the CPU at
    the smolvlm-256m shape in bf16:

    - A single input row is a matrix-vector product. Decoding one sequence feeds every projection
      one row; torch.mv then reads the weight once at memory speed, where the GEMM path of F.linear
      takes 1.3-1.8x longer on these shapes (129 vs 172-208 us for 1536 x 576).
    - While decoding, `decode` is the weight's DecodeWeight: cast once to the compute dtype, so the
      one-row product is torch.mv itself (autocast does not wrap mv on the CPU; without the cast,
      torch.matmul is the op autocast casts for). x.to(w.dtype) is the cast autocast makes.
    - A few rows (2 to PACKED_MAX_ROWS, e.g. 16 samples decoding together): the same weight
      prepacked once into oneDNN's blocked layout (DecodeWeight.packed). F.linear hands bf16
      products to oneDNN too, but with the plain weight, which oneDNN reorders on every call: with
      the reorder done once, the products of a 16-row decode step take 1.4-1.9x less time, with
      the same bits (tests/test_model.py compares them for 2 to 64 rows).
    Inference only: the decoding routes have no backward.
    """
    if decode is not None and not x.requires_grad:
        w = decode.weight
        rows = x.numel() // w.shape[1]
        if rows == 1:
            return torch.mv(w, x.reshape(-1).to(w.dtype)).view(*x.shape[:-1], w.shape[0])
        if decode.pack and rows <= PACKED_MAX_ROWS:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1).to(w.dtype), decode.packed(), None, "none", [], "")
            return y.view(*x.shape[:-1], w.shape[0])
        return F.linear(x.to(w.dtype), w)
    if x.numel() == weight.shape[1]:  # one row outside decoding (autocast casts for matmul)
        return torch.matmul(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def can_pack(dtype, device):
    """Whether decoding in `dtype` on `device` can use prepacked weights: bf16 on a CPU where ATen
    sends bf16 products to oneDNN (mkldnn enabled, a CPU with bf16 support), so that the packed
    product is the very kernel F.linear would run, and gives its bits."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class DecodeWeight:
    """A weight (out, in) as decoding reads it in linear(): `weight`, cast once to the compute
    dtype (it replaces the copy autocast would cache), and, when `pack` (bf16, can_pack), the same
    in oneDNN's blocked layout, packed on first use: a decode that never has 2 to PACKED_MAX_ROWS
    rows (one sequence) never pays for it (~0.1 s for the whole smolvlm-256m decoder and head)."""

    def __init__(self, weight, dtype, pack=False):
        self.weight, self.pack, self._packed = weight.detach().to(dtype), pack, None

    def packed(self):
        if self._packed is None:  # the layout is chosen for a batch of 32 rows: a decode step's few
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 32)
        return self._packed


class Linear(nn.Linear):
    """nn.Linear (same weights, same state-dict names) whose bias-free forward is linear() above.
    `decode` is its DecodeWeight, set only inside VLM.fused_projections."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode = None

    def forward(self, x):
        return super().forward(x) if self.bias is not None else linear(x, self.weight, self.decode)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # The statistic is computed in fp32 even under bf16: a sum of squares loses precision fast.
        # (add_ and rsqrt_ in place: the same numbers, two fewer allocations per call)
        h = x.float()
        h = h * h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(positions, head_dim, theta, dtype):  # positions (B, T) long -> 2 x (B, T, head_dim)
    # Computed in fp32 from integer positions so that cached decoding and a full forward agree.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    # Llama's split-halves layout, not interleaved pairs. sin comes with its first half negated, so
    # that apply_rotary can rotate with one roll (see there).
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x, cos, sin):  # x (B, H, T, hd); cos, sin (B, 1, T, hd) from rotary_cos_sin, shared by the heads
    # HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) for the halves x1, x2.
    # roll(x) = cat(x2, x1), and sin's negated first half supplies the minus sign: the same numbers
    # (a sign flip is exact) in one op instead of four (chunk, neg, cat).
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """A preallocated key/value cache (nanochat's engine): one buffer per tensor, filled in place.

    k, v: (n_layers, B, n_kv_heads, max_len, head_dim). All rows share `length`, the number of slots
    filled so far; a left-padded row simply has `key_mask` False at its padding slots. `pos` holds
    each row's next rotary position, which differs between rows when their prompts differ in length.
    `padded` says whether any slot so far is padding; until one is, a single new token may attend to
    every cached key, and needs no mask at all.
    """

    def __init__(self, cfg: TextConfig, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False

    @property
    def max_len(self):
        return self.k.shape[3]

    def update(self, layer, k, v):  # k, v (B, n_kv, T, hd) for the new chunk -> all keys so far
        # narrow() rather than [layer, :, :, a:b]: the same views, in fewer ops (this runs twice per
        # layer per decode step, where per-op overhead is most of the time at batch 1)
        T, end = k.shape[2], self.length + k.shape[2]
        keys, values = self.k[layer], self.v[layer]  # (B, n_kv, max_len, hd)
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def repeat_interleave(self, n):
        """A new cache with every row repeated n times: prefill a prompt once, sample n paths."""
        new = KVCache.__new__(KVCache)
        new.k, new.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        new.key_mask, new.pos = self.key_mask.repeat_interleave(n, dim=0), self.pos.repeat_interleave(n, dim=0)
        new.length, new.padded = self.length, self.padded
        return new

    def select(self, rows):
        """Keep only these rows (a LongTensor of indices), e.g. to drop finished samples."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.key_mask, self.pos = self.key_mask[rows], self.pos[rows]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = Linear(self.n_heads * self.hd, d, bias=False)
        self.qkv = None  # DecodeWeight of the (H + 2 KV) * hd x D fused weight, only inside VLM.fused_projections

    def forward(self, x, cos, sin, mask, cache):  # x (B, T, D)
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        if self.qkv is not None:  # one matmul and one rotary call instead of three and two
            qkv = linear(x, self.qkv.weight, self.qkv).view(B, T, H + 2 * KV, self.hd).transpose(1, 2)  # (B, H+2KV, T, hd)
            q, k = apply_rotary(qkv[:, :H + KV], cos, sin).split([H, KV], dim=1)
            v = qkv[:, H + KV:]
        else:
            q = self.q_proj(x).view(B, T, H, self.hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x).view(B, T, KV, self.hd).transpose(1, 2)  # (B, KV, T, hd)
            v = self.v_proj(x).view(B, T, KV, self.hd).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, hd), S = cached + T
        # GQA: each KV head is shared by n_heads / n_kv query heads. enable_gqa lets SDPA index the
        # shared head instead of copying K and V n_heads / n_kv times (HF's repeat_kv): while decoding,
        # that copy of the whole cache, every layer and every step, cost 6x the attention itself
        # (smolvlm-256m shape, batch 16, CPU). Either an explicit mask or is_causal, never both
        # (SDPA's is_causal is top-left aligned, wrong as soon as queries and keys differ in length);
        # with a cache and no mask, neither: the one new token sees every key (LlamaModel.forward).
        # Attention runs in the cache's dtype: under autocast the rotary output q is fp32 while the
        # cache is bf16, and casting the one new query down (what autocast's SDPA does anyway, so
        # the numbers are the same) replaces casting every cached key and value up and back down,
        # every layer and every step (batch 16: ~5 copies of the whole cache per layer).
        y = attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None and cache is None, enable_gqa=KV != H,
                      training=self.training)
        if not torch.is_autocast_enabled(y.device.type):  # under autocast o_proj casts y to bf16 anyway:
            y = y.to(q.dtype)  # an fp32 round trip there would be two exact, useless copies
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.hd))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up = None  # DecodeWeight of the 2 * intermediate x D fused weight, only inside VLM.fused_projections

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = linear(x, self.gate_up.weight, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


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


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, attention_mask=None, cache=None):  # x (B, T, D) embeddings -> (B, T, D)
        B, T, _ = x.shape
        real = (torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None
                else attention_mask.bool())  # (B, T) True for real tokens
        start = 0 if cache is None else cache.length
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > max_len {cache.max_len}")
        # Rotary positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
        first = 0 if cache is None else cache.pos[:, None]
        positions = (first + real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): every head, once for all layers

        mask = None  # plain causal attention: training and unpadded full forwards take SDPA's fast path
        if cache is not None:
            cache.key_mask[:, start:start + T] = real
            cache.padded = cache.padded or (attention_mask is not None and not bool(real.all()))
        # One new token after unpadded rows attends to every key: no mask at all (and SDPA's fused
        # kernel is faster without one; the attention then gets neither a mask nor is_causal).
        one_token_unpadded = cache is not None and T == 1 and not cache.padded
        if (cache is not None or attention_mask is not None) and not one_token_unpadded:
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


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.vision.num_patches % cfg.scale_factor**2 or math.isqrt(cfg.vision.num_patches) ** 2 != cfg.vision.num_patches:
            raise ValueError("the patch grid must be square and divisible by the pixel-shuffle scale factor")
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg.vision)
        self.connector = Connector(cfg)
        self.text_model = LlamaModel(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tokenizer = None  # a tokenizers.Tokenizer, when the checkpoint ships one
        self.apply(self._init_weights)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.text_model.embed_tokens.weight

    @staticmethod
    def _init_weights(module):
        # GPT-2 style: small normal weights, zero biases; norms start as the identity.
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @contextlib.contextmanager
    def fused_projections(self, dtype, pack=True):
        """The decoder's weights as decoding wants them, made once on entry and dropped on exit
        (so that training always sees the separate parameters). generate.py decodes inside it.

        1. Fused: every decoder layer computes q, k and v with one matrix product, and the MLP's
           gate and up with another, from weights concatenated and cast to `dtype`. At batch 1
           every projection is a memory-bound matrix-vector product, and one call per fused weight
           instead of three (two) saves the per-call cost, about a tenth of a decode step at the
           smolvlm-256m shape on the CPU. Same products, same numbers: each output row of a matrix
           product depends only on its own weight row.
        2. Cast and packed: every decoder projection (fused or not) and the head get a DecodeWeight,
           the weight cast once to `dtype` (the copy autocast would otherwise cache), which lets a
           one-row product call torch.mv directly; and, when can_pack(dtype) unless pack=False, a
           copy prepacked for oneDNN on first use, which linear() uses for steps of 2 to
           PACKED_MAX_ROWS rows. Same bits again; at batch 16 a decode step is ~15% faster.
        """
        pack = pack and can_pack(dtype, next(self.parameters()).device)
        for layer in self.text_model.layers:
            a, mlp = layer.self_attn, layer.mlp
            a.qkv = DecodeWeight(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), dtype, pack)
            mlp.gate_up = DecodeWeight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), dtype, pack)
            a.o_proj.decode = DecodeWeight(a.o_proj.weight, dtype, pack)
            mlp.down_proj.decode = DecodeWeight(mlp.down_proj.weight, dtype, pack)
        self.lm_head.decode = DecodeWeight(self.lm_head.weight, dtype, pack)
        try:
            yield self
        finally:
            for layer in self.text_model.layers:
                a, mlp = layer.self_attn, layer.mlp
                a.qkv = mlp.gate_up = a.o_proj.decode = mlp.down_proj.decode = None
            self.lm_head.decode = None

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
            n_slots, n_tokens = int(slots.sum()), image_embeds.shape[0] * image_embeds.shape[1]
            if n_slots != n_tokens:
                raise ValueError(f"the prompt has {n_slots} image placeholder tokens but the images give "
                                 f"{n_tokens} ({image_embeds.shape[0]} x {image_embeds.shape[1]})")
            # masked_scatter fills the slots in row-major order: image i's tokens go to the i-th block.
            x = x.masked_scatter(slots[..., None], image_embeds.to(x.dtype))
        h = self.text_model(x, attention_mask, cache)
        if last_only:
            h = h[:, -1:]  # decoding needs only the next-token distribution
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            # Position t predicts token t+1: the one shift in the codebase. Loss in fp32.
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)
        return logits, loss

    def configure_optimizers(self, weight_decay, lr_text, lr_vision, lr_projector, betas=(0.9, 0.95), freeze_vision=False):
        """AdamW with weight decay on matrices only (not norms or biases) and one lr per part."""
        self.vision_model.requires_grad_(not freeze_vision)
        groups = {}
        for name, p in self.named_parameters():  # a tied weight is listed once
            if not p.requires_grad:
                continue
            part = "vision" if name.startswith("vision_model.") else "projector" if name.startswith("connector.") else "text"
            decay = p.dim() >= 2
            key = f"{part}/{'decay' if decay else 'no_decay'}"
            lr = {"vision": lr_vision, "projector": lr_projector, "text": lr_text}[part]
            groups.setdefault(key, {"name": key, "params": [], "lr": lr, "weight_decay": weight_decay if decay else 0.0})
            groups[key]["params"].append(p)
        return torch.optim.AdamW(list(groups.values()), betas=betas)

    # ------------------------------------------------------------------------------------------
    # Saving and loading

    def save_pretrained(self, path):
        """config.json + model.safetensors (+ tokenizer.json), each written to a temp file and renamed."""
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (k == "lm_head.weight" and self.config.text.tie_word_embeddings)}
        atomic_write(os.path.join(path, "model.safetensors"), lambda f: save_file(state, f, metadata={"format": "pt"}))
        atomic_write(os.path.join(path, "config.json"), lambda f: write_json(self.config.to_dict(), f))
        if self.tokenizer is not None:
            atomic_write(os.path.join(path, "tokenizer.json"), lambda f: self.tokenizer.save(f))

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """This project's own checkpoints, or a SmolVLM / Idefics3 checkpoint directory as published."""
        config = _read_config(path)
        model_type = config.get("model_type")
        if model_type == "nano-insight-v":
            cfg, prefix_map = VLMConfig.from_dict(config), {"": ""}
        elif model_type == "idefics3":
            cfg, prefix_map = _idefics3_config(config), {"model.": "", "lm_head.": "lm_head."}
        else:
            raise ValueError(f"{path}/config.json: unsupported model_type {model_type!r}; expected 'nano-insight-v' "
                             f"or 'idefics3' (for a SigLIP + Llama pair use VLM.from_parts)")
        model = cls(cfg)
        model._load_checked(_rename(_read_safetensors(path), prefix_map), path)
        model.tokenizer = _read_tokenizer(path)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_parts(cls, vision_dir, text_dir, scale_factor=2, image_token_id=None, dtype=None):
        """A SigLIP checkpoint + a Llama-family checkpoint; the projector is freshly initialised."""
        vconf, tconf = _read_config(vision_dir), _read_config(text_dir)
        if vconf.get("model_type") not in ("siglip", "siglip_vision_model"):
            raise ValueError(f"{vision_dir}/config.json: expected a SigLIP checkpoint, got model_type {vconf.get('model_type')!r}")
        if tconf.get("model_type") != "llama":
            raise ValueError(f"{text_dir}/config.json: expected a Llama checkpoint, got model_type {tconf.get('model_type')!r}")
        tokenizer = _read_tokenizer(text_dir)
        if image_token_id is None:
            image_token_id = tokenizer.token_to_id("<image>") if tokenizer is not None else None
            if image_token_id is None:
                raise ValueError(f"{text_dir}: no '<image>' token in its tokenizer; pass image_token_id=")
        cfg = VLMConfig(_siglip_config(vconf.get("vision_config", vconf)), _llama_config(tconf, tconf), scale_factor, image_token_id)
        vision = _read_safetensors(vision_dir)
        if vconf["model_type"] == "siglip_vision_model":
            # transformers 4 saved vision-only SigLIP keys under `vision_model.`, transformers 5 without it.
            vision = _rename(vision, {"vision_model.": "vision_model.", "": "vision_model."})
        # A dual-tower SigLIP also holds a text tower and a pooling head: only the vision trunk is used.
        vision = {k: v for k, v in vision.items() if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
        text = _rename(_read_safetensors(text_dir), {"model.": "text_model.", "lm_head.": "lm_head."})
        model = cls(cfg)
        model._load_checked({**vision, **text}, f"{vision_dir} + {text_dir}", fresh=("connector.",))
        model.tokenizer = tokenizer
        return model.to(dtype) if dtype is not None else model

    def _load_checked(self, state, source, fresh=()):
        """Copy tensors in, after checking that every key and shape matches: never a silent partial load."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        optional = {"lm_head.weight"} if self.config.text.tie_word_embeddings else set()
        missing = [k for k in expected if k not in state and k not in optional and not k.startswith(fresh)]
        unexpected = [k for k in state if k not in expected]
        wrong = [f"{k} is {tuple(state[k].shape)} in the checkpoint but {tuple(expected[k])} in the model"
                 for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k])]
        problems = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
                   ([f"unexpected tensors: {', '.join(unexpected)}"] if unexpected else []) + wrong
        if problems:
            raise ValueError(f"{source}: checkpoint does not match the model config: " + "; ".join(problems))
        if "lm_head.weight" in optional:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: the embedding is the head
        self.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------
# File helpers


def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json, so this is not a checkpoint directory")
    with open(config_path) as f:
        return json.load(f)


def _read_safetensors(path):
    """All tensors of a checkpoint, from model.safetensors or the shards its index names."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def _read_tokenizer(path):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(file)


def _rename(state, prefix_map):
    """Map checkpoint key prefixes to ours; keys matching no prefix are kept, to be reported."""
    out = {}
    for key, value in state.items():
        src = next((p for p in prefix_map if key.startswith(p)), None)
        out[key if src is None else prefix_map[src] + key[len(src):]] = value
    return out


def _siglip_config(v):
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported vision activation {v['hidden_act']!r}")
    # Defaults are SiglipVisionConfig's, for keys a config.json may omit.
    return VisionConfig(v.get("image_size", 224), v.get("patch_size", 16), v.get("hidden_size", 768),
                        v.get("intermediate_size", 3072), v.get("num_hidden_layers", 12),
                        v.get("num_attention_heads", 12), v.get("layer_norm_eps", 1e-6), v.get("num_channels", 3))


def _llama_config(t, top):
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope scaling {rope!r}: only plain rotary embeddings are implemented")
    heads = t.get("num_attention_heads", 32)
    hidden = t.get("hidden_size", 4096)
    if t.get("head_dim", hidden // heads) != hidden // heads:
        raise ValueError("unsupported: head_dim differs from hidden_size / num_attention_heads")
    if t.get("attention_bias") or t.get("mlp_bias"):
        raise ValueError("unsupported: Llama checkpoints with attention or MLP biases")
    # Defaults are LlamaConfig's, for keys a config.json may omit.
    return TextConfig(t.get("vocab_size", 32000), hidden, t.get("intermediate_size", 11008),
                      t.get("num_hidden_layers", 32), heads, t.get("num_key_value_heads") or heads,
                      float(rope.get("rope_theta", t.get("rope_theta", 10000.0))), t.get("rms_norm_eps", 1e-6),
                      bool(top.get("tie_word_embeddings", t.get("tie_word_embeddings", False))))


def _idefics3_config(c):
    # Idefics3Config's defaults: a SigLIP-so400m-like vision config and scale factor 2.
    vision = {"hidden_size": 1152, "intermediate_size": 3072, "num_attention_heads": 16, "patch_size": 32,
              **c.get("vision_config", {})}
    return VLMConfig(_siglip_config(vision), _llama_config(c.get("text_config", {}), c),
                     c.get("scale_factor", 2), c.get("image_token_id", 128257))


def parse_config(cls, argv=None, description=None):
    """The one configuration mechanism of every script: a dataclass whose fields become --flags.

    A field's default is the flag's default and its type; `field(metadata={"help": ...})` documents
    it. Booleans get --flag / --no-flag. Fields defaulting to None take strings unless their
    metadata names a "type".
    """
    parser = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = f.metadata.get("type", type(default) if default is not None else str)
            parser.add_argument(flag, type=kind, default=default, help=help_text,
                                choices=f.metadata.get("choices"))
    return cls(**vars(parser.parse_args(argv)))
