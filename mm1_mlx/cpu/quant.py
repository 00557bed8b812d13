"""Products on the CPU in numba kernels: fused unpack-scale-dot over MLX's packed weights, and
float32 products and the attention of a decode step that runs in the same threads.

MLX's ``quantized_matmul`` reads ~1 GB/s per thread on the development machine's CPU: a 4-bit
model decoded 3x slower than the float one and ~10x slower than llama.cpp's Q4_0 on the same
weights. The kernels in ``quant_kernels`` read the packed bytes once, unpack, scale and
accumulate in registers, on every core, with no float copy of the weights (decode), and
dequantize blocks of a layer's rows, bit for bit as MLX does, into a reused buffer that BLAS
multiplies (prefill: ``dequantize``, called by ``cpu.ops.QuantizedLinear``).
A large float decoder's step runs its products here too (``gemv_f32``: ``builds``, ``pooled``).

They cover what ``mx.quantize`` makes by default: affine mode, 4 or 8 bits, any group size, float32
scales and biases (what ``load`` gives a quantized model on the CPU), C-contiguous. Anything else,
Metal, or no numba (a Linux-only dependency), keeps MLX's kernels (and BLAS for float products);
``MM1_MLX_QUANT_KERNELS=mlx`` chooses them too. Compiled kernels are cached under the user
cache directory (``~/.cache/mm1_mlx/numba``; ``NUMBA_CACHE_DIR`` wins), so only the first process
on a machine compiles them: ~7 s of CPU per bit width on the development machine, then ~1.2 s to
import numba and load them from the cache; ``load`` does this (``warm_up``), not the first token.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

BITS = (4, 8)
# groups of 64 on an x86 CPU with AVX2 multiply int16 pieces of the activations
# (``quant_kernels.gemv{4,8}_g64_i16``: the same sums to float32 rounding, ~1.6x faster at 4 bits);
# ``MM1_MLX_QUANT_KERNELS=float`` keeps the float kernels everywhere
INT16 = os.environ.get("MM1_MLX_QUANT_KERNELS", "").lower() != "float"
PARALLEL_BYTES = 1 << 18  # packed weights at least this large are split over the cores
FLOAT_BYTES = 1 << 28  # a float decoder at least this large decodes in the kernels' threads
_KERNELS: list = []
_POOL = threading.local()  # per thread: whether the kernels run on several threads (``_multi``)


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(base, "mm1_mlx", "numba")


def kernels():
    """The compiled kernels (module ``quant_kernels``), or None where they cannot run."""
    if not _KERNELS:
        _KERNELS.append(_load_kernels())
    return _KERNELS[0]


def _load_kernels():
    if os.environ.get("MM1_MLX_QUANT_KERNELS", "").lower() in ("mlx", "off", "0"):
        return None
    if sys.platform == "darwin" or importlib.util.find_spec("numba") is None:
        return None
    try:
        import numba

        default = numba.config.CACHE_DIR
        # the locators of our functions take the directory when they are made: set it for them
        numba.config.CACHE_DIR = default or cache_dir()
        try:
            from . import quant_kernels
        finally:
            numba.config.CACHE_DIR = default
    except Exception as e:  # a numba that does not fit this numpy or CPU: MLX's kernels
        warnings.warn(f"mm1_mlx: numba kernels unavailable ({type(e).__name__}: {e}); "
                      "quantized products use MLX's kernels", stacklevel=2)
        return None
    return quant_kernels


def warm_up(model) -> None:
    """Compile (or load from the cache) the kernels ``model``'s decode step uses: its quantized
    layers', and the float products' and attention's where the step runs here (``pooled``).
    Nothing (not even numba's import) for a model whose step keeps BLAS."""
    if not pooled(getattr(model, "language_model", model)):
        return
    sizes = {(m.bits, m.group_size, m["weight"][0].nbytes >= PARALLEL_BYTES
              if m["weight"].ndim == 3 else m["weight"].nbytes >= PARALLEL_BYTES)
             for _, m in model.named_modules() if handles(m)}
    k = kernels()
    for b, group, large in sorted(sizes):
        words = group * b // 32  # one group a row
        rows = PARALLEL_BYTES // (4 * words) if large else 5
        w = np.zeros((rows, words), np.uint32).view(np.uint8)
        scales, biases = np.ones((rows, 1), np.float32), np.zeros((rows, 1), np.float32)
        x, out, full = (np.ones(group, np.float32), np.empty(rows, np.float32),
                        np.empty((rows, group), np.float32))
        for suffix in ("", "_serial") if large else ("_serial",):  # a step may run on one thread
            getattr(k, _gemv_name(b, w, scales) + suffix)(w, scales, biases, x, out)
        getattr(k, f"dequantize{b}")(w, scales, biases, full)  # prefill's
    q, kv = np.zeros((1, 1, 4), np.float32), np.zeros((1, 2, 4), np.float32)
    for fn in (k.attend, k.attend_serial):  # the attention, in both forms
        fn(q, kv, kv, 1, kv[:, 0], kv[:, 0], np.empty_like(q))
    w = np.zeros((2, 4), np.float32)
    for fn in (k.gemv_f32, k.gemv_f32_serial):  # float products (a head, a router, a model)
        fn(w, np.ones(4, np.float32), np.empty(2, np.float32))
    x = np.ones(4, np.float32)  # the element-wise work between the products
    k.rms_norm(x, x, np.float32(1e-5), np.empty_like(x))
    k.rope(np.ones((2, 4), np.float32), x, x, np.arange(4, dtype=np.intp))
    k.silu_mul(x, x, np.empty_like(x))


def pooled(lm) -> bool:
    """Whether ``lm``'s CPU decode step runs in these kernels' threads (products, attention): where
    the kernels run, for quantized layers (which only they read) and for float decoders of at
    least ``FLOAT_BYTES`` (``gemv_f32`` reads weights ~1.2-1.5x faster than OpenBLAS's ``sgemv``
    on the development VM; a smaller one keeps BLAS rather than pay numba's import and kernel
    loads, ~0.5-1 s, when it loads). Decided once per prepared step (``cpu.step``)."""
    arrays = [a for _, a in tree_flatten(lm.parameters())]
    wants = any(a.dtype == mx.uint32 for a in arrays) or \
        sum(a.nbytes for a in arrays if a.dtype == mx.float32) >= FLOAT_BYTES
    return wants and kernels() is not None  # numba is imported only where it would be used


def handles(layer) -> bool:
    """Whether the kernels compute ``layer``'s product: an affine 4/8-bit ``QuantizedLinear``,
    ``QuantizedEmbedding`` (as a head) or mlx-lm ``QuantizedSwitchLinear``, float32 scales and
    biases, C-contiguous, kernels available."""
    if not (isinstance(layer, nn.Module) and getattr(layer, "mode", None) == "affine"
            and getattr(layer, "bits", None) in BITS and layer.get("biases") is not None):
        return False
    w, s, b = layer["weight"], layer["scales"], layer["biases"]
    if w.dtype != mx.uint32 or s.dtype != mx.float32 or b.dtype != mx.float32:
        return False
    if kernels() is None:
        return False
    return all(_view(a) is not None for a in (w, s, b))


def _view(a: mx.array) -> np.ndarray | None:
    v = np.asarray(a)
    return v if v.flags.c_contiguous and v.flags.writeable else None


def gemv(layer, x: np.ndarray, expert: int | None = None) -> np.ndarray:
    """``layer``'s weight (expert ``expert``'s of a stack) times float32 ``x`` (K,): (N,),
    without the layer's bias. ``handles(layer)`` must hold."""
    arrays = views(layer)
    if expert is not None:
        arrays = [a[expert] for a in arrays]
    return _gemv_views(layer.bits, *arrays, np.ascontiguousarray(x, dtype=np.float32))


def gemv_float(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Float32 ``w`` (N, K), C-contiguous, times float32 ``x`` (K,) in the kernels' threads
    (``quant_kernels.gemv_f32``): (N,). ``kernels()`` must give the kernels."""
    out = np.empty(w.shape[0], np.float32)
    _kernel("gemv_f32", w)(w, np.ascontiguousarray(x, dtype=np.float32), out)
    return out


def views(layer) -> tuple:
    """Numpy views of ``layer``'s weight (as bytes), scales and biases, kept on the layer while
    its arrays are the same objects: a decode step makes ~113 products a token, and building the
    views each time cost ~0.6 ms of a ~20 ms 4-bit step."""
    arrays = (layer["weight"], layer["scales"], layer["biases"])
    kept = layer.__dict__.get("_cpu_views")
    if kept is None or any(a is not b for a, b in zip(arrays, kept[0])):
        w, scales, biases = (np.asarray(a) for a in arrays)
        kept = (arrays, w.view(np.uint8), scales, biases)
        layer.__dict__["_cpu_views"] = kept  # not a parameter: off the module tree
    return kept[1:]


def threads() -> int:
    """How many threads the kernels' parallel regions use (numba's setting, per calling thread)."""
    import numba

    return numba.get_num_threads()


def set_threads(n: int) -> None:
    """Run the kernels called from this thread on ``n`` threads (at most numba's launch count);
    on one, their serial builds run (~15% faster than a parallel build on one thread)."""
    import numba

    numba.set_num_threads(n)
    _POOL.multi = n > 1


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: int, k: np.ndarray,
           v: np.ndarray) -> np.ndarray:
    """Softmax attention of one token in the kernels' thread pool (``quant_kernels.attend``):
    base-2 scores of ``q`` (Hkv, rep, D) against ``keys``/``values`` (Hkv, capacity, D) up to
    ``pos``, then its own ``k``/``v`` (Hkv, D). Returns (Hkv, rep, D)."""
    out = np.empty(q.shape, np.float32)
    fn = _kernel("attend", keys[:, :pos])  # split over the threads from PARALLEL_BYTES of keys
    fn(np.ascontiguousarray(q, dtype=np.float32), keys, values, pos, k, v, out)
    return out


def dequantize(layer, rows: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
    """``layer``'s float32 weight (rows ``rows``), bit for bit as ``mx.dequantize`` gives it,
    written into ``out`` if given (C-contiguous float32 of that shape). In the calling thread."""
    w, scales, biases = (a[rows] for a in views(layer))
    if out is None:
        out = np.empty((w.shape[0], w.shape[1] * 8 // layer.bits), np.float32)
    getattr(kernels(), f"dequantize{layer.bits}")(w, scales, biases, out)
    return out


def builds(bits: int | None, w: np.ndarray, scales: np.ndarray | None = None) -> tuple:
    """(the build for several threads, the serial build) of the product kernel ``_gemv_views``
    (``bits``) or ``gemv_float`` (None) would choose for ``w`` (and ``scales``): a caller that
    makes many products of the same arrays picks one by ``multi()`` itself (``cpu.step.Product``).
    A ``w`` under ``PARALLEL_BYTES`` gets the serial build for both."""
    return _builds("gemv_f32" if bits is None else _gemv_name(bits, w, scales), w)


def multi() -> bool:
    """Whether the kernels called from this thread get more than one thread: numba's per-thread
    count, read once per thread and then kept by ``set_threads`` (reading it costs ~5 us, ~130
    times a decode step)."""
    multi = getattr(_POOL, "multi", None)
    if multi is None:
        multi = _POOL.multi = threads() > 1
    return multi


def _kernel(name: str, w: np.ndarray):
    """The parallel build of kernel ``name`` for large ``w`` with threads to spare, else the serial
    one (on one thread ~15% faster than the parallel build)."""
    return _builds(name, w)[0 if multi() else 1]


def _builds(name: str, w: np.ndarray) -> tuple:
    """(the build of kernel ``name`` for several threads, its serial build); the serial one for
    both where ``w`` is under ``PARALLEL_BYTES``."""
    k = kernels()
    serial = getattr(k, f"{name}_serial")
    return (getattr(k, name) if w.nbytes >= PARALLEL_BYTES else serial), serial


def _gemv_name(bits: int, w: np.ndarray, scales: np.ndarray) -> str:
    g64 = w.shape[1] * 8 // bits == scales.shape[1] * 64  # w in bytes: 64 values a group
    if not g64:
        return f"gemv{bits}"
    return f"gemv{bits}_g64_i16" if INT16 and kernels().INT16 else f"gemv{bits}_g64"


def _gemv_views(bits: int, w: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                x: np.ndarray) -> np.ndarray:
    """W x for ``w`` as bytes (``views``), float32 ``x`` C-contiguous, without a bias."""
    out = np.empty(w.shape[0], np.float32)
    _kernel(_gemv_name(bits, w, scales), w)(w, scales, biases, x, out)
    return out
