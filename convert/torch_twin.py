"""A PyTorch twin of the image encoder + connector, built from an MLX model's own weights.

Used to export the encoder to Core ML (``convert/coreml.py`` traces it with ``torch.jit.trace``).
Module and parameter names equal the MLX keys (``vision_tower.*``, ``connector.*``), so loading
asserts every key and shape. The twin's input is an RGB image in [0, 1], (N, 3, H, W): the
checkpoint's per-channel mean/std normalisation happens inside the graph.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten
from torch import nn as tnn

from mm1_mlx.errors import MM1Error
from mm1_mlx.models import fastvit
from mm1_mlx.models.config import ConnectorConfig, FastViTConfig, ModelConfig, VisionConfig
from mm1_mlx.models.connector import pool_matrix
from mm1_mlx.models.vision import interpolate_grid

TWIN_CONNECTORS = ("c-abstractor", "avg-pool", "attention-pool", "mlp")


def activation(name: str):
    # mirrors mm1_mlx.models.vision.activation: gelu is exact (erf), gelu_approx is the tanh form
    return {
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
    }[name]


def layer_norm_2d(norm: tnn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an (N, C, H, W) tensor."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ---- encoder ----
class Attention(tnn.Module):
    def __init__(self, dims: int, num_heads: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = tnn.Linear(dims, dims, bias=bias)
        self.k_proj = tnn.Linear(dims, dims, bias=bias)
        self.v_proj = tnn.Linear(dims, dims, bias=bias)
        self.out_proj = tnn.Linear(dims, dims, bias=bias)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        B, L, D = x.shape
        S = kv.shape[1]
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(kv).reshape(B, S, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(kv).reshape(B, S, self.num_heads, -1).transpose(1, 2)
        w = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)  # (B, nh, L, S)
        return self.out_proj((w @ v).transpose(1, 2).reshape(B, L, D))


class MLP(tnn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = tnn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = tnn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(tnn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = tnn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config)
        self.layer_norm2 = tnn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(tnn.Module):
    """Patch conv + position embeddings, already resized to the export resolution."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.class_token = config.class_token
        D, p = config.hidden_size, config.patch_size
        self.patch_embedding = tnn.Conv2d(config.num_channels, D, p, stride=p,
                                          bias=config.patch_bias)
        if config.class_token:
            self.class_embedding = tnn.Parameter(torch.zeros(D))
        grid = config.image_size // p
        self.position_embedding = tnn.Embedding(grid * grid + int(config.class_token), D)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (N, h*w, D)
        pos = self.position_embedding.weight
        if not self.class_token:
            return x + pos
        x = x + pos[1:]
        cls = (self.class_embedding + pos[0]).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1)


class Encoder(tnn.Module):
    def __init__(self, layers: list):
        super().__init__()
        self.layers = tnn.ModuleList(layers)


class VisionModel(tnn.Module):
    def __init__(self, config: VisionConfig, num_layers: int):
        super().__init__()
        self.config = config
        eps = config.layer_norm_eps
        self.embeddings = Embeddings(config)
        if config.pre_layernorm:
            self.pre_layrnorm = tnn.LayerNorm(config.hidden_size, eps=eps)
        self.encoder = Encoder([EncoderLayer(config) for _ in range(num_layers)])
        if config.post_layernorm:
            self.post_layernorm = tnn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, pixels):
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


