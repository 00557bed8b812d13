"""``python -m mm1_mlx.quantize``: quantize a checkpoint (``mm1_mlx/models/quantization.py``) and
report what it cost: bits per weight, disk size, KL divergence to the float model and shapes-world
accuracy.

    python -m mm1_mlx.quantize --model IN --mlx-path OUT [--q-bits 4|8] [--recipe mixed_4_8]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cli import args as cli_args
from .errors import MM1Error, cli_errors
from .io.atomic import check_output
from .models.quantization import (
    CONNECTOR,
    DECODER,
    MODES,
    RECIPES,
    VISION,
    bits_per_weight,
    check_settings,
    dequantize_model,
    quantize_model,
    weight_stats,
)


def disk_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("model*.safetensors"))


def eval_inputs(processor, n: int = 8, seed: int = 0) -> list[tuple[mx.array, mx.array | None]]:
    """A fixed set of (input ids (1, L), pixels) conversations about shapes-world images."""
    rng = random.Random(seed)
    try:
        from .shapes.world import sft_sample
    except ImportError:
        sft_sample = None
    out = []
    for i in range(n):
        if sft_sample is not None:
            messages, images = sft_sample(rng)
        else:  # a plain fallback: a coloured square and a question
            from PIL import Image

            img = Image.new("RGB", (64, 64), (255, 255, 255))
            img.paste(tuple(rng.randrange(256) for _ in range(3)), (16, 16, 48, 48))
            messages = [{"role": "user", "content": "<image>\nWhat color is the square?"},
                        {"role": "assistant", "content": f"It is colour number {i}."}]
            images = [img]
        prepared = [processor.prepare_image(im) for im in images]
        ids, _ = processor.encode_conversation(messages, prepared)
        px = mx.array(np.concatenate([p.pixels for p in prepared])) if prepared else None
        out.append((mx.array([ids]), px))
    return out


def log_probs(model: nn.Module, inputs: list, image_token_id: int, progress: str | None = None
              ) -> list[mx.array]:
    """Next-token log-probabilities (float32) at every text position of each input;
    ``progress``: the label of a bar on stderr."""
    from tqdm import tqdm

    out = []
    for ids, px in tqdm(inputs, desc=progress, unit="conversation", disable=progress is None,
                        dynamic_ncols=True):
        logits = model(ids, pixel_values=px)[0].astype(mx.float32)
        keep = np.nonzero(np.array(ids[0]) != image_token_id)[0]
        lp = nn.log_softmax(logits[mx.array(keep)], axis=-1)
        mx.eval(lp)
        out.append(lp)
    return out


def mean_kl(ref: list[mx.array], new: list[mx.array]) -> float:
    """Mean over tokens of KL(ref || new) of the next-token distributions."""
    kls = [(mx.exp(p) * (p - q)).sum(axis=-1) for p, q in zip(ref, new)]
    return float(mx.concatenate(kls).mean().item())


def accuracy(model, processor, n: int, seed: int, progress: bool = False) -> float | None:
    """shapes-world accuracy from ``mm1_mlx.shapes.eval.evaluate`` (None when it is not available)."""
    try:
        evaluate = importlib.import_module("mm1_mlx.shapes.eval").evaluate
    except (ImportError, AttributeError):
        return None
    return float(evaluate(model, processor, n=n, seed=seed, progress=progress)["overall"])


def quality(model, processor, inputs, ref: list, acc_float: float | None, n: int, seed: int,
            progress: bool = False) -> dict:
    """KL of ``model`` against the float reference ``ref``, and its accuracy delta."""
    new = log_probs(model, inputs, model.config.image_token_id,
                    "quantized model: KL" if progress else None)
    kl = {"mean": mean_kl(ref, new), "tokens": sum(p.shape[0] for p in ref),
          "prompts": len(inputs)}
    if acc_float is None:
        return {"kl": kl, "accuracy": "skipped: eval not available"}
    if progress:
        print("quantized model: accuracy", file=sys.stderr)
    acc = accuracy(model, processor, n, seed, progress)
    return {"kl": kl, "accuracy": {"float": acc_float, "quantized": acc,
                                   "delta": acc - acc_float, "n": n}}


# ---- reporting ----

def report_markdown(r: dict) -> str:
    q = r.get("quantization") or {}
    lines = [f"# Quantization report: {r['output']}", "",
             f"- from: `{r['input']}`",
             f"- settings: {q.get('bits')}-bit, group {q.get('group_size')}, {q.get('mode')}, "
             f"recipe {q.get('recipe') or 'none'}, vision {q.get('vision_bits')}, connector "
             f"{q.get('connector_bits')}; {q.get('modules', 0)} modules quantized, "
             f"{q.get('skipped', 0)} skipped" if q else f"- dequantized to {r.get('dtype')}",
             f"- size on disk: {r['size_before'] / 1e6:.2f} MB -> {r['size_after'] / 1e6:.2f} MB "
             f"({r['size_ratio']:.1%})",
             f"- bits per weight: decoder {r['bits_per_weight']['decoder']:.2f}, "
             f"total {r['bits_per_weight']['total']:.2f}",
             f"- decoder bytes vs float16: {r['decoder_fraction_of_float16']:.1%}"]
    if "kl" in r:
        kl = r["kl"]
        lines.append(f"- mean per-token KL vs float: {kl}" if isinstance(kl, str) else
                     f"- mean per-token KL vs float: {kl['mean']:.5f} nats over "
                     f"{kl['tokens']} tokens of {kl['prompts']} conversations")
    if "accuracy" in r:
        a = r["accuracy"]
        lines.append(f"- accuracy: {a}" if isinstance(a, str) else
                     f"- accuracy: float {a['float']:.2f}, quantized {a['quantized']:.2f} "
                     f"(delta {a['delta']:+.2f} points)")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.quantize",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="input checkpoint (directory or bundled name)")
    p.add_argument("--mlx-path", "--out", dest="out", required=True,
                   help="output checkpoint directory (new, or a checkpoint replaced with --force)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at --mlx-path")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="accepted for mlx-lm's convert habit (this tool always quantizes)")
    p.add_argument("--q-bits", "--bits", dest="bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--q-group-size", "--group-size", dest="group_size", type=int, default=None,
                   choices=[32, 64, 128], help="default 64 (32 for mxfp4)")
    p.add_argument("--mode", default="affine", choices=sorted(MODES))
    p.add_argument("--vision-bits", type=int, default=16, choices=[16, 8, 4])
    p.add_argument("--connector-bits", type=int, default=16, choices=[16, 8])
    p.add_argument("--recipe", default=None, choices=RECIPES)
    p.add_argument("--dequantize", action="store_true", help="turn a quantized checkpoint to float")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="float dtype of a dequantized checkpoint")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the KL and accuracy measurements (on by default; they take most "
                        "of the time)")
    p.add_argument("--eval-prompts", type=cli_args.positive_int, default=16,
                   help="conversations for the KL")
    p.add_argument("--eval-n", type=cli_args.positive_int, default=50,
                   help="held-out images (5 questions each) for the accuracy eval")
    p.add_argument("--seed", type=cli_args.seed, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_request(args, src: Path) -> int:
    """Refuse what cannot be done before the slow part; the group size to use."""
    from .checkpoint import read_config

    check_output(args.out, "checkpoint", [src], args.force, flag="--mlx-path")
    quantized = bool(read_config(src).quantization)
    group_size = args.group_size or (32 if args.mode == "mxfp4" else 64)
    if args.dequantize and not quantized:
        raise MM1Error(f"{src} is not quantized; nothing to dequantize")
    if not args.dequantize:
        if quantized:
            raise MM1Error(f"{src} is already quantized; quantize its float original instead")
        check_settings(args.bits, group_size, args.mode, args.vision_bits, args.connector_bits,
                       args.recipe)
    return group_size


def reference(model, processor, args, progress: bool):
    """The float model's outputs and accuracy, before it is quantized in place."""
    if progress:
        print(f"measuring quality (KL over {args.eval_prompts} conversations, accuracy "
              f"on {args.eval_n} images; --no-eval skips it)", file=sys.stderr)
    inputs = eval_inputs(processor, args.eval_prompts, args.seed)
    ref = log_probs(model, inputs, model.config.image_token_id,
                    "float model: KL" if progress else None)
    if progress:
        print("float model: accuracy", file=sys.stderr)
    return inputs, ref, accuracy(model, processor, args.eval_n, args.seed, progress)


