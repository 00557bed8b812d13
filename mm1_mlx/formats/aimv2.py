"""AIMv2 (Apple; transformers' ``aimv2``) vision encoders -> our VisionConfig and weight layout.

An AIMv2 tower is a ViT without a class token whose norms are RMSNorms (one after the patch
embedding too), whose FFN is SwiGLU and whose linear layers have no biases by default; the final
``rms_norm`` is our ``post_layernorm``. Both ``aimv2_vision_model`` and the contrastive ``aimv2``
(its ``vision_config``, weights under ``vision_model.``) are read.
"""

from __future__ import annotations

import re

from ..errors import MM1Error
from ..models.config import VisionConfig

KINDS = {"aimv2", "aimv2_vision_model"}
RENAMES = [  # transformers' Aimv2VisionModel -> our (CLIP-named) ViT
    (r"embeddings\.patch_embed\.", "embeddings.patch_embedding."),
    (r"embeddings\.rms_norm\.", "embeddings.patch_norm."),
    (r"encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"encoder\.layers\.(\d+)\.ffn\.", r"encoder.layers.\1.mlp."),
    (r"encoder\.layers\.(\d+)\.rms_norm([12])\.", r"encoder.layers.\1.layer_norm\2."),
    (r"rms_norm\.", "post_layernorm."),
]


def is_aimv2(cfg: dict) -> bool:
    return cfg.get("model_type") in KINDS


def aimv2_vision_config(cfg: dict) -> VisionConfig:
    """``config.json`` of an AIMv2 (vision) model -> VisionConfig (feature layer set by the caller)."""
    if cfg.get("model_type") == "aimv2":
        cfg = cfg["vision_config"]
    if cfg.get("is_native"):
        raise MM1Error("AIMv2 'native' (sinusoidal positions, any resolution) is not supported; "
                       "use a fixed-resolution AIMv2 (e.g. apple/aimv2-large-patch14-224)")
    return VisionConfig(
        hidden_size=cfg.get("hidden_size", 1024),
        intermediate_size=cfg.get("intermediate_size", 2816),
        num_hidden_layers=cfg.get("num_hidden_layers", 24),
        num_attention_heads=cfg.get("num_attention_heads", 8),
        num_channels=cfg.get("num_channels", 3),
        image_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 14),
        hidden_act=cfg.get("hidden_act", "silu"),
        layer_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        class_token=False, pre_layernorm=False, patch_bias=True,
        rms_norm=True, patch_norm=True, gated_mlp=True,
        qkv_bias=bool(cfg.get("qkv_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def aimv2_weights(weights: dict) -> dict:
    """Their vision tensors -> CLIP-style names our converter maps (idempotent)."""
    out = {}
    for key, v in weights.items():
        prefix = "vision_model." if key.startswith("vision_model.") else ""
        sub = key[len(prefix):]
        for pattern, repl in RENAMES:
            if re.match(pattern, sub):
                sub = re.sub(pattern, repl, sub, count=1)
                break
        out[prefix + sub] = v
    return out
