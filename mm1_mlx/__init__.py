"""mm1-mlx: an MM1-style multimodal LLM in MLX.

Importing this package binds an optimized BLAS for MLX's Linux CPU backend before ``mlx.core``
loads (see ``cpu/blas.py``); it is the package's only import-time action.
"""

from .cpu.blas import backend_info, bind_blas

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
