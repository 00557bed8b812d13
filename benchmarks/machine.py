"""This machine's ceilings, measured in the same run: memory read bandwidth and fp32 matmul rate.

``python -m benchmarks.machine numpy|mlx|mlx-reference [--quick]`` prints one JSON line. ``mlx`` binds our
BLAS first (as ``import mm1_mlx`` does); ``mlx-reference`` is MLX as the wheel ships it
(``MM1_MLX_BLAS=off``), giving the before/after matmul rate of the BLAS binding.
"""

from __future__ import annotations

import json
import sys
import threading
import time

N_MATMUL = 2048


def best(fn, reps: int = 5, warmup: bool = True) -> float:
    """Fastest of ``reps`` timed calls (after one warm-up): the least disturbed by other load."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_gbps(a, reps: int = 5) -> tuple[float, float]:
    """Memory read bandwidth (GB/s) summing the float32 array ``a`` with numpy: one reader, and
    one per core (numpy releases the GIL in reductions). Fastest of ``reps`` each."""
    import numpy as np

    halves = np.array_split(a, 2)

    def sum2():
        ts = [threading.Thread(target=h.sum) for h in halves]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return a.nbytes / best(a.sum, reps) / 1e9, a.nbytes / best(sum2, reps) / 1e9


def probe_buffer(mb: int):
    import numpy as np

    return np.ones(mb * 2**20 // 4, np.float32)


def numpy_figures(mb: int = 512, reps: int = 5) -> dict:
    import numpy as np

    a = probe_buffer(mb)
    read1, read2 = read_gbps(a, reps)
    b = np.empty_like(a)
    copy = 2 * a.nbytes / best(lambda: np.copyto(b, a), reps) / 1e9
    x = np.random.default_rng(0).standard_normal((N_MATMUL, N_MATMUL), np.float32)
    gflops = 2 * N_MATMUL**3 / best(lambda: x @ x, 3) / 1e9
    return {"read_gbps_1thread": read1, "read_gbps": max(read1, read2), "copy_gbps": copy,
            "numpy_matmul_gflops": gflops}


def mlx_figures(bind: bool) -> dict:
    import os

    if not bind:
        os.environ["MM1_MLX_BLAS"] = "off"
    # isort: off
    import mm1_mlx  # binds OpenBLAS (unless off): must load before mlx.core
    import mlx.core as mx
    # isort: on

    x = mx.random.normal((N_MATMUL, N_MATMUL))
    mx.eval(x)
    # the reference BLAS takes seconds per call: one untimed warm-up would double that
    gflops = 2 * N_MATMUL**3 / best(lambda: mx.eval(x @ x), 3 if bind else 1, warmup=bind) / 1e9
    out = {"mlx_matmul_gflops": gflops, "blas": mm1_mlx.backend_info()["blas"]}
    if bind:
        a = mx.ones((256 * 2**20 // 4,))
        mx.eval(a)
        out["mlx_read_gbps"] = a.nbytes / best(lambda: mx.eval(a.sum())) / 1e9
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    what, quick = argv[0], "--quick" in argv
    if what == "numpy":
        out = numpy_figures(128, 2) if quick else numpy_figures()
    else:
        out = mlx_figures(bind=what == "mlx")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
