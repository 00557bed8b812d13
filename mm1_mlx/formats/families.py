"""Which checkpoints ``load`` reads, by ``model_type``: ours as they are, the rest converted.

``FAMILIES`` is the one place that maps a foreign ``model_type`` to the function converting it
into our model and processor; a new family is a new module under ``mm1_mlx/formats`` plus a row.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import MM1Error
from . import honeybee
from .sources import read_json

NATIVE = "mm1"  # the model_type our own config.json carries


def is_mlx_layout(path: Path) -> bool:
    """Whether a directory was written by MLX (mlx-vlm / mlx-lm save ``format: mlx``)."""
    cfg = read_json(path, "config.json") or {}
    if "quantization" in cfg:
        return True
    files = sorted(path.glob("*.safetensors"))
    return bool(files) and safetensors_metadata(files[0]).get("format") == "mlx"


def safetensors_metadata(f: Path) -> dict:
    """The ``__metadata__`` of a safetensors header, read without loading any tensor."""
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(n, 100 << 20)))
        return header.get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        return {}


def convert_llava(path: Path, dtype: str | None, q_bits: int | None, q_group_size: int):
    if is_mlx_layout(path):  # mlx-community (mlx-vlm) layout, float or quantized
        from .mlx_vlm import convert_mlx_vlm

        return convert_mlx_vlm(path, dtype, q_bits, q_group_size)
    from .assemble import assemble

    return assemble(hf_path=str(path), dtype=dtype, q_bits=q_bits, q_group_size=q_group_size)


def convert_whole(path: Path, dtype: str | None, q_bits: int | None, q_group_size: int):
    """FastVLM (either layout) or Honeybee: ``assemble`` picks the layout from config.json."""
    from .assemble import assemble

    return assemble(hf_path=str(path), dtype=dtype, q_bits=q_bits, q_group_size=q_group_size)


# model_type in config.json -> convert(path, dtype, q_bits, q_group_size) -> (model, processor)
FAMILIES = {
    "llava": convert_llava,
    "fast_vlm": convert_whole,  # transformers' FastVLM
    "llava_qwen2": convert_whole,  # Apple's original FastVLM layout (ml-fastvlm)
    "honeybee": convert_whole,  # kakaobrain's C-Abstractor checkpoints (no model_type of their own)
}


def model_type(cfg: dict) -> str | None:
    # our config.json says model_type "mm1"; early ones are known by their connector_config
    if "connector_config" in cfg:
        return NATIVE
    return "honeybee" if honeybee.is_honeybee(cfg) else cfg.get("model_type")


def check_supported(cfg: dict, name: str) -> str:
    """The checkpoint's model_type, or one line naming it and the families we read."""
    if not isinstance(cfg, dict):
        raise MM1Error(f"bad config.json in {name}: not a JSON object")
    kind = model_type(cfg)
    if kind != NATIVE and kind not in FAMILIES:
        raise MM1Error(f"{name}: model_type {kind!r} is not supported; supported: mm1-mlx "
                       f"checkpoints and {', '.join(sorted(FAMILIES))} (Hugging Face "
                       f"transformers or mlx-community layout)")
    return kind


def convert_checkpoint(path: Path, dtype: str | None = None, q_bits: int | None = None,
                       q_group_size: int = 64):
    """The foreign checkpoint at ``path`` as our (model, processor)."""
    cfg = read_json(path, "config.json")
    if cfg is None:
        raise MM1Error(f"{path} has no config.json")
    kind = check_supported(cfg, str(path))
    if kind == NATIVE:
        raise MM1Error(f"{path} is already an mm1-mlx checkpoint")
    return FAMILIES[kind](path, dtype, q_bits, q_group_size)


def hub_patterns(files: list[str]) -> list[str]:
    """The files a LLaVA-style repository needs: config, tokenizer, processor, and one weight
    format (safetensors when there are any; PyTorch pickles are never fetched beside them)."""
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else \
        ["*.bin", "*.pt"]
    return ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", *weights]
