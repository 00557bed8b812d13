"""Dataclass configs for the encoder, connector and decoder, stored in a checkpoint's config.json.

Values read from a file are checked by field type and range (``RULES``) before anything is built,
with one line naming the file, the field, the value and what is allowed (``validate.ConfigError``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar

from ..io.validate import check_value, need

ACTIVATIONS = {"quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_tanh", "silu", "relu"}
CONNECTOR_TYPES = {"c-abstractor", "avg-pool", "attention-pool", "mlp"}
GRID_CONNECTORS = {"c-abstractor", "avg-pool"}  # pool to a square grid of image tokens
ROPE_TYPES = {"default", "linear", "dynamic", "llama3", "yarn"}
WIDTH, LAYERS, HEADS = (1, 1 << 16), (1, 1024), (1, 1024)  # generous bounds, before allocating


def _described(kinds: list, params) -> type:
    """Of the config classes a field may hold, the one whose ``model_type`` the dict names (a
    FastViT encoder's), else the first (a ViT's)."""
    named = params.get("model_type") if isinstance(params, dict) else None
    return next((k for k in kinds if named and getattr(k, "model_type", None) == named), kinds[0])


class _FromDict:
    RULES: ClassVar[dict] = {}  # field -> (lo, hi) or the allowed values

    @classmethod
    def from_dict(cls, params: dict, where: str = "config", prefix: str = ""):
        """Build from a dict, ignoring keys this config does not know; each known value is
        checked against the field's type first (a ConfigError names ``where`` and the field)."""
        need(isinstance(params, dict), where, prefix.rstrip("."), params, "a JSON object")
        types = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in params.items():
            if k not in types or k == "RULES":
                continue
            sub = typing.get_args(types[k]) or (types[k],)
            nested = [t for t in sub if isinstance(t, type) and issubclass(t, _FromDict)]
            if nested:
                v = _described(nested, v).from_dict(v, where, f"{prefix}{k}.")
            else:
                check_value(v, types[k], None, where, prefix + k)
            kwargs[k] = v
        return cls(**kwargs)

    def check(self, where: str = "config", prefix: str = "") -> None:
        """Every field's type and range (``RULES``)."""
        types = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_value(getattr(self, f.name), types[f.name], self.RULES.get(f.name), where,
                        prefix + f.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class VisionConfig(_FromDict):
    """A CLIP- or SigLIP-style ViT. Field names follow transformers' CLIPVisionConfig."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # the resolution images are encoded at
    pretrain_image_size: int | None = None  # grid the position embeddings hold (interpolated if differs)
    pos_embed_antialias: bool = False  # resize that grid as open_clip does (antialiased bicubic)
    patch_size: int = 16
    hidden_act: str = "quick_gelu"  # quick_gelu (CLIP/OpenAI), gelu (DFN/OpenCLIP), gelu_pytorch_tanh
    layer_norm_eps: float = 1e-5
    class_token: bool = True  # CLIP has one, SigLIP does not
    pre_layernorm: bool = True  # CLIP's pre_layrnorm; SigLIP has none
    patch_bias: bool = False  # CLIP's conv has no bias, SigLIP's has
    post_layernorm: bool = False  # apply the final LayerNorm to the features (SigLIP, last layer)
    feature_layer: int = -2  # hidden state fed to the connector (-2 = penultimate, as LLaVA/MM1)
    keep_class_token: bool = False  # pass the class token on to the connector
    drop_first_patch: bool = False  # LLaVA's "default" strategy on a tower without a class token
    # AIMv2's variant (transformers' Aimv2VisionConfig names): RMSNorm, SwiGLU, no biases
    rms_norm: bool = False  # RMSNorm (eps layer_norm_eps) wherever CLIP has a LayerNorm
    patch_norm: bool = False  # a norm on the patch embeddings (AIMv2's embeddings.rms_norm)
    gated_mlp: bool = False  # gate_proj/up_proj/down_proj: down(act(gate(x)) * up(x))
    qkv_bias: bool = True  # biases of q/k/v and the attention's output projection
    mlp_bias: bool = True

    @property
    def drops_first(self) -> bool:
        """Whether the first position of the hidden state is dropped before the connector."""
        return (self.class_token and not self.keep_class_token) or self.drop_first_patch

    RULES: ClassVar[dict] = {
        "hidden_size": WIDTH, "intermediate_size": (1, 1 << 18), "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_channels": (1, 16), "image_size": (1, 8192),
        "pretrain_image_size": (1, 8192), "patch_size": (1, 8192), "hidden_act": ACTIVATIONS,
        "layer_norm_eps": (0, 1), "feature_layer": (-1024, 1024)}

    def __post_init__(self):
        if self.pretrain_image_size is None:
            self.pretrain_image_size = self.image_size

    def check(self, where: str = "config", prefix: str = "vision_config.") -> None:
        super().check(where, prefix)
        need(self.hidden_size % self.num_attention_heads == 0, where,
             prefix + "num_attention_heads", self.num_attention_heads,
             f"a divisor of hidden_size {self.hidden_size}")
        need(self.patch_size <= self.image_size, where, prefix + "patch_size", self.patch_size,
             f"at most image_size {self.image_size}")
        n = self.num_hidden_layers
        need(-n <= self.feature_layer <= n and self.feature_layer != 0, where,
             prefix + "feature_layer", self.feature_layer,
             f"a layer index in 1..{n} or -{n}..-1 (this tower has {n} layers)")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _tuple(*values):
    return field(default_factory=lambda: list(values))


@dataclass
class FastViTConfig(_FromDict):
    """FastViTHD, FastVLM's hybrid conv/attention encoder (timm's ``fastvit_mci3``, Apple's
    ``fastvithd``) in inference form. Field names follow timm's ``FastVit`` arguments."""

    model_type: str = "fastvit"  # tells ModelConfig which encoder config this is
    layers: list = _tuple(2, 12, 24, 4, 2)
    embed_dims: list = _tuple(96, 192, 384, 768, 1536)
    mlp_ratios: list = _tuple(4.0, 4.0, 4.0, 4.0, 4.0)
    downsamples: list = _tuple(False, True, True, True, True)
    token_mixers: list = _tuple("repmixer", "repmixer", "repmixer", "attention", "attention")
    pos_embs: list = _tuple(False, False, False, True, True)  # a RepCPE before the stage's blocks
    pos_emb_kernel: int = 7
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    down_stride: int = 2
    lkc_use_act: bool = True  # an activation after the downsampling's large-kernel conv
    cls_ratio: float = 2.0  # final_conv widens the last stage by this
    head_dim: int = 32
    layer_norm_eps: float = 1e-5  # the attention stages' LayerNorm2d
    hidden_act: str = "gelu"
    image_size: int = 1024
    # what the rest of the model reads from any encoder config
    feature_layer: int = -1
    keep_class_token: bool = False

    def downsampled(self, i: int) -> bool:
        return bool(self.downsamples[i]) or (i > 0 and self.embed_dims[i] != self.embed_dims[i - 1])

    class_token = False  # no class token, nothing dropped (read as a ViT config's are)
    drops_first = False

    @property
    def hidden_size(self) -> int:
        return int(self.embed_dims[-1] * self.cls_ratio)

    @property
    def patch_size(self) -> int:
        """Pixels per output position: the stem's 4, times 2 per downsampling stage."""
        return 4 * self.down_stride ** sum(self.downsampled(i) for i in range(len(self.layers)))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ConnectorConfig(_FromDict):
    """The vision-language connector that maps patch features to image tokens."""

    type: str = "c-abstractor"  # c-abstractor | avg-pool | attention-pool | mlp
    num_image_tokens: int = 144  # for mlp: one token per patch (set from the encoder)
    hidden_size: int = 1024  # internal width of the c-abstractor / attention pool
    depth: int = 3  # residual blocks before and after pooling (c-abstractor)
    mlp_depth: int = 2  # readout layers
    num_heads: int = 8  # attention-pool
    hidden_act: str = "silu"  # readout activation (gelu for LLaVA's mlp projector)
    bias: bool = True
    output_norm: bool = False  # LayerNorm on the image tokens (keeps them at the text's scale)
    # c-abstractor blocks, named as in timm's RegNet Bottleneck and Honeybee's projector config;
    # the defaults are the shipped models' (Honeybee: group_size 1, layer_norm_eps 1e-5, pos_emb)
    group_size: int = 0  # channels per group of the 3x3 conv (1 = depthwise); 0 = one dense conv
    se_ratio: float = 0.25  # squeeze-excite width, a fraction of the block's input channels
    layer_norm_eps: float = 1e-6  # the blocks' LayerNorm2d
    pos_emb: bool = False  # a learned position embedding added to the patch features
    prenorm: bool = False  # LayerNorm on the patch features first

    RULES: ClassVar[dict] = {
        "type": CONNECTOR_TYPES, "num_image_tokens": (1, 1 << 16), "hidden_size": WIDTH,
        "depth": (0, 64), "mlp_depth": (1, 64), "num_heads": HEADS, "hidden_act": ACTIVATIONS}

    def check(self, where: str = "config", prefix: str = "connector_config.") -> None:
        super().check(where, prefix)
        side = int(self.num_image_tokens ** 0.5 + 0.5)
        need(self.type not in GRID_CONNECTORS or side * side == self.num_image_tokens, where,
             prefix + "num_image_tokens", self.num_image_tokens,
             f"a square number (the {self.type} pools to a square grid)")