def quantize(model, processor, args, group_size: int, size: int, progress: bool) -> dict:
    """Quantize ``model`` in place; the report's quantization and quality entries."""
    from .io.materialize import materialize

    measured = None if args.no_eval else reference(model, processor, args, progress)
    q = quantize_model(model, args.bits, group_size, args.mode, args.vision_bits,
                       args.connector_bits, args.recipe)
    materialize(model, False, progress, size, desc="quantizing")
    summary = {k: v for k, v in q.items() if k not in ("modules", "skipped")}
    summary.update(modules=len(q["modules"]), skipped=len(q["skipped"]))
    if measured is None:
        return {"quantization": summary, "kl": "skipped: --no-eval",
                "accuracy": "skipped: --no-eval"}
    return {"quantization": summary,
            **quality(model, processor, *measured, args.eval_n, args.seed, progress)}


def sizes(model, src: Path, out: Path) -> dict:
    """Bytes on disk before and after, and bits per weight of each part."""
    dec_bytes, dec_n = weight_stats(model, DECODER)
    before, after = disk_size(src), disk_size(out)
    return dict(size_before=before, size_after=after, size_ratio=after / max(1, before),
                bits_per_weight={"decoder": bits_per_weight(model, DECODER),
                                 "vision": bits_per_weight(model, VISION),
                                 "connector": bits_per_weight(model, CONNECTOR),
                                 "total": bits_per_weight(model)},
                decoder_fraction_of_float16=dec_bytes / (2 * dec_n))


@cli_errors
def main(argv=None) -> dict:
    args = setup_arg_parser().parse_args(argv)
    from .checkpoint import load, resolve, save

    src = resolve(args.model)
    group_size = check_request(args, src)
    t0, progress = time.time(), not args.quiet
    model, processor = load(str(src), compute_dtype=None,  # written back: keep stored types
                            progress=progress)
    report = {"input": str(src), "output": str(Path(args.out))}
    if args.dequantize:
        dequantize_model(model, getattr(mx, args.dtype))
        report.update(quantization=None, dtype=args.dtype)
    else:
        report.update(quantize(model, processor, args, group_size, disk_size(src), progress))
    out = save(model, processor, args.out, inputs=[src], force=args.force, flag="--mlx-path")
    report.update(sizes(model, src, out), seconds=round(time.time() - t0, 1))
    write_atomic(out / "quantization_report.json", json.dumps(report, indent=2) + "\n")
    md = report_markdown(report)
    write_atomic(out / "quantization_report.md", md)
    print(md, end="")
    return report


if __name__ == "__main__":
    main()
