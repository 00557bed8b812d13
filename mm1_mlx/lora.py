"""LoRA / QLoRA fine-tuning of an MM1 model on image conversations, on one machine or several.

    python -m mm1_mlx.lora --model M --data DIR --adapter-path OUT   # DIR/train.jsonl, valid.jsonl
    python -m mm1_mlx.lora --model M --data train.jsonl [--valid valid.jsonl] --adapter-path OUT
    python -m mm1_mlx.lora --config lora.yaml          # same keys as the flags (dashes or underscores)
    mlx.launch --backend ring -n 2 --python python -- -m mm1_mlx.lora ...   # data parallel

LoRA wraps the decoder's attention and MLP projections (MoE expert stacks included); a quantized base
gives QLoRA. By default LoRA also wraps every layer of a ViT image encoder (``--train-vision``;
an encoder that never saw a new shape or colour may not tell it apart) and each training image is
a fresh random variation at every step (``--augment``, ``mm1_mlx/tuner/augment.py``: without it an
adapted encoder learns the training pictures' pixels), and the whole connector trains too, at 0.3x
the learning rate (``--train-connector``, on when the connector is float; ``--whole-lr-scale``
sets the 0.3; ``--train-vision-embeddings`` adds the ViT's patch and position embeddings the same
way). The loss falls on the assistant's tokens (``--mask-prompt``, the default); ``--no-mask-prompt`` trains
on every text token, prompts included (never on image tokens). Bad records are reported as
FILE:LINE and left out (``--on-bad-data skip``, the default) or stop the run before it starts
(``fail``).

Every ``--save-every`` steps the adapter directory is rewritten atomically: adapters.safetensors,
adapter_config.json, training_state.safetensors (optimizer state, step, losses), training_log.json
and loss.png. ``--resume`` continues from the last complete save, even after a kill mid-save. The
data order, image variations and dropout masks are pure functions of (seed, step), so a resumed
run takes the same steps as an uninterrupted one. With several processes, each takes its share of
every global batch, gradients are averaged with ``mx.distributed`` and rank 0 alone writes.

This module is the command line (flags, YAML config); the training loop is
``mm1_mlx.tuner.trainer`` (``TrainingArgs``, ``train``), as in mlx-lm.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

import mlx.core as mx

from .cli import args as cli_args
from .cli.signals import sigterm_interrupts
from .errors import MM1Error, cli_errors
from .tuner.trainer import DEFAULT_EPOCHS, MAX_DEFAULT_ITERS, TrainingArgs, train

__all__ = ["TrainingArgs", "train", "main", "setup_arg_parser"]


# ---- command line ----
def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.lora",
                                description="LoRA / QLoRA fine-tuning of an MM1 model.")
    p.add_argument("--config", "-c", default=None,
                   help="YAML file of TrainingArgs (flags override it)")
    p.add_argument("--model", help="base checkpoint (default mm1-tiny); a quantized one = QLoRA")
    p.add_argument("--train", action="store_true",
                   help="accepted for mlx-lm's habit (this tool always trains)")
    p.add_argument("--data", help="training data: a directory with train.jsonl [and valid.jsonl] "
                                  "(mlx-lm's layout), or a file: LLaVA .json, or .jsonl of "
                                  "messages+images / image+prompt+response")
    p.add_argument("--valid", help="validation data (same formats; default DATA_DIR/valid.jsonl)")
    p.add_argument("--adapter-path", help="output adapter directory (default ./adapters)")
    p.add_argument("--iters", type=int,
                   help=f"optimizer steps (default: --epochs passes, at most {MAX_DEFAULT_ITERS})")
    p.add_argument("--epochs", type=float,
                   help=f"passes over the data when --iters is not given (default "
                        f"{DEFAULT_EPOCHS:g})")
    p.add_argument("--batch-size", type=int, help="global batch size (default 8)")
    p.add_argument("--grad-accumulation", "--grad-accumulation-steps", dest="grad_accumulation",
                   type=int, help="micro-batches per step (default 1)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"])
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float, help="clip gradients (0 = off; default 1)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default 32)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default 0)")
    p.add_argument("--lora-layers", "--num-layers", dest="lora_layers", type=int,
                   help="LoRA on the last N decoder layers (-1 = all)")
    p.add_argument("--train-vision", action=argparse.BooleanOptionalAction,
                   help="LoRA on every layer of a ViT image encoder too (default on; "
                        "--no-train-vision: the decoder alone)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="a random zoom/shift/rotation, colour, noise and JPEG variation of each "
                        "training image at every step (default on; --no-augment: off)")
    p.add_argument("--train-connector", action=argparse.BooleanOptionalAction,
                   help="also train the whole connector, at --whole-lr-scale times the learning "
                        "rate (default on unless it is quantized; --no-train-connector: LoRA "
                        "layers alone)")
    p.add_argument("--train-vision-embeddings", action=argparse.BooleanOptionalAction,
                   help="with --train-vision, also train the ViT's patch and position "
                        "embeddings whole, as the connector (default off)")
    p.add_argument("--whole-lr-scale", type=float,
                   help="learning rate of the weights trained whole (connector, ViT embeddings) "
                        "as a fraction of --learning-rate (default 0.3)")
    p.add_argument("--image-size", type=int,
                   help="train (and then run, with these adapters) the image encoder at this "
                        "many pixels (default: the model's finetune_image_size, else its own "
                        "size; mm1-tiny: 144, it runs at 96 without adapters)")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass (less memory)")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction,
                   help="loss on assistant tokens only (default); --no-mask-prompt: all text")
    p.add_argument("--max-length", "--max-seq-length", dest="max_length", type=int,
                   help="longest sample in tokens (default: context)")
    p.add_argument("--save-every", type=int, help="save adapters every N steps (default 100)")
    p.add_argument("--steps-per-eval", type=int, help="validation every N steps (default 50)")
    p.add_argument("--val-batches", type=int, help="validation batches (-1 = all; default 8)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction,
                   help="continue from the last complete save in --adapter-path")
    p.add_argument("--force", action=argparse.BooleanOptionalAction,
                   help="replace an existing adapter directory (start over)")
    p.add_argument("--on-bad-data", choices=["skip", "fail"],
                   help="skip bad records and report them (default) or stop before training")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dequantize-base", action=argparse.BooleanOptionalAction,
                   help="train over float copies of a quantized base's weights: the same "
                        "values, more memory, far faster on Linux CPU (MLX's CPU quantized "
                        "matmul is ~20x slower than float); the adapters fit the quantized base")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (skipped records and warnings are still reported)")
    return p


# mlx-lm's names for the same settings, as YAML keys (the flags take them too)
YAML_ALIASES = {"num_layers": "lora_layers", "max_seq_length": "max_length",
                "grad_accumulation_steps": "grad_accumulation"}


def args_from(ns: argparse.Namespace) -> TrainingArgs:
    """TrainingArgs from defaults <- YAML config <- command-line flags."""
    values = {}
    if ns.config:
        values = read_yaml(ns.config)
    for f in dataclasses.fields(TrainingArgs):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainingArgs(**values)


def read_yaml(path: str) -> dict:
    """The YAML settings file, each value coerced to its TrainingArgs field's type."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise MM1Error(f"bad YAML in {path}: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise MM1Error(f"{path} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise MM1Error(f"{path} is nested too deeply") from None
    if not isinstance(cfg, dict):
        raise MM1Error(f"{path} must hold a mapping of training settings, not a "
                       f"{type(cfg).__name__}")
    types = typing.get_type_hints(TrainingArgs)
    values = {}
    for k, v in cfg.items():
        key = str(k).replace("-", "_")
        key = YAML_ALIASES.get(key, key)
        if key == "train":  # mlx-lm's "train: true"; this tool always trains
            continue
        if key not in types:
            raise MM1Error(f"{path}: unknown setting {str(k)[:60]!r}")
        values[key] = coerce(str(k), v, types[key], path)
    return values