@dataclass
class TextConfig(_FromDict):
    """A Llama-style decoder, optionally with MoE FFNs. Names follow transformers' Llama/Mixtral."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_traditional: bool = False
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    qk_norm: bool = False  # RMSNorm on per-head q and k (Qwen3, OLMoE)
    qk_norm_full: bool = False  # the q/k RMSNorm spans all heads jointly (OLMoE), not each head
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # mixture of experts: every `moe_every`-th layer (counting from 1) is sparse when num_experts > 0
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_every: int = 1
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert
    norm_topk_prob: bool = True  # renormalise the top-k routing weights (Mixtral) or not (Qwen2-MoE)
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001

    RULES: ClassVar[dict] = {
        "vocab_size": (1, 1 << 24), "hidden_size": WIDTH, "intermediate_size": (1, 1 << 18),
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "head_dim": (2, 4096), "rms_norm_eps": (0, 1), "rope_theta": (1e-6, None),
        "max_position_embeddings": (1, 1 << 24), "num_experts": (0, 4096),
        "num_experts_per_tok": (1, 4096), "moe_every": (1, 1024),
        "moe_intermediate_size": (1, 1 << 18), "shared_expert_intermediate_size": (0, 1 << 18),
        "router_aux_loss_coef": (0, None), "router_z_loss_coef": (0, None)}

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and \
                self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size

    def check(self, where: str = "config", prefix: str = "text_config.") -> None:
        super().check(where, prefix)
        need(self.num_attention_heads % self.num_key_value_heads == 0, where,
             prefix + "num_key_value_heads", self.num_key_value_heads,
             f"a divisor of num_attention_heads {self.num_attention_heads}")
        need(self.head_dim % 2 == 0, where, prefix + "head_dim", self.head_dim, "even (RoPE)")
        need(not self.num_experts or self.num_experts_per_tok <= self.num_experts, where,
             prefix + "num_experts_per_tok", self.num_experts_per_tok,
             f"at most num_experts {self.num_experts}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            need(kind in ROPE_TYPES, where, prefix + "rope_scaling.rope_type", kind,
                 f"one of {', '.join(sorted(ROPE_TYPES))}")
            factor = rs.get("factor", 1.0)
            need(kind == "default" or (isinstance(factor, (int, float)) and not
                 isinstance(factor, bool) and 0 < factor < 1e6), where,
                 prefix + "rope_scaling.factor", factor, "a positive number")

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0


@dataclass
class ModelConfig(_FromDict):
    """The whole model; written to and read from config.json."""

    vision_config: VisionConfig | FastViTConfig = field(default_factory=VisionConfig)
    connector_config: ConnectorConfig = field(default_factory=ConnectorConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 32000
    model_type: str = "mm1"
    name: str = "mm1"
    quantization: dict | None = None  # per-module quantization, see quantize.py

    RULES: ClassVar[dict] = {"image_token_id": (0, (1 << 24) - 1)}

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            kind = FastViTConfig if self.vision_config.get("model_type") == "fastvit" \
                else VisionConfig
            self.vision_config = kind.from_dict(self.vision_config, prefix="vision_config.")
        if isinstance(self.connector_config, dict):
            self.connector_config = ConnectorConfig.from_dict(self.connector_config,
                                                              prefix="connector_config.")
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig.from_dict(self.text_config, prefix="text_config.")
        vc = self.vision_config
        if self.connector_config.type == "mlp" and isinstance(vc.patch_size, int) and \
                vc.patch_size > 0:  # one token per patch
            self.connector_config.num_image_tokens = vc.num_patches + int(vc.class_token) - \
                int(vc.drops_first)

    @classmethod
    def from_dict(cls, params: dict, where: str = "config", prefix: str = "") -> ModelConfig:
        """Build and check (types, ranges, consistency): a ConfigError names file and field."""
        config = super().from_dict(params, where, prefix)
        config.check(where)
        return config

    @property
    def num_image_tokens(self) -> int:
        return self.connector_config.num_image_tokens

    def check(self, where: str = "config", prefix: str = "") -> None:
        for f in ("vision_config", "connector_config", "text_config"):
            part = getattr(self, f)
            need(isinstance(part, _FromDict), where, f, part, "an object")
            part.check(where, f + ".")
        check_value(self.image_token_id, int, self.RULES["image_token_id"], where,
                    "image_token_id")
        need(self.image_token_id < self.text_config.vocab_size, where, "image_token_id",
             self.image_token_id, f"below text_config.vocab_size {self.text_config.vocab_size}")
        check_value(self.quantization, dict | None, None, where, "quantization")
        if self.quantization is not None:
            check_quantization(self.quantization, where)


QUANT_MODES = {"affine": ({2, 3, 4, 5, 6, 8}, {32, 64, 128}), "mxfp4": ({4}, {32})}


def check_quantization(q: dict, where: str) -> None:
    """The recorded per-module quantization (see quantize.py): each entry's bits, group size,
    mode."""
    modules = q.get("modules")
    need(isinstance(modules, dict), where, "quantization.modules", modules,
         "an object of module path -> {bits, group_size, mode}")
    for path, spec in modules.items():
        key = f"quantization.modules.{path}"
        need(isinstance(spec, dict), where, key, spec, "an object {bits, group_size, mode}")
        mode = spec.get("mode", "affine")
        need(mode in QUANT_MODES, where, key + ".mode", mode, "affine or mxfp4")
        bits, groups = QUANT_MODES[mode]
        need(spec.get("bits") in bits and not isinstance(spec.get("bits"), bool), where,
             key + ".bits", spec.get("bits"), f"one of {sorted(bits)} ({mode})")
        need(spec.get("group_size") in groups and not isinstance(spec.get("group_size"), bool),
             where, key + ".group_size", spec.get("group_size"),
             f"one of {sorted(groups)} ({mode})")
