"""Quantizing MM1 checkpoints: 4/8-bit decoder (dense and MoE experts), optional encoder/connector.

The recorded format (``config.json`` ``quantization``) lists every quantized module with its own
settings, so loading rebuilds exactly what was saved::

    {"bits": 4, "group_size": 64, "mode": "affine", "recipe": null, "vision_bits": 16,
     "connector_bits": 16,
     "modules": {"language_model.model.layers.0.self_attn.q_proj":
                 {"bits": 4, "group_size": 64, "mode": "affine"}, ...},
     "skipped": {"<path>": "input dim 100 not divisible by group size 64", ...}}

Only ``modules`` drives the rebuild; the other keys document how the checkpoint was made. Linear,
Embedding and mlx-lm's SwitchLinear (expert stacks, gather_qmm) quantize; convolutions never do.

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
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import cli_args
from .atomic import check_output
from .cpu import Linear
from .errors import MM1Error, cli_errors

RECIPES = ["mixed_4_8"]
MODES = {"affine": ({2, 3, 4, 5, 6, 8}, {32, 64, 128}), "mxfp4": ({4}, {32})}
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
DECODER, VISION, CONNECTOR = "language_model.", "vision_tower.", "connector."
ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")  # MoE routers keep 8 bits, as in mlx-lm's MoEs


def is_quantized(model: nn.Module) -> bool:
    if getattr(getattr(model, "config", None), "quantization", None):
        return True
    return any(isinstance(m, QUANTIZED) for _, m in model.named_modules())


def _check_settings(bits: int, group_size: int, mode: str, vision_bits: int, connector_bits: int,
                    recipe: str | None) -> None:
    if mode not in MODES:
        raise MM1Error(f"unknown quantization mode {mode!r}; choose from {sorted(MODES)}")
    ok_bits, ok_groups = MODES[mode]
    if bits not in ok_bits or group_size not in ok_groups:
        raise MM1Error(f"{mode} quantization takes bits {sorted(ok_bits)} and group size "
                       f"{sorted(ok_groups)}, got bits {bits} and group size {group_size}")
    if vision_bits not in (16, 8, 4):
        raise MM1Error(f"vision bits must be 16, 8 or 4, got {vision_bits}")
    if connector_bits not in (16, 8):
        raise MM1Error(f"connector bits must be 16 or 8, got {connector_bits}")
    if recipe is not None and recipe not in RECIPES:
        raise MM1Error(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    if recipe is not None and mode != "affine":
        raise MM1Error(f"recipe {recipe} needs affine mode, got {mode}")


def _layer_index(path: str) -> int | None:
    parts = path.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        if i < len(parts) and parts[i].isdigit():
            return int(parts[i])
    return None


def mixed_4_8_bits(path: str, num_layers: int, tied: bool) -> int:
    """8 bits where quantization hurts most (as mlx-lm's mixed recipes, llama.cpp Q4_K_M)."""
    if path.endswith("lm_head") or (tied and path.endswith("embed_tokens")):
        return 8
    i = _layer_index(path)
    if i is None or not path.endswith(("v_proj", "down_proj")):
        return 4
    n8 = num_layers // 8
    more = i < n8 or i >= 7 * num_layers // 8 or (i - n8) % 3 == 2
    return 8 if more else 4


def plan(model: nn.Module, bits: int = 4, group_size: int = 64, mode: str = "affine",
         vision_bits: int = 16, connector_bits: int = 16, recipe: str | None = None
         ) -> tuple[dict, dict]:
    """(modules to quantize -> settings, skipped modules -> reason) for a float model."""

    def spec(b: int) -> dict:  # 8-bit side modules under mxfp4 use affine: mxfp4 is 4-bit only
        return {"bits": b, "group_size": group_size, "mode": mode if b == bits else "affine"}

    args = model.config.text_config
    modules, skipped = {}, {}
    for path, m in model.named_modules():
        if path.startswith(DECODER) and isinstance(m, (nn.Linear, nn.Embedding, SwitchLinear)):
            if path.endswith(ROUTERS):
                b = 8
            elif recipe == "mixed_4_8":
                b = mixed_4_8_bits(path, args.num_hidden_layers, args.tie_word_embeddings)
            else:
                b = bits
        elif path.startswith(VISION) and isinstance(m, nn.Linear) and vision_bits < 16:
            b = vision_bits  # Linear only: the position table is read directly, not called
        elif path.startswith(CONNECTOR) and isinstance(m, nn.Linear) and connector_bits < 16:
            b = connector_bits
        else:
            continue
        s = spec(b)
        dim = m.weight.shape[-1]
        if dim % s["group_size"]:
            skipped[path] = f"input dim {dim} not divisible by group size {s['group_size']}"
        else:
            modules[path] = s
    return dict(sorted(modules.items())), dict(sorted(skipped.items()))


def apply_quantization(model: nn.Module, quantization: dict) -> None:
    """Replace exactly the modules listed in ``quantization["modules"]`` by quantized ones."""
    modules = quantization.get("modules")
    if not isinstance(modules, dict):
        raise MM1Error("config.json quantization has no per-module 'modules' record")
    seen = set()

    def predicate(path: str, m: nn.Module):
        if path not in modules:
            return False
        if not hasattr(m, "to_quantized"):
            raise MM1Error(f"quantization lists {path}, a {type(m).__name__}: not quantizable")
        seen.add(path)
        return dict(modules[path])

    nn.quantize(model, class_predicate=predicate)
    missing = sorted(set(modules) - seen)
    if missing:
        raise MM1Error(f"quantization lists {len(missing)} modules the model does not have: "
                       f"{', '.join(missing[:3])}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, mode: str = "affine",
                   vision_bits: int = 16, connector_bits: int = 16, recipe: str | None = None
                   ) -> dict:
    """Quantize ``model`` in place (float weights -> float16 first, so scales are float16).

    Returns the recorded quantization dict, also set as ``model.config.quantization``.
    """
    if is_quantized(model):
        raise MM1Error("the model is already quantized; dequantize it first (--dequantize)")
    _check_settings(bits, group_size, mode, vision_bits, connector_bits, recipe)
    modules, skipped = plan(model, bits, group_size, mode, vision_bits, connector_bits, recipe)
    if not modules:
        raise MM1Error(f"no layer can be quantized with group size {group_size}")
    model.set_dtype(mx.float16)
    quantization = {"bits": bits, "group_size": group_size, "mode": mode, "recipe": recipe,
                    "vision_bits": vision_bits, "connector_bits": connector_bits,
                    "modules": modules, "skipped": skipped}
    apply_quantization(model, quantization)
    model.config.quantization = quantization
    return quantization


def dequantize_model(model: nn.Module, dtype: mx.Dtype | None = None) -> nn.Module:
    """Quantized layers -> float layers holding ``mx.dequantize`` of their weights (in place).

    The weights come out in the scales' dtype (float16); ``dtype`` casts every float parameter
    (float32 for MoE models on Linux CPU, whose gather_mm takes only float32).
    """
    if not is_quantized(model):
        raise MM1Error("the model is not quantized")
    layers = []
    for path, m in model.named_modules():
        if not isinstance(m, QUANTIZED):
            continue
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
        has_bias = "bias" in m
        if isinstance(m, nn.QuantizedEmbedding):
            f = nn.Embedding(*w.shape)
        elif isinstance(m, QuantizedSwitchLinear):
            f = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias=has_bias)
        else:
            f = Linear(w.shape[1], w.shape[0], bias=has_bias)
        f.weight = w
        if has_bias:
            f.bias = m.bias
        layers.append((path, f))
    model.update_modules(tree_unflatten(layers))
    if dtype is not None:
        model.set_dtype(dtype)
    model.config.quantization = None
    return model


