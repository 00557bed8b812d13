"""Hugging Face / OpenCLIP config dicts -> our VisionConfig, TextConfig and ModelConfig."""

from __future__ import annotations

from ..errors import MM1Error
from ..models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig

DENSE = {"llama", "mistral", "qwen2", "qwen3"}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}
CLIP = {"clip", "clip_vision_model"}
SIGLIP = {"siglip", "siglip_vision_model"}


ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


def with_defaults(cfg: dict) -> dict:
    """A sub-config as transformers saves it (only what differs from the defaults: llava-hf's
    text_config has no hidden_size) completed with transformers' defaults for its model_type;
    the defaults' RoPE settings never replace the checkpoint's own ``rope_theta``."""
    from transformers import AutoConfig

    try:
        defaults = AutoConfig.for_model(cfg.get("model_type")).to_dict()
    except (KeyError, ValueError, TypeError):
        return cfg
    if any(k in cfg for k in ROPE_KEYS):
        defaults = {k: v for k, v in defaults.items() if k not in ROPE_KEYS}
    return {**defaults, **cfg}


def rope(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return float(theta), (None if kind == "default" else scaling)


def text_config(cfg: dict) -> TextConfig:
    """A decoder config (llama, mistral, qwen2/3, mixtral, qwen2/3-moe, olmoe) -> TextConfig."""
    kind = cfg.get("model_type")
    if kind not in DENSE | MOE:
        raise MM1Error(f"unsupported decoder model_type {kind!r}; supported: "
                       f"{', '.join(sorted(DENSE | MOE))}")
    cfg = with_defaults(cfg)
    if cfg.get("mlp_only_layers"):
        raise MM1Error(f"mlp_only_layers={cfg['mlp_only_layers']} is not supported")
    theta, scaling = rope(cfg)
    heads = cfg["num_attention_heads"]
    moe = {}
    if kind == "mixtral":
        moe = dict(num_experts=cfg["num_local_experts"], norm_topk_prob=True)
    elif kind in MOE:
        moe = dict(num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                   norm_topk_prob=cfg.get("norm_topk_prob", False),
                   moe_every=cfg.get("decoder_sparse_step", 1) or 1,
                   moe_intermediate_size=cfg.get("moe_intermediate_size"),
                   shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0)
                   if kind == "qwen2_moe" else 0)
    return TextConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg.get("intermediate_size") or cfg.get("moe_intermediate_size"),
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        # Qwen2 always has q/k/v biases; the others say so in attention_bias
        attention_bias=kind in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
        qk_norm=kind in ("qwen3", "qwen3_moe", "olmoe"),
        qk_norm_full=kind == "olmoe",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
        **moe,
    )


def hf_vision_config(cfg: dict) -> VisionConfig:
    """CLIP(Vision) or SigLIP(Vision) config -> VisionConfig (feature layer set by the caller)."""
    kind = cfg.get("model_type")
    if kind in ("clip", "siglip"):
        cfg = dict(cfg["vision_config"], model_type=f"{kind}_vision_model")
        kind = cfg["model_type"]
    if kind not in CLIP | SIGLIP:
        raise MM1Error(f"unsupported vision model_type {kind!r}; supported: CLIP, SigLIP, OpenCLIP")
    cfg = with_defaults(cfg)
    siglip = kind in SIGLIP
    return VisionConfig(
        hidden_size=cfg.get("hidden_size", 768),
        intermediate_size=cfg.get("intermediate_size", 3072),
        num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=cfg.get("num_attention_heads", 12),
        num_channels=cfg.get("num_channels", 3),
        image_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 16 if siglip else 32),
        hidden_act=cfg.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
        class_token=not siglip,
        pre_layernorm=not siglip,
        patch_bias=siglip,
    )


def openclip_vision_config(cfg: dict) -> VisionConfig:
    """open_clip_config.json (``model_cfg.vision_cfg``) -> VisionConfig."""
    model_cfg = cfg.get("model_cfg", cfg)
    v = model_cfg["vision_cfg"]
    width, layers = v["width"], v["layers"]
    size = v.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    for unsupported in ("ls_init_value", "attentional_pool", "no_ln_pre", "timm_model_name"):
        if v.get(unsupported):
            raise MM1Error(f"OpenCLIP vision_cfg.{unsupported} is not supported")
    return VisionConfig(
        hidden_size=width,
        intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=layers,
        num_attention_heads=width // v.get("head_width", 64),
        image_size=size,
        patch_size=v["patch_size"],
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=1e-5,
        class_token=True,
        pre_layernorm=True,
        patch_bias=False,
        pos_embed_antialias=True,  # open_clip's resize_pos_embed
    )


def llava_config(cfg: dict, image_token_id: int) -> ModelConfig:
    """LlavaForConditionalGeneration config.json -> ModelConfig with LLaVA's ``mlp`` projector."""
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise MM1Error(f"vision_feature_layer {layer} (several layers) is not supported")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise MM1Error(f"unknown vision_feature_select_strategy {strategy!r}")
    vision = hf_vision_config(cfg["vision_config"])
    vision.feature_layer = layer
    # "default" drops position 0: the class token, or on SigLIP (none) the first patch
    vision.keep_class_token = strategy == "full" and vision.class_token
    vision.drop_first_patch = strategy == "default" and not vision.class_token
    text = text_config(cfg["text_config"])
    connector = ConnectorConfig(type="mlp", mlp_depth=2, hidden_act=cfg.get(
        "projector_hidden_act", "gelu"), bias=cfg.get("multimodal_projector_bias", True))
    return ModelConfig(vision_config=vision, connector_config=connector, text_config=text,
                       image_token_id=image_token_id, name=cfg.get("_name_or_path") or "llava")
