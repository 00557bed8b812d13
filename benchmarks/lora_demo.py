"""Teach mm1-tiny a shape and a colour it has never seen ("hexagon", "teal") with LoRA and QLoRA.

    python -m benchmarks.lora_demo [--model mm1-tiny] [--work runs/lora_demo] [--eval-n 100]
    python -m benchmarks.lora_demo --defaults --skip-qlora --drawing independent   # the defaults

1. Writes <= 300 generated training conversations about shapes-world images (plus a small
   validation set) as a messages+images JSONL with PNG files, mostly about hexagons and teal
   things, some ordinary ones so the model keeps what it knew.
2. Measures held-out accuracy (``mm1_mlx.eval.evaluate``) on questions about the new concepts and
   on the original held-out set, before and after training.
3. Trains through the real command line (``python -m mm1_mlx.lora``) on the float model, then on
   a 4-bit copy made with ``python -m mm1_mlx.quantize`` (QLoRA), timing each run and reading its
   peak memory from the training log.
Results go to ``benchmarks/results/lora_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)
from mm1_mlx.shapes import world

SHAPES, COLORS = world.SHAPES + world.NEW_SHAPES, world.COLORS + world.NEW_COLORS
NEW = {"hexagon": ("hexagon", None), "teal": (None, "teal"), "both": ("hexagon", "teal")}
EVAL_TYPES = ["color", "shape", "count", "exists", "where"]  # "describe" is scored apart (F1)


def focused_conversation(rng: random.Random, scene, focus: str | None, turns: int) -> list[dict]:
    """A multi-turn conversation, most questions about ``focus`` (a shape or colour word), some
    about the other shapes (so the model keeps looking at the image, not at a new favourite word)."""
    focused: dict[str, tuple[str, str]] = {}
    for _ in range(12):
        for kind, q, a in world.questions(rng, scene, SHAPES, COLORS):
            if kind not in focused and (kind in ("count", "describe") or focus in q or focus in a):
                focused[kind] = (q, a)
    kinds = rng.sample(sorted(focused), min(turns, len(focused)))
    msgs = []
    for i, kind in enumerate(kinds):
        if rng.random() < 0.6:
            q, a = focused[kind]
        else:
            q, a = next((q, a) for k, q, a in world.questions(rng, scene, SHAPES, COLORS)
                        if k == kind)
        msgs += [{"role": "user", "content": ("<image>\n" if i == 0 else "") + q},
                 {"role": "assistant", "content": a}]
    return msgs


def write_split(folder: Path, name: str, n: int, new_fraction: float, seed: str,
                turns: int = 4, drawing: str = "ours") -> Path:
    """n conversations (messages + images JSONL, images as PNG files beside it) of up to
    ``turns`` questions each, on images drawn by the training renderer or (``independent``) by
    ``mm1_mlx.shapes.redraw``, as a user's own data would be drawn by other code."""
    from mm1_mlx.shapes.eval import DRAWINGS

    rng, random_scene = random.Random(seed), DRAWINGS[drawing]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if rng.random() < new_fraction:
            kind, color = NEW[rng.choice(sorted(NEW))]
            scene = random_scene(rng, SHAPES, COLORS, must_include=(kind, color))
            msgs = focused_conversation(rng, scene, kind or color, turns=turns)
        else:  # ordinary scenes and questions, as in SFT
            scene = random_scene(rng)
            msgs = world.conversation(rng, scene, rng.choice([1, 2, 3][:turns]))
        rel = f"images/{name}-{i:04d}.png"
        scene.image.save(folder / rel)
        rows.append({"messages": msgs, "images": [rel]})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def accuracies(model_path: str, adapter: str | None, n: int, teal_focus: bool = False,
               drawing: str = "ours") -> dict:
    """Held-out accuracy: new concepts (hexagon + teal scenes), teal-focused, and original.

    A quantized model is evaluated through float32 copies of its weights (the same values; MLX's
    quantized matmul on Linux CPU is ~20x slower than float)."""
    import mlx.core as mx

    from mm1_mlx.checkpoint import load
    from mm1_mlx.models.quantization import dequantize_model, is_quantized
    from mm1_mlx.shapes.eval import SPLITS, evaluate

    model, processor = load(model_path, adapter_path=adapter)
    if is_quantized(model):
        dequantize_model(model, mx.float32)
    out, t = {}, time.perf_counter()
    sets = [("new_concepts", dict(shapes=SHAPES, colors=COLORS, must_include=("hexagon", "teal"))),
            ("original", {})]
    if teal_focus:  # questions about the teal thing, whatever its shape
        sets.insert(1, ("teal_focus", dict(shapes=SHAPES, colors=COLORS,
                                           must_include=(None, "teal"))))
    for key, kw in sets:
        r = evaluate(model, processor, n=n, seed=SPLITS["test"], types=EVAL_TYPES,
                     drawing=drawing, **kw)
        out[key] = {"overall": r["overall"], "by_type": r["accuracy"],
                    "questions": r["questions"], "failures": r["failures"][:3]}
    out["eval_seconds"] = round(time.perf_counter() - t, 1)
    return out


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def train(model: str, train_path: Path, valid_path: Path, adapter: Path, a, iters: int,
          *extra: str) -> dict:
    cmd = [sys.executable, "-m", "mm1_mlx.lora", "--model", model, "--data", str(train_path),
           "--adapter-path", str(adapter)]
    if not a.defaults:  # else what a user gets who passes only the model, data and output
        cmd += ["--valid", str(valid_path), "--iters", str(iters),
                "--batch-size", str(a.batch_size), "--learning-rate", str(a.learning_rate),
                "--rank", str(a.rank), "--alpha", str(a.alpha), "--warmup", "10",
                "--save-every", str(iters), "--steps-per-eval", str(max(1, iters // 4)),
                "--val-batches", "-1"]
    cmd += [*a.extra, *extra]
    wall = run(cmd)
    log = json.loads((adapter / "training_log.json").read_text())
    return {"wall_seconds": round(wall, 1), "train_seconds": log["seconds"],
            "steps": log["step"], "final_train_loss": log["train"][-1][1],
            "valid_loss": log["valid"], "peak_mlx_memory_gb": log["peak_memory_gb"],
            "peak_rss_gb": log.get("max_rss_gb"), "tokens_per_second": log["tokens_per_second"],
            "trainable_parameters": log["trainable_parameters"], "command": " ".join(cmd[1:])}


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mm1-tiny")
    p.add_argument("--work", default="runs/lora_demo", help="data, adapters, 4-bit model")
    p.add_argument("--out", default="benchmarks/results/lora_demo.json")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--new-fraction", type=float, default=0.5)
    p.add_argument("--eval-n", type=int, default=100, help="held-out images per evaluation")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--defaults", action="store_true",
                   help="train with mm1_mlx.lora's defaults (only --model, --data, --adapter-path)")
    p.add_argument("--drawing", default="ours", choices=["ours", "independent"],
                   help="held-out images drawn by the training renderer or by mm1_mlx.shapes.redraw")
    p.add_argument("--train-drawing", default="ours", choices=["ours", "independent"],
                   help="training / validation images drawn by the training renderer or by "
                        "mm1_mlx.shapes.redraw (a user's data, drawn by other code)")
    p.add_argument("--data-seed", default="lora-demo",
                   help="seed of the generated training / validation data")
    p.add_argument("--turns", type=int, default=4, help="questions per conversation, at most")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more flags for mm1_mlx.lora (e.g. --train-connector)")
    p.add_argument("--skip-qlora", action="store_true")
    p.add_argument("--skip-before", action="store_true", help="no evaluation of the base")
    p.add_argument("--qlora-before", action="store_true", help="also evaluate the 4-bit base")
    p.add_argument("--teal-focus", action="store_true",
                   help="also evaluate questions about teal things of any shape")
    p.add_argument("--q4-iters", type=int, default=5,
                   help="steps of true 4-bit-compute QLoRA to time (Linux CPU: slow kernel)")
    return p


def main(argv=None) -> dict:
    a = setup_arg_parser().parse_args(argv)
    work = Path(a.work)
    folder = work / "data"
    train_path = write_split(folder, "train", a.n_train, a.new_fraction, f"{a.data_seed}:train",
                             a.turns, a.train_drawing)
    valid_path = write_split(folder, "valid", 40, a.new_fraction, f"{a.data_seed}:valid", a.turns,
                             a.train_drawing)
    result = {"model": a.model, "data": {"train_examples": a.n_train, "valid_examples": 40,
                                         "new_concept_fraction": a.new_fraction,
                                         "format": "messages+images JSONL"},
              "turns": a.turns, "eval_images": a.eval_n, "eval_question_types": EVAL_TYPES,
              "drawing": a.drawing, "train_drawing": a.train_drawing, "defaults": a.defaults,
              "runs": {}}
    bases = {"lora": a.model}
    if not a.skip_qlora:
        q4 = work / f"{Path(a.model).name}-4bit"
        if not (q4 / "config.json").exists():
            run([sys.executable, "-m", "mm1_mlx.quantize", "--model", a.model, "--mlx-path",
                 str(q4), "--q-bits", "4", "--q-group-size", "64", "--no-eval"])
        bases["qlora"] = str(q4)
    for name, base in bases.items():
        adapter = work / f"adapters-{name}"
        r = {"base": base}
        if (name == "lora" and not a.skip_before) or a.qlora_before:
            r["before"] = accuracies(base, None, a.eval_n, a.teal_focus, a.drawing)
        if name == "qlora":  # true 4-bit compute, timed over a few steps
            r["quantized_compute_steps"] = train(base, train_path, valid_path,
                                                 work / "adapters-qlora-q4", a, a.q4_iters)
            r["quantized_compute_steps"]["seconds_per_step"] = round(
                r["quantized_compute_steps"]["train_seconds"] / a.q4_iters, 2)
        extra = ["--dequantize-base"] if name == "qlora" else []
        r["training"] = train(base, train_path, valid_path, adapter, a, a.iters, *extra)
        if name == "qlora":
            r["training"]["compute"] = ("float32 copies of the 4-bit weights (--dequantize-base)"
                                        "; adapters evaluated on the 4-bit base's values")
        r["after"] = accuracies(base, str(adapter), a.eval_n, a.teal_focus, a.drawing)
        r["adapter_path"] = str(adapter)
        result["runs"][name] = r
        print(json.dumps({name: {k: r[k]["new_concepts"]["overall"] for k in ("before", "after")
                                 if k in r}
                          | {"original_after": r["after"]["original"]["overall"],
                             "train_seconds": r["training"]["train_seconds"]}}), flush=True)
    lr = result["runs"]["lora"]
    result["targets"] = {
        "new_concepts_after_ge_80": lr["after"]["new_concepts"]["overall"] >= 80,
        "original_after_ge_90": lr["after"]["original"]["overall"] >= 90,
        "training_under_10_min": lr["training"]["wall_seconds"] < 600,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(result["targets"]))
    return result


if __name__ == "__main__":
    main()
