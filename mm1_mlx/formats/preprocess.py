"""Carry a source's tokenizer, chat template and image preprocessing into our Processor."""

from __future__ import annotations

from pathlib import Path

from ..errors import MM1Error
from ..models.config import VisionConfig
from ..processor import IMAGE_TOKEN, ImageSettings, Processor
from .sources import read_json

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _side(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return None


def hf_image_settings(cfg: dict, vision: VisionConfig) -> ImageSettings:
    """preprocessor_config.json of a CLIP / SigLIP / LLaVA image processor -> ImageSettings.

    LLaVA-1.5's processor pads to a square (``do_pad``); CLIP's resizes the short side and
    centre-crops; SigLIP's resizes to the target size (squash).
    """
    crop = cfg.get("do_center_crop", False)
    size = _side(cfg.get("crop_size")) if crop else _side(cfg.get("size"))
    if cfg.get("do_pad"):
        mode = "pad"
    elif crop or (isinstance(cfg.get("size"), dict) and "shortest_edge" in cfg["size"]):
        mode = "crop"
    else:
        mode = "squash"
    return ImageSettings(image_size=vision.image_size if size is None else size,
                         image_mean=list(cfg.get("image_mean", CLIP_MEAN)),
                         image_std=list(cfg.get("image_std", CLIP_STD)), resize_mode=mode)


def openclip_image_settings(cfg: dict, vision: VisionConfig) -> ImageSettings:
    pre = cfg.get("preprocess_cfg", {})
    mode = {"shortest": "crop", "squash": "squash", "longest": "pad"}.get(
        pre.get("resize_mode", "shortest"), "crop")
    return ImageSettings(image_size=vision.image_size, image_mean=list(pre.get("mean", CLIP_MEAN)),
                         image_std=list(pre.get("std", CLIP_STD)), resize_mode=mode)


def image_settings(path: Path, vision: VisionConfig) -> ImageSettings:
    """The source's own preprocessing if it has a config, else the tower's defaults."""
    cfg = read_json(path, "preprocessor_config.json") if path.is_dir() else None
    if cfg is None and path.is_dir():  # transformers 5 nests it in processor_config.json
        cfg = (read_json(path, "processor_config.json") or {}).get("image_processor")
    if cfg is not None:
        return hf_image_settings(cfg, vision)
    cfg = read_json(path, "open_clip_config.json") if path.is_dir() else None
    if cfg is not None:
        return openclip_image_settings(cfg, vision)
    siglip = not vision.class_token
    mean, std = ([0.5] * 3, [0.5] * 3) if siglip else (CLIP_MEAN, CLIP_STD)
    return ImageSettings(image_size=vision.image_size, image_mean=mean, image_std=std,
                         resize_mode="squash" if siglip else "crop")


def chat_template(path: Path) -> str | None:
    """A processor-level chat template (chat_template.jinja / chat_template.json)."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        cfg = read_json(path, name)
        if cfg and isinstance(cfg.get("chat_template"), str):
            return cfg["chat_template"]
    return None


def load_tokenizer(path: Path):
    """The source's tokenizer, its (or its processor's) chat template, a ``<image>`` token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MM1Error(f"cannot load a tokenizer from {path}: {msg}") from None
    if not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template(path)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tok


def build_processor(tokenizer, settings: ImageSettings, num_image_tokens: int) -> Processor:
    return Processor(tokenizer, settings, num_image_tokens, IMAGE_TOKEN)


def image_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

