"""Sources of whole models from other projects' layouts (Honeybee, FastVLM): files -> Source fields.

The pure config and weight mappings live in ``mm1_mlx.formats``; this module reads the files.
"""

from __future__ import annotations

from pathlib import Path

from mm1_mlx.errors import MM1Error
from mm1_mlx.formats import fastvlm, honeybee
from mm1_mlx.processor import ImageSettings

from . import configs, preprocess
from .sources import read_json, read_weights


def dtype(cfg: dict) -> str | None:
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
        tok.chat_template = honeybee.CHAT_TEMPLATE
    vision = configs.hf_vision_config(honeybee.vision_dict(cfg))
    text = configs.text_config(cfg["text_config"])
    config = honeybee.honeybee_config(cfg, vision, text, preprocess.image_token_id(tok))
    vc = cfg["vision_config"]
    # their DefaultProcessor: a bicubic resize to the square, CLIP's mean and std
    settings = ImageSettings(image_size=vision.image_size, resize_mode="squash",
                             **{k: list(vc[k]) for k in ("image_mean", "image_std") if k in vc})
    weights = honeybee.honeybee_weights(read_weights(path), config)
    return dict(weights=weights, model=config, tokenizer=tok, image_settings=settings,
                dtype=dtype(cfg))


def _side(size) -> int | None:
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return size


def fastvlm_source(path: Path, cfg: dict) -> dict:
    """A FastVLM directory, transformers' ``fast_vlm`` or Apple's ``llava_qwen2`` -> Source fields."""
    apple = cfg["model_type"] == "llava_qwen2"
    tok = preprocess.load_tokenizer(path)
    text = configs.text_config(dict(cfg, model_type="qwen2") if apple else cfg["text_config"])
    pre = read_json(path, "preprocessor_config.json") or \
        (read_json(path, "processor_config.json") or {}).get("image_processor")
    if pre is not None:
        size = _side(pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size"))
    else:
        size = fastvlm.apple_image_size(cfg) if apple else 1024
    weights = fastvlm.fastvlm_weights(read_weights(path))
    config = fastvlm.fastvlm_config(cfg, weights, text, preprocess.image_token_id(tok), size)
    if pre is not None:
        settings = preprocess.hf_image_settings(pre, config.vision_config)
    else:  # ml-fastvlm's CLIPImageProcessor: mean 0, std 1; LLaVA pads to a square first
        settings = ImageSettings(image_size=size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                                 resize_mode="pad" if cfg.get("image_aspect_ratio") == "pad"
                                 else "crop")
    if apple and pre is not None and cfg.get("image_aspect_ratio") == "pad":
        settings.resize_mode = "pad"
    return dict(weights=weights, model=config, tokenizer=tok, image_settings=settings,
                dtype=dtype(cfg))
