"""Merge LoRA adapters into their base model and save a plain checkpoint.

    python -m mm1_mlx.fuse --model M --adapter-path A --save-path O [--dequantize [--dtype D]] [--name N]

A quantized base is de-quantized, merged and re-quantized with each layer's own settings, so the
result is quantized exactly as the base was (``--dequantize`` writes a float checkpoint instead).
A connector trained with the adapter (``--train-connector``, lora's default) and ViT embeddings
trained with ``--train-vision-embeddings`` are part of the adapter and are saved as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx

from .cli import args as cli_args
from .errors import cli_errors
from .io.atomic import check_output
from .tuner.adapters import fuse_lora


def fuse(model_path: str | None, adapter_path: str, out: str, dequantize: bool = False,
         name: str | None = None, dtype: str = "float16", force: bool = False,
         progress: bool = False) -> Path:
    """Load base + adapter, merge, save to ``out``; ``dtype`` is the float type of a
    de-quantized result (float32 for MoE models run on Linux CPU, whose gather_mm needs it)."""
    from .checkpoint import load, resolve, save
    from .models.quantization import dequantize_model, is_quantized

    src = resolve(model_path)
    inputs = [src, adapter_path]
    check_output(out, "checkpoint", inputs, force, flag="--save-path")  # before the slow part
    model, processor = load(str(src), adapter_path=adapter_path, compute_dtype=None,
                            progress=progress)
    fuse_lora(model, dequantize=dequantize)
    # the size the adapter was trained at (its position embeddings still hold the base's grid)
    model.config.vision_config.image_size = processor.image.image_size
    if dequantize and is_quantized(model):
        dequantize_model(model, getattr(mx, dtype))
    # a new name: the base's adapters must not load (and apply twice) on the fused model
    model.config.name = name or f"{model.config.name}+{Path(adapter_path).name}"
    mx.eval(model.parameters())
    return save(model, processor, out, inputs=inputs, force=force, flag="--save-path")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.fuse", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="base checkpoint (default mm1-tiny)")
    p.add_argument("--adapter-path", "--adapter", dest="adapter_path", required=True,
                   help="adapter directory from mm1_mlx.lora")
    p.add_argument("--save-path", "--out", dest="out", required=True,
                   help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at --save-path")
    p.add_argument("--dequantize", action="store_true", help="write a float checkpoint")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="float dtype of a de-quantized result")
    p.add_argument("--name", default=None, help="model name in config.json (default BASE+ADAPTER)")
    return p


@cli_errors
def main(argv=None) -> Path:
    args = setup_arg_parser().parse_args(argv)
    out = fuse(args.model, args.adapter_path, args.out, args.dequantize, args.name, args.dtype,
               args.force, progress=True)
    print(f"saved {out}")
    return out


if __name__ == "__main__":
    main()
