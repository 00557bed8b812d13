"""Honeybee (kakaobrain/honeybee) C-Abstractor checkpoints -> our config and weight layout.

Their ``from_pretrained`` directory holds ``vision_model.vision_model.*`` (a CLIP ViT),
``abstractor.*`` (``honeybee/projectors/projectors.py``: ``pos_emb``, ``net`` = timm RegStage,
AdaptiveAvgPool2d, RegStage; ``readout`` = Linear, SiLU, Linear) and ``language_model.*`` (Llama).
timm's RegStage is built there with ``stride=1, dilation=1, act_layer=SiLU,
norm_layer=LayerNorm2d`` and Bottleneck's defaults: depthwise 3x3 (``group_size=1``), SE over a
quarter of the block's input width, and ConvNormAct's LayerNormAct2d (eps 1e-5).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from ..errors import MM1Error
from ..models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from ..processor import ImageSettings
from . import configs, preprocess
from .sources import read_weights

SYSTEM = ("The following is a conversation between a curious human and AI. The AI gives helpful, "
          "detailed, and polite answers to the human's questions.")
# serve/conversation.py's prompt: "Human: <image>\nHuman: {prompt}\nAI: "
CHAT_TEMPLATE = (
    SYSTEM + "\n{% for m in messages %}{% if m['role'] == 'user' %}Human: "
    "{{ m['content'] | replace('\\n', '\\nHuman: ') }}\n{% elif m['role'] == 'assistant' %}"
    "AI: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}AI: {% endif %}"
)

STAGE = re.compile(r"abstractor\.net\.([02])\.b(\d+)\.(.*)")
READOUT = re.compile(r"abstractor\.readout\.(\d+)\.(.*)")
BLOCK_NAMES = [("downsample.conv.", "shortcut.conv."), ("downsample.bn.", "shortcut.norm."),
               (".bn.", ".norm.")]


def is_honeybee(cfg: dict) -> bool:
    return "HoneybeeForConditionalGeneration" in (cfg.get("architectures") or []) or \
        {"projector_config", "lm_config", "vision_config"} <= set(cfg)


def vision_dict(cfg: dict) -> dict:
    """Their vision_config as a transformers CLIPVisionConfig dict (for the CLIP config reader)."""
    return dict(cfg["vision_config"], model_type="clip_vision_model")


def connector_config(cfg: dict) -> ConnectorConfig:
    p = cfg["projector_config"]
    if p.get("projector_type", "c-abs") != "c-abs":
        raise MM1Error(f"Honeybee projector {p.get('projector_type')!r} is not supported; "
                       "only the C-Abstractor ('c-abs')")
    if p.get("num_eos_tokens", 0):
        raise MM1Error("Honeybee's num_eos_tokens > 0 is not supported")
    return ConnectorConfig(
        type="c-abstractor", num_image_tokens=p["num_query_tokens"],
        hidden_size=p.get("hidden_size", 1024), depth=p.get("depth", 3),
        mlp_depth=p.get("mlp_depth", 2), hidden_act="silu", bias=True,
        group_size=1, se_ratio=0.25, layer_norm_eps=1e-5,
        pos_emb=bool(p.get("pos_emb", True)), prenorm=bool(p.get("prenorm", False)))


def honeybee_config(cfg: dict, vision: VisionConfig, text: TextConfig,
                    image_token_id: int) -> ModelConfig:
    """Their config.json + the CLIP and Llama configs read from it -> our ModelConfig."""
    layer = cfg["projector_config"].get("feature_layer_index", -1)
    if not isinstance(layer, int):
        raise MM1Error(f"Honeybee feature_layer_index {layer} (several layers) is not supported")
    vision.feature_layer = layer  # their hidden_states[layer], class token dropped
    vision.keep_class_token = False
    return ModelConfig(vision_config=vision, connector_config=connector_config(cfg),
                       text_config=text, image_token_id=image_token_id,
                       name=cfg.get("_name_or_path") or "honeybee")


def _torch_conv(v: mx.array) -> mx.array:
    """torch's (O, I, k, k) -> MLX's (O, k, k, I); an MLX-layout weight is left as it is."""
    if v.ndim == 4 and v.shape[2] == v.shape[3] and v.shape[1] != v.shape[2]:
        return v.transpose(0, 2, 3, 1)
    return v


def _abstractor_key(key: str) -> str:
    m = STAGE.fullmatch(key)
    if m:
        rest = "." + m[3]
        for old, new in BLOCK_NAMES:
            rest = rest.replace(old, new)
        return f"connector.stage{1 if m[1] == '0' else 2}.{int(m[2]) - 1}{rest}"
    m = READOUT.fullmatch(key)
    if m:  # Sequential(Linear, SiLU, Linear, ...): the Linear layers sit at even indices
        return f"connector.readout.layers.{int(m[1]) // 2}.{m[2]}"
    return "connector." + key[len("abstractor."):]


def honeybee_weights(weights: dict, config: ModelConfig) -> dict:
    """Their tensors -> our top-level layout (``vision_tower.``, ``connector.``, ``language_model.``).

    Idempotent; keys already ours pass through. The vision and Llama keys are left for the
    generic converter. An old checkpoint's pos_emb with a class-token row loses it, as their
    ``_load_from_state_dict`` does.
    """
    out = {}
    for key, v in weights.items():
        if key.startswith("vision_model."):  # CustomCLIP(CLIPVisionModel): vision_model.vision_model.
            key = "vision_tower." + key[len("vision_model."):]
        elif key.startswith("abstractor."):
            key, v = _abstractor_key(key), _torch_conv(v)
        elif key.startswith("connector."):
            v = _torch_conv(v)
        if key == "connector.pos_emb" and v.shape[1] == config.vision_config.num_patches + 1:
            v = v[:, 1:]
        out[key] = v
    return out


def source_dtype(cfg: dict) -> str | None:
    for c in (cfg, cfg.get("text_config") or {}):
        d = c.get("dtype") or c.get("torch_dtype")
        if d in ("float32", "float16", "bfloat16"):
            return d
    return None


def honeybee_source(path: Path, cfg: dict) -> dict:
    """A Honeybee C-Abstractor directory -> the fields of an assemble.Source."""
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model",
                                             "tokenizer_config.json")):
        raise MM1Error(f"{path} has no tokenizer: copy Llama-2's tokenizer files (tokenizer.model, "
                       "tokenizer_config.json), which Honeybee uses, into it")
    tok = preprocess.load_tokenizer(path)
    if not getattr(tok, "chat_template", None) or "Human" not in tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    vision = configs.hf_vision_config(vision_dict(cfg))
    text = configs.text_config(cfg["text_config"])
    config = honeybee_config(cfg, vision, text, preprocess.image_token_id(tok))
    vc = cfg["vision_config"]
    # their DefaultProcessor: a bicubic resize to the square, CLIP's mean and std
    settings = ImageSettings(image_size=vision.image_size, resize_mode="squash",
                             **{k: list(vc[k]) for k in ("image_mean", "image_std") if k in vc})
    weights = honeybee_weights(read_weights(path), config)
    return dict(weights=weights, model=config, tokenizer=tok, image_settings=settings,
                dtype=source_dtype(cfg))