# ---- YAML values ----
WANTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          list: "a list of strings"}


def coerce(key: str, value, typ, where: str):
    """A YAML value -> the type of the TrainingArgs field (YAML 1.1 reads ``1e-3`` as a string),
    or an MM1Error naming the file, key, value and the type wanted."""
    args = typing.get_args(typ)
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    base = typing.get_origin(base) or base
    if value is None:
        if type(None) in args:  # an optional field
            return None
        raise MM1Error(f"{where}: {key} is empty; it needs a {base.__name__}")
    try:
        out = _convert(value, base)
    except (ValueError, OverflowError):
        out = None
    if out is None:
        raise MM1Error(f"{where}: {key} = {str(value)[:60]!r}: must be {WANTED[base]}")
    return out


def _convert(value, base: type):
    """``value`` as a ``base`` (bool, int, float, str or list of str), or None if it is none."""
    number = not isinstance(value, bool) and isinstance(value, (int, float, str))
    if base is bool and isinstance(value, bool):
        return value
    if base is int and number:
        f = float(value)
        return int(f) if f.is_integer() and abs(f) < 2**63 else None
    if base is float and number:
        f = float(value)
        return f if math.isfinite(f) else None
    if base is str and isinstance(value, str):
        return value
    if base is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


@cli_errors
def main(argv=None) -> dict:
    ns = setup_arg_parser().parse_args(argv)
    args = args_from(ns)
    with sigterm_interrupts():
        log = train(args, quiet=ns.quiet)
    if mx.distributed.init().rank() == 0:
        last = log["train"][-1][1] if log["train"] else float("nan")
        val = f", validation loss {log['valid'][-1][1]:.4f}" if log["valid"] else ""
        print(f"saved {args.adapter_path}: step {log['step']}, loss {last:.4f}{val}, "
              f"{log.get('seconds', 0):.0f} s, peak memory {log.get('peak_memory_gb', 0):.3f} GB")
    return log


if __name__ == "__main__":
    main()
