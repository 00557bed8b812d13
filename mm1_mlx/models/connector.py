"""Vision-language connectors: patch features (N, P, C_vis) -> image tokens (N, T, D_text).

``c-abstractor`` (Honeybee, used by MM1), ``avg-pool`` and ``attention-pool`` (MM1's ablations) and
``mlp`` (LLaVA-1.5's projector, one token per patch). Chosen by ``ConnectorConfig.type``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu.ops import silu
from .config import ConnectorConfig
from .vision import Attention, activation


def pool_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) averaging matrix with the bin edges of torch's adaptive_avg_pool."""
    m = np.zeros((dst, src), dtype=np.float32)
    for i in range(dst):
        lo, hi = (i * src) // dst, -((-(i + 1) * src) // dst)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: mx.array, size: int) -> mx.array:
    """(N, h, w, C) -> (N, size, size, C)."""
    _, h, w, _ = x.shape
    ph = mx.array(pool_matrix(h, size)).astype(x.dtype)
    pw = mx.array(pool_matrix(w, size)).astype(x.dtype)
    x = mx.einsum("ih,nhwc->niwc", ph, x)
    return mx.einsum("jw,niwc->nijc", pw, x)


def to_grid(x: mx.array) -> mx.array:
    N, P, C = x.shape
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"{P} patch features do not form a square grid")
    return x.reshape(N, side, side, C)


def grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_image_tokens must be a square number, got {num_tokens}")
    return side