# ---- FastViTHD (mm1_mlx/models/fastvit.py), NCHW ----
class FvSqueezeExcite(tnn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1 = tnn.Conv2d(dims, hidden, 1)
        self.fc2 = tnn.Conv2d(hidden, dims, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class FvReparamConv(tnn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 se: bool = False, act=None):
        super().__init__()
        pad = ((stride - 1) + (kernel - 1)) // 2
        self.reparam_conv = tnn.Conv2d(cin, cout, kernel, stride, pad, groups=groups)
        self.se = FvSqueezeExcite(cout, fastvit.se_width(cout)) if se else None
        self.act = act

    def forward(self, x):
        x = self.reparam_conv(x)
        if self.se is not None:
            x = self.se(x)
        return self.act(x) if self.act is not None else x


class FvDepthwiseConv(tnn.Module):
    def __init__(self, dims: int, kernel: int):
        super().__init__()
        self.reparam_conv = tnn.Conv2d(dims, dims, kernel, padding=kernel // 2, groups=dims)

    def forward(self, x):
        return self.reparam_conv(x)


class FvLayerScale(tnn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.gamma = tnn.Parameter(torch.ones(dims))

    def forward(self, x):
        return x * self.gamma[:, None, None]


class FvConvMlp(tnn.Module):
    def __init__(self, dims: int, hidden: int, act):
        super().__init__()
        self.conv = tnn.Conv2d(dims, dims, 7, padding=3, groups=dims)
        self.fc1 = tnn.Conv2d(dims, hidden, 1)
        self.fc2 = tnn.Conv2d(hidden, dims, 1)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class FvAttention(tnn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = dims // head_dim, head_dim
        self.scale = head_dim ** -0.5
        self.qkv = tnn.Linear(dims, dims * 3, bias=False)
        self.proj = tnn.Linear(dims, dims)

    def forward(self, x):
        N, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (N, HW, C); -1, not H * W: traced sizes stay ints
        q, k, v = self.qkv(t).reshape(N, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        w = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)
        o = self.proj((w @ v).transpose(1, 2).reshape(N, -1, C))
        return o.transpose(1, 2).reshape(N, C, H, W)


class FvBlock(tnn.Module):
    """RepMixerBlock or AttentionBlock, by ``kind``."""

    def __init__(self, config, kind: str, dims: int, mlp_ratio: float):
        super().__init__()
        act = activation(config.hidden_act)
        self.attention = kind == "attention"
        self.mlp = FvConvMlp(dims, int(dims * mlp_ratio), act)
        if self.attention:
            self.norm = tnn.LayerNorm(dims, eps=config.layer_norm_eps)
            self.token_mixer = FvAttention(dims, config.head_dim)
            self.layer_scale_1, self.layer_scale_2 = FvLayerScale(dims), FvLayerScale(dims)
        else:
            self.token_mixer = FvDepthwiseConv(dims, config.repmixer_kernel_size)
            self.layer_scale = FvLayerScale(dims)

    def forward(self, x):
        if self.attention:
            x = x + self.layer_scale_1(self.token_mixer(layer_norm_2d(self.norm, x)))
            return x + self.layer_scale_2(self.mlp(x))
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class FvDownsample(tnn.Module):
    def __init__(self, proj: list):
        super().__init__()
        self.proj = tnn.ModuleList(proj)

    def forward(self, x):
        for layer in self.proj:
            x = layer(x)
        return x


class FvStage(tnn.Module):
    def __init__(self, config, i: int):
        super().__init__()
        dims, act = config.embed_dims[i], activation(config.hidden_act)
        self.downsample = self.pos_emb = None
        if config.downsampled(i):
            prev = config.embed_dims[i - 1]
            self.downsample = FvDownsample(
                [FvReparamConv(prev, dims, config.down_patch_size, config.down_stride, prev,
                               act=act if config.lkc_use_act else None),
                 FvReparamConv(dims, dims, 1, act=act)])
        if config.pos_embs[i]:
            self.pos_emb = FvDepthwiseConv(dims, config.pos_emb_kernel)
        self.blocks = tnn.ModuleList([FvBlock(config, config.token_mixers[i], dims,
                                              config.mlp_ratios[i])
                                      for _ in range(config.layers[i])])

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        if self.pos_emb is not None:
            x = self.pos_emb(x)
        for block in self.blocks:
            x = block(x)
        return x


class FastViT(tnn.Module):
    """(N, 3, S, S) normalized -> (N, (S/64)^2, C), as mm1_mlx.models.fastvit.FastViT."""

    def __init__(self, config):
        super().__init__()
        e0, act = config.embed_dims[0], activation(config.hidden_act)
        self.stem = tnn.ModuleList([FvReparamConv(3, e0, 3, 2, act=act),
                                    FvReparamConv(e0, e0, 3, 2, e0, act=act),
                                    FvReparamConv(e0, e0, 1, act=act)])
        self.stages = tnn.ModuleList([FvStage(config, i) for i in range(len(config.layers))])
        last = config.embed_dims[-1]
        self.final_conv = FvReparamConv(last, config.hidden_size, 3, 1, last, se=True, act=act)

    def forward(self, x):
        for layer in self.stem:
            x = layer(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_conv(x).flatten(2).transpose(1, 2)


# ---- connectors ----
class AdaptivePool(tnn.Module):
    """Adaptive average pooling as two constant matmuls (torch's bin edges, exact for any size)."""

    def __init__(self, src: int, dst: int):
        super().__init__()
        self.register_buffer("pool", torch.from_numpy(pool_matrix(src, dst)), persistent=False)

    def forward(self, x):  # (N, C, src, src) -> (N, C, dst, dst)
        return self.pool @ x @ self.pool.T


class ConvNorm(tnn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, eps: float, groups: int = 1):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.norm = tnn.LayerNorm(cout, eps=eps)

    def forward(self, x):
        return layer_norm_2d(self.norm, self.conv(x))


class SqueezeExcite(tnn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1 = tnn.Conv2d(dims, hidden, 1)
        self.fc2 = tnn.Conv2d(hidden, dims, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class ResBlock(tnn.Module):
    def __init__(self, cin: int, cout: int, config: ConnectorConfig):
        super().__init__()
        eps = config.layer_norm_eps
        groups = cout // config.group_size if config.group_size else 1
        self.conv1 = ConvNorm(cin, cout, 1, eps)
        self.conv2 = ConvNorm(cout, cout, 3, eps, groups)
        self.se = SqueezeExcite(cout, int(round(cin * config.se_ratio)))
        self.conv3 = ConvNorm(cout, cout, 1, eps)
        self.shortcut = ConvNorm(cin, cout, 1, eps) if cin != cout else None

    def forward(self, x):
        h = F.silu(self.conv1(x))
        h = self.conv3(self.se(F.silu(self.conv2(h))))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return F.silu(h + skip)


class Readout(tnn.Module):
    def __init__(self, cin: int, cout: int, depth: int, act: str, bias: bool = True,
                 norm: bool = False):
        super().__init__()
        self.act = activation(act)
        self.layers = tnn.ModuleList(
            [tnn.Linear(cin if i == 0 else cout, cout, bias=bias) for i in range(depth)])
        self.norm = tnn.LayerNorm(cout, eps=1e-5) if norm else None

    def forward(self, x):
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(self.act(x))
        return self.norm(x) if self.norm is not None else x


def to_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """(N, P, C) -> (N, C, side, side)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class CAbstractor(tnn.Module):
    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int, grid: int):
        super().__init__()
        self.grid = grid
        C = config.hidden_size if config.depth else vision_dims
        self.prenorm = tnn.LayerNorm(vision_dims, eps=1e-6) if config.prenorm else None
        self.pos_emb = tnn.Parameter(torch.zeros(1, grid * grid, vision_dims)) \
            if config.pos_emb else None
        self.stage1 = tnn.ModuleList(
            [ResBlock(vision_dims if i == 0 else C, C, config) for i in range(config.depth)])
        self.pool = AdaptivePool(grid, math.isqrt(config.num_image_tokens))
        self.stage2 = tnn.ModuleList([ResBlock(C, C, config) for _ in range(config.depth)])
        self.readout = Readout(C, text_dims, config.mlp_depth, config.hidden_act, config.bias,
                               config.output_norm)

    def forward(self, x):
        if self.prenorm is not None:
            x = self.prenorm(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        x = to_grid(x, self.grid)
        for block in self.stage1:
            x = block(x)
        x = self.pool(x)
        for block in self.stage2:
            x = block(x)
        return self.readout(x.flatten(2).transpose(1, 2))  # (N, s*s, D)


class AvgPool(tnn.Module):
    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int, grid: int):
        super().__init__()
        self.grid = grid
        self.pool = AdaptivePool(grid, math.isqrt(config.num_image_tokens))
        self.readout = Readout(vision_dims, text_dims, config.mlp_depth, config.hidden_act,
                               config.bias, config.output_norm)

    def forward(self, x):
        x = self.pool(to_grid(x, self.grid))
        return self.readout(x.flatten(2).transpose(1, 2))


class AttentionPool(tnn.Module):
    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int, grid: int):
        super().__init__()
        self.queries = tnn.Parameter(torch.zeros(config.num_image_tokens, vision_dims))
        self.norm_q = tnn.LayerNorm(vision_dims)
        self.norm_kv = tnn.LayerNorm(vision_dims)
        self.attn = Attention(vision_dims, config.num_heads)
        self.readout = Readout(vision_dims, text_dims, config.mlp_depth, config.hidden_act,
                               config.bias, config.output_norm)

    def forward(self, x):
        q = self.norm_q(self.queries).expand(x.shape[0], -1, -1)
        return self.readout(q + self.attn(q, self.norm_kv(x)))


class MLPProjector(tnn.Module):
    def __init__(self, config: ConnectorConfig, vision_dims: int, text_dims: int, grid: int):
        super().__init__()
        self.readout = Readout(vision_dims, text_dims, config.mlp_depth, config.hidden_act,
                               config.bias, config.output_norm)

    def forward(self, x):
        return self.readout(x)


CONNECTORS = {
    "c-abstractor": CAbstractor,
    "avg-pool": AvgPool,
    "attention-pool": AttentionPool,
    "mlp": MLPProjector,
}


class ImageEncoder(tnn.Module):
    """RGB image in [0, 1], (N, 3, S, S) -> image tokens (N, T, D_text)."""

    def __init__(self, config: ModelConfig, vision_tower: tnn.Module, image_mean, image_std):
        super().__init__()
        vc, cc = config.vision_config, config.connector_config
        if cc.type not in CONNECTORS:
            raise MM1Error(f"connector {cc.type!r} has no PyTorch twin for export; supported: "
                           f"{', '.join(TWIN_CONNECTORS)}")
        mean = torch.tensor(image_mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).reshape(1, 3, 1, 1)
        # (x - mean) / std as one multiply-add, folded into constants by the converter
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.vision_tower = vision_tower
        grid = vc.image_size // vc.patch_size
        self.connector = CONNECTORS[cc.type](cc, vc.hidden_size, config.text_config.hidden_size,
                                             grid)

    def forward(self, image):
        return self.connector(self.vision_tower(image * self.scale + self.shift))


# ---- weights ----
def float_weights(module: nn.Module) -> dict[str, mx.array]:
    """Flat float parameters of an MLX module, quantized layers dequantized to their weight."""
    out = dict(tree_flatten(module.parameters()))
    for name, m in module.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            p = f"{name}." if name else ""
            out[f"{p}weight"] = mx.dequantize(
                m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
                mode=getattr(m, "mode", "affine"))
            out.pop(f"{p}scales", None)
            out.pop(f"{p}biases", None)
    return out


def export_weights(model) -> dict[str, np.ndarray]:
    """MLX model -> float32 numpy weights of ``vision_tower.*`` and ``connector.*``.

    The position embeddings are resized to ``image_size`` here with MLX's own interpolation, so
    the twin holds the exact table the MLX encoder uses at that resolution.
    """
    vc = model.config.vision_config
    weights = {}
    for prefix in ("vision_tower", "connector"):
        for k, v in float_weights(getattr(model, prefix)).items():
            weights[f"{prefix}.{k}"] = v
    key = "vision_tower.embeddings.position_embedding.weight"
    if key not in weights:  # no position table (FastViT)
        return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}
    pos = weights[key]
    cls, patch = (pos[:1], pos[1:]) if vc.class_token else (None, pos)
    src, dst = math.isqrt(patch.shape[0]), vc.image_size // vc.patch_size
    if src != dst:
        patch = interpolate_grid(patch, src, dst, vc.pos_embed_antialias)
        weights[key] = patch if cls is None else mx.concatenate([cls, patch], axis=0)
    return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}


def load_twin_weights(twin: tnn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load MLX-layout weights by name; MLX convs (O, kh, kw, I) become torch's (O, I, kh, kw)."""
    own = twin.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise MM1Error(f"weights do not fit the export graph: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}")
    state = {}
    for k, target in own.items():
        w = weights[k].transpose(0, 3, 1, 2) if target.ndim == 4 else weights[k]
        if tuple(w.shape) != tuple(target.shape):
            raise MM1Error(f"{k}: shape {tuple(w.shape)} does not fit {tuple(target.shape)}")
        state[k] = torch.from_numpy(np.ascontiguousarray(w))
    twin.load_state_dict(state, strict=True)


def build_twin(model, image_mean, image_std) -> ImageEncoder:
    """The PyTorch twin (float32, eval mode) of ``model.vision_tower`` + ``model.connector``."""
    weights = export_weights(model)
    vc = model.config.vision_config
    tower = FastViT(vc) if isinstance(vc, FastViTConfig) else \
        VisionModel(vc, len(model.vision_tower.encoder.layers))
    twin = ImageEncoder(model.config, tower, image_mean, image_std)
    load_twin_weights(twin, weights)
    return twin.eval()


def mlx_features(model, images01: np.ndarray, image_mean, image_std) -> np.ndarray:
    """Reference: MLX encoder + connector on (N, S, S, 3) RGB images in [0, 1]."""
    px = (images01 - np.asarray(image_mean, np.float32)) / np.asarray(image_std, np.float32)
    feats = model.encode_images(mx.array(px.astype(np.float32))).astype(mx.float32)
    return np.array(feats)


def twin_features(twin: ImageEncoder, images01: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images01.transpose(0, 3, 1, 2), np.float32))
        return twin(x).numpy()
