"""LoRA step time and peak memory, ours vs mlx-vlm's, on the same data and the same weights.

``python -m benchmarks.lora_bench mm1-mlx|mlx-vlm SPEC_JSON`` prints one ``RESULT`` line. Both train
rank-8 LoRA on the decoder for a few steps, batch 1, on one image conversation per step; the step
time is the median of the steps after the first (which pays for compilation and warm-up). mlx-vlm's
LoRA runs with our BLAS binding: with the reference BLAS it would take minutes per step here.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from .checkpoint import FOLLOW_UP, QUESTION
from .worker import ImageKwargsFilter, peak_rss_gb

ANSWER = ("There is a red circle in the upper left, a blue square near the center and two small "
          "yellow shapes close to the bottom right corner; the background is bright.")


def write_data(folder: Path, image: Path, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"<image>\n{(QUESTION, FOLLOW_UP)[i % 2]}"},
                          {"role": "assistant", "content": ANSWER}],
             "images": [str(image)]} for i in range(n)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text(text)
    return folder


def run_ours(spec: dict) -> dict:
    # isort: off
    from mm1_mlx import lora  # first: binds OpenBLAS before mlx.core loads
    import mlx.core as mx
    from mm1_mlx.tuner import trainer
    # isort: on

    times = []

    class Clock:  # the training loop's progress bar is updated once per optimizer step
        def __init__(self, *a, **k):
            pass

        def update(self, n=1):
            mx.synchronize()
            times.append(time.perf_counter())

        def set_postfix(self, **k):
            pass

        def write(self, s):
            pass

        def close(self):
            pass

    trainer.tqdm = Clock  # harness-only: per-step timestamps without touching the library
    # the decoder's LoRA alone, as mlx-vlm's trainer does by default: the same work on both sides
    args = lora.TrainingArgs(data=str(Path(spec["data"]) / "train.jsonl"), model=spec["mlx_path"],
                             adapter_path=spec["adapter_path"], iters=spec["iters"], batch_size=1,
                             save_every=10**6, rank=8, alpha=16.0, train_vision=False,
                             augment=False)
    t0 = time.perf_counter()
    log = lora.train(args, quiet=True)
    steps = [b - a for a, b in zip([t0] + times, times)]
    return {"steps_s": steps, "peak_gb": log.get("peak_memory_gb", mx.get_peak_memory() / 1e9)}


def run_mlx_vlm(spec: dict) -> dict:
    from mm1_mlx.cpu.blas import bind_blas

    bind_blas()
    import mlx.core as mx
    from mlx_vlm import train as vlm_train

    times = []

    class Callback:
        def on_train_loss_report(self, info):
            times.append(time.perf_counter())

        def on_val_loss_report(self, info):
            pass

    argv = ["--model", spec["hf_path"], "--data", spec["data"], "--iters", str(spec["iters"]),
            "--batch-size", "1", "--steps-per-report", "1", "--steps-per-eval", "1000000",
            "--steps-per-save", "1000000", "--lora-rank", "8", "--lora-alpha", "16",
            "--adapter-file", str(Path(spec["adapter_path"]) / "adapters.safetensors")]
    args, settings = vlm_train.parse_args(argv)
    load = vlm_train._load_model

    def load_with_workaround(task, path):  # see worker.ImageKwargsFilter
        model, processor = load(task, path)
        processor.image_processor = ImageKwargsFilter(processor.image_processor)
        return model, processor

    vlm_train._load_model = load_with_workaround
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    vlm_train.run(args, settings, training_callback=Callback())
    steps = [b - a for a, b in zip([t0] + times, times)]
    return {"steps_s": steps, "peak_gb": mx.get_peak_memory() / 1e9,
            "workaround": "harness wraps the image processor to drop text kwargs (mlx-vlm 0.7 "
                          "passes `padding` to it, which transformers 5 rejects)"}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    system, spec = argv[0], json.loads(argv[1])
    out = run_ours(spec) if system == "mm1-mlx" else run_mlx_vlm(spec)
    out["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(out), flush=True)


def run_lora(paths: dict, cache: Path, iters: int, timeout: float, log) -> dict:
    """Both LoRA trainers in their own processes; a failure is reported with its error."""
    import shutil
    import tempfile

    from .children import child

    data = write_data(cache / "lora-data", paths["image"])
    out = {}
    for system in ("mlx-vlm+blas", "mm1-mlx"):
        if system == "mm1-mlx" and isinstance(paths.get("mm1-mlx"), Exception):
            out[system] = {"status": "failed", "error": f"conversion failed: {paths['mm1-mlx']}"}
            continue
        tmp = tempfile.mkdtemp(prefix="mm1-lora-bench-")
        spec = {"hf_path": str(paths["hf"]), "mlx_path": str(paths.get("mm1-mlx")),
                "data": str(data), "adapter_path": str(Path(tmp) / "adapters"),
                "iters": iters + 1}
        log(f"lora: {system}")
        r = child(["benchmarks.lora_bench", system.split("+")[0], json.dumps(spec)], timeout)
        shutil.rmtree(tmp, ignore_errors=True)
        if "error" in r:
            log(f"  {system} failed: {r['error']}")
            out[system] = {"status": "failed", "error": r["error"]}
            continue
        later = r["steps_s"][1:] or r["steps_s"]
        out[system] = {"status": "ok", "step_s": statistics.median(later) if later else None,
                       "steps_s": r["steps_s"], "peak_gb": r["peak_gb"],
                       "peak_rss_gb": r["peak_rss_gb"],
                       "note": "rank 8, batch 1, median of steps after the first"}
        log(f"  step {out[system]['step_s']:.2f} s, peak {r['peak_gb']:.2f} GB")
    return out


if __name__ == "__main__":
    main()