def conv_same(x: mx.array, weight: mx.array) -> mx.array:
    """Stride-1 'same' convolution; a dense one as one matmul over shifted copies (im2col).

    Equal to nn.Conv2d with padding k//2; on the CPU backend its backward pass is several times
    faster than the direct convolution's for the small grids connectors see. A grouped weight
    (fewer input channels than ``x`` has) runs as a grouped convolution.
    """
    O, k, _, C = weight.shape
    N, H, W, C_in = x.shape
    p = k // 2
    if C != C_in:
        return mx.conv2d(x, weight, padding=p, groups=C_in // C)
    if k == 1:
        return x @ weight.reshape(O, C).T
    xp = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    cols = mx.concatenate([xp[:, i:i + H, j:j + W] for i in range(k) for j in range(k)], axis=-1)
    return cols @ weight.reshape(O, k * k * C).T  # (N, H, W, O)


class ConvNorm(nn.Module):
    """Conv (no bias) -> LayerNorm2d (LayerNorm over channels, channels-last)."""

    def __init__(self, cin: int, cout: int, kernel: int, eps: float, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.norm = nn.LayerNorm(cout, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(conv_same(x, self.conv.weight))


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite: channel gates from the pooled features (SiLU inside for RegNet's,
    ReLU for FastViT's)."""

    def __init__(self, dims: int, hidden: int, act=nn.silu):
        super().__init__()
        self.fc1 = nn.Conv2d(dims, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dims, 1)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        s = x.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
        return x * mx.sigmoid(self.fc2(self.act(self.fc1(s))))


class ResBlock(nn.Module):
    """timm's RegNet Bottleneck (bottle_ratio 1) with LayerNorm2d and SiLU, as Honeybee builds it.

    conv1 1x1 -> conv2 3x3 (grouped by ``group_size``) -> squeeze-excite -> conv3 1x1, plus a
    1x1 conv shortcut where the width changes; SiLU after conv1, conv2 and the sum.
    """

    def __init__(self, cin: int, cout: int, config: ConnectorConfig):
        super().__init__()
        eps = config.layer_norm_eps
        groups = cout // config.group_size if config.group_size else 1
        self.conv1 = ConvNorm(cin, cout, 1, eps)
        self.conv2 = ConvNorm(cout, cout, 3, eps, groups)
        self.se = SqueezeExcite(cout, int(round(cin * config.se_ratio)))
        self.conv3 = ConvNorm(cout, cout, 1, eps)
        if cin != cout:
            self.shortcut = ConvNorm(cin, cout, 1, eps)

    def __call__(self, x: mx.array) -> mx.array:
        h = silu(self.conv1(x))
        h = self.se(silu(self.conv2(h)))
        h = self.conv3(h)
        skip = self.shortcut(x) if "shortcut" in self else x
        return silu(h + skip)


class Readout(nn.Module):
    """Linear -> (act -> Linear) * (depth - 1): into the decoder's width."""

    def __init__(self, cin: int, cout: int, depth: int, act: str, bias: bool = True,
                 norm: bool = False):
        super().__init__()
        self.act = activation(act)
        self.layers = [nn.Linear(cin if i == 0 else cout, cout, bias=bias) for i in range(depth)]
        if norm:
            self.norm = nn.LayerNorm(cout)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(self.act(x))
        return self.norm(x) if "norm" in self else x


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: [prenorm] [+ pos_emb] -> RegStage -> adaptive avg pool -> RegStage
    -> readout (``honeybee/projectors/projectors.py``; no stages when depth is 0)."""

    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int,
                 num_patches: int = 0):
        super().__init__()
        self.side = grid_side(config.num_image_tokens)
        C = config.hidden_size if config.depth else vision_dims
        if config.prenorm:
            self.prenorm = nn.LayerNorm(vision_dims, eps=1e-6)  # timm's LayerNorm
        if config.pos_emb:
            if not num_patches:
                raise ValueError("a c-abstractor with pos_emb needs the encoder's patch count")
            self.pos_emb = mx.random.normal((1, num_patches, vision_dims)) * 0.02
        self.stage1 = [ResBlock(vision_dims if i == 0 else C, C, config)
                       for i in range(config.depth)]
        self.stage2 = [ResBlock(C, C, config) for _ in range(config.depth)]
        self.readout = Readout(C, text_dims, config.mlp_depth, config.hidden_act, config.bias,
                               config.output_norm)

    def __call__(self, x: mx.array) -> mx.array:
        if "prenorm" in self:
            x = self.prenorm(x)
        if "pos_emb" in self:
            x = x + self.pos_emb.astype(x.dtype)
        x = to_grid(x)  # (N, h, w, C_vis)
        for block in self.stage1:
            x = block(x)
        x = adaptive_avg_pool(x, self.side)  # (N, s, s, C)
        for block in self.stage2:
            x = block(x)
        N, s, _, C = x.shape
        return self.readout(x.reshape(N, s * s, C))


class AvgPool(nn.Module):
    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int,
                 num_patches: int = 0):
        super().__init__()
        self.side = grid_side(config.num_image_tokens)
        self.readout = Readout(vision_dims, text_dims, config.mlp_depth, config.hidden_act,
                               config.bias, config.output_norm)

    def __call__(self, x: mx.array) -> mx.array:
        x = adaptive_avg_pool(to_grid(x), self.side)
        N, s, _, C = x.shape
        return self.readout(x.reshape(N, s * s, C))


class AttentionPool(nn.Module):
    """N learned queries cross-attending to the patch features."""

    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int,
                 num_patches: int = 0):
        super().__init__()
        self.queries = mx.random.normal((config.num_image_tokens, vision_dims)) * 0.02
        self.norm_q = nn.LayerNorm(vision_dims)
        self.norm_kv = nn.LayerNorm(vision_dims)
        self.attn = Attention(vision_dims, config.num_heads)
        self.readout = Readout(vision_dims, text_dims, config.mlp_depth, config.hidden_act,
                               config.bias, config.output_norm)

    def __call__(self, x: mx.array) -> mx.array:
        q = mx.broadcast_to(self.norm_q(self.queries), (x.shape[0], *self.queries.shape))
        q = q.astype(x.dtype)
        return self.readout(q + self.attn(q, self.norm_kv(x)))


class MLPProjector(nn.Module):
    """LLaVA-1.5's two-layer GELU projector: one image token per patch."""

    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int,
                 num_patches: int = 0):
        super().__init__()
        self.readout = Readout(vision_dims, text_dims, config.mlp_depth, config.hidden_act,
                               config.bias, config.output_norm)

    def __call__(self, x: mx.array) -> mx.array:
        return self.readout(x)


CONNECTORS = {
    "c-abstractor": CAbstractor,
    "avg-pool": AvgPool,
    "attention-pool": AttentionPool,
    "mlp": MLPProjector,
}


def build_connector(config: ConnectorConfig, vision_dims: int, text_dims: int,
                    num_patches: int = 0) -> nn.Module:
    """``num_patches``: the encoder's patch count (a c-abstractor's ``pos_emb`` needs it)."""
    if config.type not in CONNECTORS:
        raise ValueError(f"unknown connector type {config.type!r}; choose from {sorted(CONNECTORS)}")
    return CONNECTORS[config.type](config, vision_dims, text_dims, num_patches)
