"""Sources of whole models from other projects' layouts (Honeybee, FastVLM): files -> Source fields.

The pure config and weight mappings live in ``mm1_mlx.formats``; this module reads the files.
"""

from __future__ import annotations

from pathlib import Path

from mm1_mlx.errors import MM1Error
from mm1_mlx.formats import honeybee
from mm1_mlx.processor import ImageSettings

from . import configs, preprocess
from .sources import read_weights


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
                dtype=cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("torch_dtype"))
