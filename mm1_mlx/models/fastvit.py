"""FastViTHD: FastVLM's image encoder (timm's ``fastvit_mci3``), in inference (reparameterised) form.

A convolutional stem (/4), five stages (each but the first halves the grid with a 7x7 stride-2
``PatchEmbed``): three of RepMixer blocks (a depthwise 3x3 with its residual folded in, then a
ConvMlp), two of attention blocks after a conditional position encoding (RepCPE, a depthwise 7x7);
then ``final_conv`` (a grouped 3x3 with squeeze-excite) widens the channels. Input (N, H, W, 3)
channels-last; output (N, H/64 * W/64, C) like the ViT's patch features. Attribute names are
timm's, so weights map one to one (``mm1_mlx/formats/fastvlm.py`` fuses the BatchNorms).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cpu.ops import Linear, attention
from .config import FastViTConfig
from .connector import SqueezeExcite
from .vision import activation


def se_width(channels: int) -> int:
    """timm's SqueezeExcite(rd_ratio=1/16, rd_divisor=1): the reduction rounded half up."""
    return max(1, int(channels / 16 + 0.5))


class ReparamConv(nn.Module):
    """MobileOneBlock / ReparamLargeKernelConv after reparameterisation: act(se(conv(x)))."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 se: bool = False, act=None):
        super().__init__()
        pad = ((stride - 1) + (kernel - 1)) // 2  # timm's symmetric padding
        self.reparam_conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad,
                                      groups=groups, bias=True)
        if se:
            self.se = SqueezeExcite(cout, se_width(cout), nn.relu)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        x = self.reparam_conv(x)
        if "se" in self:
            x = self.se(x)
        return self.act(x) if self.act is not None else x


class DepthwiseConv(nn.Module):
    """RepMixer / RepCPE after reparameterisation: one depthwise conv (residual folded in)."""

    def __init__(self, dims: int, kernel: int):
        super().__init__()
        self.reparam_conv = nn.Conv2d(dims, dims, kernel, padding=kernel // 2, groups=dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.reparam_conv(x)


class LayerScale(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.gamma = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma


class ConvMlp(nn.Module):
    """Depthwise 7x7 (its BatchNorm fused in), 1x1 up, act, 1x1 down."""

    def __init__(self, dims: int, hidden: int, act):
        super().__init__()
        self.conv = nn.Conv2d(dims, dims, 7, padding=3, groups=dims)
        self.fc1 = nn.Conv2d(dims, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dims, 1)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class Attention(nn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.num_heads = dims // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = Linear(dims, dims * 3, bias=False)
        self.proj = Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        N, H, W, C = x.shape
        qkv = self.qkv(x.reshape(N, H * W, C)).reshape(N, H * W, 3, self.num_heads, -1)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (N, nh, HW, hs)
        o = attention(q, k, v, self.scale)
        return self.proj(o.transpose(0, 2, 1, 3).reshape(N, H * W, C)).reshape(N, H, W, C)


class RepMixerBlock(nn.Module):
    def __init__(self, config: FastViTConfig, dims: int, mlp_ratio: float):
        super().__init__()
        act = activation(config.hidden_act)
        self.token_mixer = DepthwiseConv(dims, config.repmixer_kernel_size)
        self.mlp = ConvMlp(dims, int(dims * mlp_ratio), act)
        self.layer_scale = LayerScale(dims)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class AttentionBlock(nn.Module):
    def __init__(self, config: FastViTConfig, dims: int, mlp_ratio: float):
        super().__init__()
        act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(dims, eps=config.layer_norm_eps)  # LayerNorm2d, channels-last
        self.token_mixer = Attention(dims, config.head_dim)
        self.layer_scale_1 = LayerScale(dims)
        self.mlp = ConvMlp(dims, int(dims * mlp_ratio), act)
        self.layer_scale_2 = LayerScale(dims)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))


BLOCKS = {"repmixer": RepMixerBlock, "attention": AttentionBlock}


class Downsample(nn.Module):
    """timm's PatchEmbed: a large-kernel stride-2 conv, then a 1x1."""

    def __init__(self, proj: list):
        super().__init__()
        self.proj = proj

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.proj:
            x = layer(x)
        return x


class Stage(nn.Module):
    def __init__(self, config: FastViTConfig, i: int):
        super().__init__()
        dims, act = config.embed_dims[i], activation(config.hidden_act)
        if config.downsampled(i):  # PatchEmbed: a large stride-2 conv, then a 1x1
            prev = config.embed_dims[i - 1]
            self.downsample = Downsample(
                [ReparamConv(prev, dims, config.down_patch_size, config.down_stride,
                             groups=prev, act=act if config.lkc_use_act else None),
                 ReparamConv(dims, dims, 1, act=act)])
        if config.pos_embs[i]:
            self.pos_emb = DepthwiseConv(dims, config.pos_emb_kernel)
        block = BLOCKS[config.token_mixers[i]]
        self.blocks = [block(config, dims, config.mlp_ratios[i]) for _ in range(config.layers[i])]

    def __call__(self, x: mx.array) -> mx.array:
        if "downsample" in self:
            x = self.downsample(x)
        if "pos_emb" in self:
            x = self.pos_emb(x)
        for block in self.blocks:
            x = block(x)
        return x


class FastViT(nn.Module):
    """(N, H, W, 3) normalized pixels -> (N, H/64 * W/64, embed_dims[-1] * cls_ratio)."""

    def __init__(self, config: FastViTConfig):
        super().__init__()
        self.config = config
        e0, act = config.embed_dims[0], activation(config.hidden_act)
        self.stem = [ReparamConv(3, e0, 3, 2, act=act),
                     ReparamConv(e0, e0, 3, 2, groups=e0, act=act),
                     ReparamConv(e0, e0, 1, act=act)]
        self.stages = [Stage(config, i) for i in range(len(config.layers))]
        last = config.embed_dims[-1]
        self.final_conv = ReparamConv(last, config.hidden_size, 3, groups=last, se=True, act=act)

    @property
    def dtype(self) -> mx.Dtype:
        return self.stem[0].reparam_conv.weight.dtype

    def __call__(self, pixels: mx.array) -> mx.array:
        x = pixels
        for layer in self.stem:
            x = layer(x)
        for stage in self.stages:
            x = stage(x)
        x = self.final_conv(x)
        N, h, w, C = x.shape
        return x.reshape(N, h * w, C)
