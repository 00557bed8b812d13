"""mm1-mlx: an MM1-style multimodal LLM in MLX.

Importing this package binds an optimized BLAS for MLX's Linux CPU backend before ``mlx.core``
loads (see ``cpu/blas.py``) and keeps OpenMP thread pools from spinning long between parallel
regions (below); nothing else happens at import.
"""

import os

from .cpu.blas import backend_info, bind_blas

# numba's OpenMP threads (the quantized decode step's kernels) spin only briefly between parallel
# regions. libgomp's default spin (300,000 rounds) took the cores BLAS's threads needed (4-bit
# decode ran at 4 tok/s at 2 threads); sleeping at once (OMP_WAIT_POLICY=PASSIVE) cost a thread
# wake-up at each of the ~130 regions of a step (2 threads were slower than one). 5,000 rounds
# (tens of microseconds) span the gaps inside a step: 4-bit decode 40 -> 19 ms a token on 2 cores.
# It must be set before an OpenMP runtime loads (numba's pool shares the libgomp that torch loads
# first); a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. When another process wants the cores,
# spinning threads lose to it: the decode step then times one thread against all (cpu/step.py).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "5000")
# The bound OpenBLAS's idle threads spin 2^24 time-stamp cycles (~6-8 ms) after a product, not
# its default 2^28 (~0.1 s): after a prompt's prefill they took a core from the decode step's
# kernels for ~0.1 s (its first 6-8 tokens ran on one thread, ~50 ms a reply on the benchmark's
# 4-bit decoder); the gaps between the BLAS products of a step or a prefill are far shorter, so
# those keep their awake threads. Read when OpenBLAS loads (``bind_blas``); a user's setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "24")
bind_blas()

__version__ = "0.1.0"

_LAZY = {
    "load": "checkpoint",
    "save": "checkpoint",
    "generate": "generate",
    "stream_generate": "generate",
}


def __getattr__(name):
    # heavy modules (tokenizers, transformers) load on first use, not on `import mm1_mlx`
    if name in _LAZY:
        import importlib

        obj = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = obj  # importing .generate just bound the submodule to this name
        return obj
    raise AttributeError(f"module 'mm1_mlx' has no attribute {name!r}")


__all__ = ["backend_info", "load", "save", "generate", "stream_generate", "__version__"]