# ---- measuring ----

def weight_stats(model: nn.Module, prefix: str = "") -> tuple[int, int]:
    """(bytes held, number of logical weights) of the parameters under ``prefix``."""
    nbytes = nweights = 0
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not path.startswith(prefix):
            continue
        params = tree_flatten(m.parameters())
        nbytes += sum(v.nbytes for _, v in params)
        if isinstance(m, QUANTIZED):
            nweights += m.weight.size * 32 // m.bits + (m.bias.size if "bias" in m else 0)
        else:
            nweights += sum(v.size for _, v in params)
    return nbytes, nweights


def bits_per_weight(model: nn.Module, prefix: str = "") -> float:
    nbytes, n = weight_stats(model, prefix)
    return 8 * nbytes / n if n else 0.0


def disk_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("model*.safetensors"))


def eval_inputs(processor, n: int = 8, seed: int = 0) -> list[tuple[mx.array, mx.array | None]]:
    """A fixed set of (input ids (1, L), pixels) conversations about shapes-world images."""
    rng = random.Random(seed)
    try:
        from .data import sft_sample
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
    """shapes-world accuracy from ``mm1_mlx.eval.evaluate`` (None when it is not available)."""
    try:
        evaluate = importlib.import_module("mm1_mlx.eval").evaluate
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


