"""Micro-benchmark of the CPU decode and prefill products on the benchmark decoder's layer shapes:
float32 ``sgemv`` against ``cpu.quant``'s 4-bit and 8-bit kernels (decode), and a float ``Linear``
against a ``QuantizedLinear`` on a prompt (prefill), interleaved in one process so that a shared,
loaded machine slows every variant alike: read the ratios, not the milliseconds.

    python -m benchmarks.quant_kernels [--layers 16] [--reps 15] [--prompt 128]

Decode times one pass over ``--layers`` layers' seven weights (q, k, v, o, gate, up, down of the
1024-wide, 2816-intermediate Llama): more bytes than the caches hold, as in a decode step.
``OPENBLAS_NUM_THREADS`` / ``NUMBA_NUM_THREADS`` choose the threads; with one, ``--cpu-time``
measures the work without the waits for a core.
"""

import mm1_mlx  # noqa: F401, I001  (binds BLAS before mlx.core)

import argparse
import time

import mlx.core as mx
import numpy as np

from mm1_mlx.cpu import quant
from mm1_mlx.cpu.ops import Linear, gemv_numpy

SHAPES = [(1024, 1024)] * 4 + [(2816, 1024)] * 2 + [(1024, 2816)]  # (out, in) per projection


def _layers(n: int) -> list[Linear]:
    out = []
    for _ in range(n):
        for rows, cols in SHAPES:
            lin = Linear(cols, rows, bias=False)
            lin.eval()  # inference: a training layer keeps MLX's quantized kernels (QLoRA)
            mx.eval(lin.parameters())
            out.append(lin)
    return out


CLOCK = [time.perf_counter]


def _median_ms(fns: dict, reps: int) -> dict:
    times, clock = {k: [] for k in fns}, CLOCK[0]
    for _ in range(reps):
        for k, f in fns.items():  # interleaved: the machine's load hits every variant alike
            t = clock()
            f()
            times[k].append(clock() - t)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def decode(layers: list[Linear], reps: int) -> dict:
    x = {cols: np.random.default_rng(0).standard_normal(cols).astype(np.float32)
         for _, cols in SHAPES}
    floats = [np.asarray(m.weight) for m in layers]
    fns = {"float32 sgemv": lambda: [gemv_numpy(w, x[w.shape[1]]) for w in floats]}
    for bits in (8, 4):
        qs = [m.to_quantized(64, bits) for m in layers]
        mx.eval([q.parameters() for q in qs])
        fns[f"{bits}-bit kernel"] = (lambda qs=qs: [quant.gemv(q, x[q.weight.shape[1] * 32
                                                                   // q.bits]) for q in qs])
    for f in fns.values():  # compile / load the kernels, fault the pages in
        f()
    return _median_ms(fns, reps)


def prefill(layers: list[Linear], reps: int, prompt: int) -> dict:
    x = {cols: mx.random.normal((1, prompt, cols)) for _, cols in SHAPES}
    fns = {"float32": lambda: mx.eval([m(x[m.weight.shape[1]]) for m in layers])}
    for bits in (8, 4):
        qs = [m.to_quantized(64, bits) for m in layers]
        mx.eval([q.parameters() for q in qs])
        fns[f"{bits}-bit"] = (lambda qs=qs: mx.eval([q(x[q.weight.shape[1] * 32 // q.bits])
                                                     for q in qs]))
    for f in fns.values():
        f()
    return _median_ms(fns, reps)


def _report(title: str, ms: dict) -> None:
    base = next(iter(ms.values()))
    print(title)
    for k, v in ms.items():
        print(f"  {k:16s} {v:8.2f} ms  {base / v:5.2f}x the float32 rate")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--prompt", type=int, default=128, help="prefill rows (0: skip prefill)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the process's CPU, not the wall clock: with one thread on a loaded "
                        "machine, the work without the waits for a core")
    args = p.parse_args(argv)
    if args.cpu_time:
        CLOCK[0] = time.process_time
    layers = _layers(args.layers)
    _report(f"decode: one pass over {args.layers} layers' weights", decode(layers, args.reps))
    if args.prompt:
        _report(f"prefill: {args.prompt} rows through 2 layers",
                prefill(layers[: 2 * len(SHAPES)], args.reps, args.prompt))


if __name__ == "__main__":
    main()
