"""The image encoder: a CLIP-, SigLIP- or AIMv2-style ViT. Input (N, H, W, 3) channels-last,
normalized."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu.ops import Linear, attention, gelu, gelu_approx, quick_gelu, silu
from .config import VisionConfig


def activation(name: str):
    return {
        "quick_gelu": quick_gelu,
        "gelu": gelu,
        "gelu_pytorch_tanh": gelu_approx,
        "gelu_tanh": gelu_approx,
        "silu": silu,
        "relu": nn.relu,
    }[name]


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = Linear(dims, dims, bias=bias)
        self.k_proj = Linear(dims, dims, bias=bias)
        self.v_proj = Linear(dims, dims, bias=bias)
        self.out_proj = Linear(dims, dims, bias=bias)

    def __call__(self, x: mx.array, kv: mx.array | None = None) -> mx.array:
        kv = x if kv is None else kv
        B, L, D = x.shape
        S = kv.shape[1]
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(kv).reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(kv).reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3)
        o = attention(q, k, v, self.scale)  # (B, nh, L, hs)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


def norm(config: VisionConfig) -> nn.Module:
    if config.rms_norm:
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """SwiGLU, as AIMv2's (and Llama's) FFN."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        D, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(D, I, bias=bias)
        self.up_proj = Linear(D, I, bias=bias)
        self.down_proj = Linear(I, D, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads, config.qkv_bias)
        self.layer_norm1 = norm(config)
        self.mlp = GatedMLP(config) if config.gated_mlp else MLP(config)
        self.layer_norm2 = norm(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def cubic(x: float, a: float = -0.5) -> float:
    """Keys' cubic convolution kernel; a = -0.5 is PIL's (torch's antialiased bicubic)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def antialias_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of torch's ``interpolate(mode="bicubic", antialias=True)`` (PIL's)."""
    scale = src / dst
    support = 2.0 * max(scale, 1.0)  # the kernel widens when shrinking
    stretch = 1.0 / max(scale, 1.0)
    m = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), src)
        w = np.array([cubic((j - center + 0.5) * stretch) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum()
    return m.astype(np.float32)


def interpolate_grid(pos: mx.array, src: int, dst: int, antialias: bool = False) -> mx.array:
    """Resize (src*src, D) grid position embeddings to (dst*dst, D), bicubic as MM1's SFT does.

    ``antialias``: as open_clip's ``resize_pos_embed`` (PIL's kernel), else as transformers' CLIP.
    """
    D = pos.shape[-1]
    grid = pos.reshape(1, src, src, D)
    if antialias:
        m = mx.array(antialias_matrix(src, dst)).astype(pos.dtype)
        return mx.einsum("ih,jw,hwd->ijd", m, m, grid[0]).reshape(dst * dst, D)
    up = nn.Upsample(scale_factor=dst / src, mode="cubic", align_corners=False)(grid)
    return up[:, :dst, :dst].reshape(dst * dst, D)


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, D, config.patch_size, stride=config.patch_size,
            bias=config.patch_bias,
        )
        if config.patch_norm:
            self.patch_norm = norm(config)
        if config.class_token:
            self.class_embedding = mx.zeros((D,))
        grid = config.pretrain_image_size // config.patch_size
        self.position_embedding = nn.Embedding(grid * grid + int(config.class_token), D)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # (N, h, w, D)
        N, h, w, D = x.shape
        x = x.reshape(N, h * w, D)
        if self.config.patch_norm:
            x = self.patch_norm(x)
        pos = self.position_embedding.weight
        cls_pos, patch_pos = (pos[:1], pos[1:]) if self.config.class_token else (None, pos)
        src = int(math.isqrt(patch_pos.shape[0]))
        if h != src or w != src:
            if h != w:
                raise ValueError(f"expected square images, got a {h}x{w} patch grid")
            patch_pos = interpolate_grid(patch_pos, src, h, self.config.pos_embed_antialias)
        x = x + patch_pos.astype(x.dtype)
        if self.config.class_token:
            cls = mx.broadcast_to(self.class_embedding + cls_pos[0], (N, 1, D)).astype(x.dtype)
            x = mx.concatenate([cls, x], axis=1)
        return x


class Encoder(nn.Module):
    def __init__(self, layers: list):
        super().__init__()
        self.layers = layers


class VisionModel(nn.Module):
    """ViT returning the hidden state of ``config.feature_layer``: (N, num_patches[+1], D)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        if config.pre_layernorm:
            self.pre_layrnorm = norm(config)
        n = config.num_hidden_layers
        # layers past the feature layer never run, so they are not built
        used = n + 1 + config.feature_layer if config.feature_layer < 0 else config.feature_layer
        if not 0 < used <= n:
            raise ValueError(f"feature_layer {config.feature_layer} out of range for {n} layers")
        self.encoder = Encoder([EncoderLayer(config) for _ in range(used)])
        if config.post_layernorm:
            self.post_layernorm = norm(config)

    @property
    def dtype(self) -> mx.Dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.embeddings(pixels)
        if self.config.pre_layernorm:
            x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = layer(x)
        if self.config.post_layernorm:
            x = self.post_layernorm(x)
        if self.config.drops_first:
            x = x[:, 1:]
        return x