@cli_errors
def main(argv=None) -> dict:
    args = setup_arg_parser().parse_args(argv)
    from .checkpoint import load, read_config, resolve, save
    from .materialize import materialize

    src = resolve(args.model)
    check_output(args.out, "checkpoint", [src], args.force, flag="--mlx-path")  # before the slow part
    quantized = bool(read_config(src).quantization)
    group_size = args.group_size or (32 if args.mode == "mxfp4" else 64)
    if args.dequantize and not quantized:
        raise MM1Error(f"{src} is not quantized; nothing to dequantize")
    if not args.dequantize:
        if quantized:
            raise MM1Error(f"{src} is already quantized; quantize its float original instead")
        _check_settings(args.bits, group_size, args.mode, args.vision_bits, args.connector_bits,
                        args.recipe)
    t0 = time.time()
    progress = not args.quiet
    model, processor = load(str(src), compute_dtype=None,  # written back: keep stored types
                            progress=progress)
    report = {"input": str(src), "output": str(Path(args.out))}
    if args.dequantize:
        dequantize_model(model, getattr(mx, args.dtype))
        report.update(quantization=None, dtype=args.dtype)
    else:
        if not args.no_eval:  # the float model's outputs, before it changes in place
            if progress:
                print(f"measuring quality (KL over {args.eval_prompts} conversations, accuracy "
                      f"on {args.eval_n} images; --no-eval skips it)", file=sys.stderr)
            inputs = eval_inputs(processor, args.eval_prompts, args.seed)
            ref = log_probs(model, inputs, model.config.image_token_id,
                            "float model: KL" if progress else None)
            if progress:
                print("float model: accuracy", file=sys.stderr)
            acc_float = accuracy(model, processor, args.eval_n, args.seed, progress)
        q = quantize_model(model, args.bits, group_size, args.mode, args.vision_bits,
                           args.connector_bits, args.recipe)
        materialize(model, False, progress, disk_size(src), desc="quantizing")
        report["quantization"] = {k: v for k, v in q.items() if k not in ("modules", "skipped")}
        report["quantization"].update(modules=len(q["modules"]), skipped=len(q["skipped"]))
        if args.no_eval:
            report["kl"] = report["accuracy"] = "skipped: --no-eval"
        else:
            report.update(quality(model, processor, inputs, ref, acc_float, args.eval_n,
                                  args.seed, progress))
    out = save(model, processor, args.out, inputs=[src], force=args.force, flag="--mlx-path")
    dec_bytes, dec_n = weight_stats(model, DECODER)
    report.update(
        size_before=disk_size(src), size_after=disk_size(out),
        bits_per_weight={"decoder": bits_per_weight(model, DECODER),
                         "vision": bits_per_weight(model, VISION),
                         "connector": bits_per_weight(model, CONNECTOR),
                         "total": bits_per_weight(model)},
        decoder_fraction_of_float16=dec_bytes / (2 * dec_n),
        seconds=round(time.time() - t0, 1),
    )
    report["size_ratio"] = report["size_after"] / max(1, report["size_before"])
    write_atomic(out / "quantization_report.json", json.dumps(report, indent=2) + "\n")
    md = report_markdown(report)
    write_atomic(out / "quantization_report.md", md)
    print(md, end="")
    return report


if __name__ == "__main__":
    main()
