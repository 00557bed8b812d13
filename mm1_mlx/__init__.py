"""mm1-mlx: an MM1-style multimodal LLM in MLX.

Importing this package binds an optimized BLAS for MLX's Linux CPU backend before ``mlx.core``
loads (see ``cpu/blas.py``) and makes OpenMP thread pools sleep between parallel regions (below);
nothing else happens at import.
"""

import os

from .cpu.blas import backend_info, bind_blas

# The quantized decode step alternates numba's OpenMP kernels with BLAS's own threads (attention)
# ~130 times a token. Spinning pools took each other's cores: 4-bit decode at 2 threads ran at
# 4 tok/s against 18 at one thread on 2 cores, and at 0.2-0.3 tok/s whenever another process was
# busy. Passive waiting gives that back. It must be set before any OpenMP runtime loads (numba's
# pool shares the libgomp that torch, imported by transformers, loads first); a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
