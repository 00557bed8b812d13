"""Fast paths for MLX's CPU backend (Linux); on Metal every function here is MLX's own op.

Measured on the 2-core development machine (``../shared/CPU-NOTES.md``, ``benchmarks/``), with
OpenBLAS bound:
- a one-row product written ``w @ x`` reads the weight 3-5x faster than ``x @ w.T`` (the
  orientation ``nn.Linear`` uses), and BLAS ``sgemv`` called directly 1.4x faster again (MLX
  calls ``sgemm``: ~20 vs ~29 GB/s);
- ``quantized_matmul`` runs at ~1 GB/s on one thread: outside training a quantized layer runs
  ``cpu.quant``'s numba kernels (a few rows: fused unpack-scale-dot; prefill: dequantized into a
  BLAS product); without numba many-row products are "MLX dequantize, then BLAS", one-row ones
  stay quantized (less to read), both split by output rows over one CPU stream (thread) per core;
- ``exp`` and ``sigmoid`` run scalar (softmax over 16x632x632: ~110 ms) while ``power(2, x)`` is
  2-2.5x faster, so softmax, sigmoid and SiLU are written with base-2 exponentials (same results
  to ~1e-7). Attention then is ``2^(s - max) @ v / sum`` instead of the fused kernel's fallback.
- numpy's exp is vectorized (AVX-512 here): ~0.4 ns per element against ~4 for MLX's, so a long
  attention (prefill, vision) runs its softmax in numpy, in causal row blocks that skip the keys
  they would only mask. Two CPU streams splitting the work did less (concurrent BLAS calls
  serialize), and numpy's own matmuls made two BLAS thread pools fight (TTFT 3.6 -> 6 s).
  Large float32 activations (SiLU, quick GELU) run in numpy too. Their gradients and
  attention's are computed in numpy as well (MLX's own gradient of these ran 3-10x the forward:
  a training step of a small decoder spent most of its time there); other gradients are MLX's.
  The softmax runs in place in the scores' own MLX buffer (no copies either way).
- ``mx.fast.rope`` computes exp, cos and sin per call (~170 us for one decode step's 16 heads):
  ``rope`` applies the module from per-position tables it made once.
- every evaluated MLX op costs ~15-80 us here: a decode step of the decoder (~50 small ops per
  layer around its products) runs in numpy instead (``cpu/step.py``).
Parameters, keys and results are those of the MLX layers; only the evaluation differs.
"""

from __future__ import annotations

import math
import os
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas, quant


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


LOG2E = 1.4426950408889634


NUMPY_ELEMENTS = 1 << 18  # float32 activations at least this large run in numpy


def sigmoid(x: mx.array) -> mx.array:
    return _activation(x, mx.sigmoid, _sigmoid, lambda a: np_silu(np.float32(1), a),
                       lambda a: _np_silu_grad(a, 0.0))


def silu(x: mx.array) -> mx.array:
    return _activation(x, nn.silu, lambda a: a * _sigmoid(a), lambda a: np_silu(a, a),
                       lambda a: _np_silu_grad(a, 1.0))


def quick_gelu(x: mx.array) -> mx.array:
    """CLIP's ``x * sigmoid(1.702 x)``."""
    return _activation(x, lambda a: a * mx.sigmoid(1.702 * a), lambda a: a * _sigmoid(1.702 * a),
                       lambda a: np_silu(a, a * np.float32(1.702)),
                       lambda a: _np_silu_grad(a, 1.0, 1.702))


def gelu(x: mx.array) -> mx.array:
    """Exact GELU, ``x * Phi(x)`` (LLaVA's projector): MLX's ``erf`` runs scalar here (~25 ns per
    element), so large inputs use Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7) in numpy."""
    return _activation(x, nn.gelu, nn.gelu, _np_gelu)


def gelu_approx(x: mx.array) -> mx.array:
    """Tanh-approximated GELU (SigLIP): ``0.5 x (1 + tanh(u)) = x * sigmoid(2u)``."""
    return _activation(x, nn.gelu_approx, nn.gelu_approx,
                       lambda a: np_silu(a, (a + np.float32(0.044715) * a * a * a)
                                         * np.float32(2 * math.sqrt(2 / math.pi))))


def _activation(x: mx.array, metal, cpu_mlx, cpu_numpy, numpy_grad=None) -> mx.array:
    """An element-wise function: MLX's op on Metal; on the CPU ``cpu_numpy`` for large float32
    inputs (with ``numpy_grad``'s derivative, or else ``cpu_mlx``'s gradient), else ``cpu_mlx``
    (MLX ops, base-2 exponentials)."""
    if not on_cpu():
        return metal(x)
    if _large(x):
        return _numpy_unary(cpu_numpy, cpu_mlx, x, numpy_grad)
    return cpu_mlx(x)


def _np_silu_grad(x: np.ndarray, outer: float, a: float = 1.0) -> np.ndarray:
    """The derivative of ``x^outer * sigmoid(a x)`` (outer 0: sigmoid, 1: SiLU / quick GELU):
    s (1 - s) a x^outer + outer s, with s = sigmoid(a x)."""
    s = np_silu(np.float32(1), x * np.float32(a))
    d = s * (np.float32(1) - s) * np.float32(a)
    if outer:
        d *= x
        d += s
    return d


_ERF = (0.3275911, 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _np_gelu(x: np.ndarray) -> np.ndarray:
    p, *a = (np.float32(c) for c in _ERF)
    z = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = np.float32(1) / (np.float32(1) + p * z)
    poly = ((((a[4] * t + a[3]) * t + a[2]) * t + a[1]) * t + a[0]) * t
    np.multiply(z, z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z  # 1 - erf(|x| / sqrt 2)
    # x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2, erf odd
    return x * np.where(x >= 0, np.float32(1) - np.float32(0.5) * poly, np.float32(0.5) * poly)


def _sigmoid(x: mx.array) -> mx.array:
    # 2^126 at most: no inf, whose gradient would be 0 * inf = nan
    return 1 / (1 + mx.power(2.0, mx.minimum(x * -LOG2E, 126.0)).astype(x.dtype))


def _large(x: mx.array) -> bool:
    return x.dtype == mx.float32 and x.size >= NUMPY_ELEMENTS


def np_silu(x, z: np.ndarray) -> np.ndarray:
    """``x * sigmoid(z)`` as ``x / (1 + 2^(-z log2 e))``, in place in a new buffer."""
    t = z * np.float32(-LOG2E)
    with np.errstate(over="ignore"):  # 2^big = inf gives x / inf = 0, sigmoid's limit
        np.exp2(t, out=t)
    t += 1
    return np.divide(x, t, out=t)


def _with_mlx_gradient(forward, reference, *args: mx.array) -> mx.array:
    """``forward(*args)`` (computed outside MLX's ops: numpy, BLAS) with the gradient of the MLX
    function ``reference``, which computes the same values (training, LoRA)."""
    fn = mx.custom_function(forward)

    @fn.vjp
    def backward(primals, cotangent, output):
        one = len(args) == 1  # one input: MLX passes the array itself, not a tuple
        grads = mx.vjp(reference, [primals] if one else list(primals), [cotangent])[1]
        return grads[0] if one else grads

    return fn(*args)


def _numpy_unary(np_fn, mx_fn, x: mx.array, np_grad=None) -> mx.array:
    """``mx_fn(x)`` computed as ``np_fn`` on x's buffer; its gradient ``np_grad(x)`` times the
    cotangent, in numpy too (MLX's exp runs scalar here: its gradient cost ~10x the forward),
    or ``mx_fn``'s own."""

    def forward(x):
        mx.eval(x)
        return mx.array(np_fn(np.asarray(x)))

    if np_grad is None:
        return _with_mlx_gradient(forward, mx_fn, x)
    fn = mx.custom_function(forward)

    @fn.vjp
    def backward(x, cotangent, output):
        mx.eval(x, cotangent)
        d = np_grad(np.asarray(x))
        d *= np.asarray(cotangent)
        return mx.array(d)

    return fn(x)


NUMPY_SCORES = 1 << 16  # attention of many rows with this many scores (prefill, training) runs in numpy
SHIFT_FREE = 64.0  # base-2 scores within +-64 exponentiate and sum in float32 unshifted
BLOCKS = 8  # causal row blocks: each skips the key columns it would only mask out


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention``: q (B, Hq, L, D), k/v (B, Hkv, S, D), Hq a
    multiple of Hkv; mask None, "causal" (the last L of S positions) or a bool/additive array."""
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unknown mask {mask!r}")
    dtype = q.dtype
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))  # BLAS products; no half GEMM on the CPU
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = (q * (scale * LOG2E)).reshape(B, Hkv, Hq // Hkv, L, D)  # scores in base-2 units
    k, v = k[:, :, None], v[:, :, None]
    if mask is not None and not isinstance(mask, str):
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (B|1, Hq|1, L, S)
        mask = mask.reshape(mask.shape[0], *((1, 1) if mask.shape[1] == 1 else (Hkv, Hq // Hkv)),
                            *mask.shape[2:])
    if L > 1 and B * Hq * L * S >= NUMPY_SCORES:
        o = _numpy_attention(q, k, v, mask)
    else:
        o = _mlx_attention(q, k, v, mask)
    return o.reshape(B, Hq, L, D).astype(dtype)


def _mlx_attention(q, k, v, mask) -> mx.array:
    """Attention of (B, Hkv, rep, L, D) base-2 scaled queries, in MLX ops."""
    L, S = q.shape[3], k.shape[3]
    s = q @ k.swapaxes(-1, -2)  # (B, Hkv, rep, L, S)
    if isinstance(mask, str):  # causal: row i sees keys up to S - L + i
        keep = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
        s = mx.where(keep, s, mx.array(-mx.inf, s.dtype))
    elif mask is not None:
        s = (mx.where(mask, s, mx.array(-mx.inf, s.dtype)) if mask.dtype == mx.bool_
             else s + (mask * LOG2E).astype(s.dtype))
    p = mx.power(2.0, s - s.max(axis=-1, keepdims=True))
    return (p @ v) / p.sum(axis=-1, keepdims=True)


def _numpy_attention(q, k, v, mask) -> mx.array:
    """``_mlx_attention`` with its softmax in numpy (vectorized exp: ~10x MLX's here), causal rows
    in blocks that skip masked-only keys. Products stay in MLX: numpy's own BLAS threads would
    fight the bound one's. The softmax runs in place in the scores' own MLX buffer, which then
    feeds the second product: no copies between MLX and numpy."""

    def forward(q, k, v):
        L, S = q.shape[3], k.shape[3]
        causal = isinstance(mask, str)
        bounds = [round(L * i / BLOCKS) for i in range(BLOCKS + 1)] if causal else [0, L]
        kt, parts = k.swapaxes(-1, -2), []
        for a, b in zip(bounds, bounds[1:]):
            if a == b:
                continue
            end = S - L + b if causal else S  # causal row i sees keys up to S - L + i
            s, p, shared = _masked_scores(q, kt, mask, a, b, end, S, L)
            m = p.max(axis=-1, keepdims=True)
            if not -SHIFT_FREE <= m.min() <= m.max() <= SHIFT_FREE:
                p -= m  # softmax is shift-invariant: shift only when 2^s could overflow
            np.exp2(p, out=p)
            sums = mx.array(p.sum(axis=-1, keepdims=True))
            parts.append(((s if shared else mx.array(p)) @ v[..., :end, :]) / sums)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=3)

    fn = mx.custom_function(forward)

    @fn.vjp
    def backward(primals, cotangent, output):
        return _numpy_attention_grad(*primals, mask, cotangent, output)

    return fn(q, k, v)


def _masked_scores(q, kt, mask, a: int, b: int, end: int, S: int, L: int):
    """Base-2 scores of query rows a..b against keys ..end, masked: (MLX array, numpy view of
    it or a copy where MLX does not lend its buffer, whether the view is shared)."""
    s = q[..., a:b, :] @ kt[..., :end]
    mx.eval(s)
    p = shared_view(s)
    shared = p is not None
    if not shared:  # MLX did not lend its buffer: work on a copy
        p = np.array(s)
    if isinstance(mask, str):  # causal: only the block's last b - a keys are hidden from some rows
        np.copyto(p[..., S - L + a:end], -np.inf, where=np.tri(b - a, k=-1, dtype=bool).T)
    elif mask is not None:
        m = np.asarray(mask[..., a:b, :])
        if m.dtype == np.bool_:
            np.copyto(p, -np.inf, where=~m)
        else:
            p += m * np.float32(LOG2E)
    return s, p, shared


def _softmax_block(q, kt, mask, a: int, b: int, end: int, S: int, L: int) -> np.ndarray:
    """Normalized softmax rows a..b of base-2 scores against keys ..end, in numpy."""
    p = _masked_scores(q, kt, mask, a, b, end, S, L)[1]
    p -= p.max(axis=-1, keepdims=True)
    np.exp2(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def _numpy_attention_grad(q, k, v, mask, d_out, out) -> tuple:
    """(dq, dk, dv) of ``_mlx_attention`` with its element-wise work in numpy (MLX's exp and
    where run scalar here: its own gradient took ~35x the forward): per causal row block,
    P = softmax, dV = P^T dO, dS = P (dO V^T - rowsum(dO O)) ln 2, dq = dS K, dK = dS^T q;
    products in MLX (one BLAS pool)."""
    L, S = q.shape[3], k.shape[3]
    causal = isinstance(mask, str)
    bounds = [round(L * i / BLOCKS) for i in range(BLOCKS + 1)] if causal else [0, L]
    mx.eval(d_out, out)
    delta = (np.asarray(d_out) * np.asarray(out)).sum(axis=-1, keepdims=True)  # (.., L, 1)
    kt, vt = k.swapaxes(-1, -2), v.swapaxes(-1, -2)
    dqs, dk, dv = [], mx.zeros(k.shape, mx.float32), mx.zeros(v.shape, mx.float32)
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        end = S - L + b if causal else S
        p = _softmax_block(q, kt, mask, a, b, end, S, L)
        dp = d_out[..., a:b, :] @ vt[..., :end]
        mx.eval(dp)
        g = shared_view(dp)
        shared = g is not None
        if not shared:
            g = np.array(dp)
        g -= delta[..., a:b, :]
        g *= p
        g *= np.float32(math.log(2))
        ds = dp if shared else mx.array(g)  # written in place in dp's own buffer
        pm = mx.array(p)
        dqs.append(ds @ k[..., :end, :])
        pad = [(0, 0)] * 3 + [(0, S - end), (0, 0)]
        dk = dk + mx.pad((ds.swapaxes(-1, -2) @ q[..., a:b, :]).sum(axis=2, keepdims=True), pad)
        dv = dv + mx.pad((pm.swapaxes(-1, -2) @ d_out[..., a:b, :]).sum(axis=2, keepdims=True),
                         pad)
    dq = dqs[0] if len(dqs) == 1 else mx.concatenate(dqs, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_SHARES: list = []


def lends_buffers() -> bool:
    """Whether this MLX hands numpy its arrays' own buffers (probed once), not copies."""
    if not _SHARES:
        probe = mx.zeros((4,))
        mx.eval(probe)
        view = np.asarray(probe)
        if view.flags.writeable:
            view[1] = 1
        _SHARES.append(probe[1].item() == 1)
    return _SHARES[0]


def shared_view(a: mx.array) -> np.ndarray | None:
    """A writable numpy view of evaluated, contiguous ``a``'s own buffer (writes change ``a``), or
    None where this MLX hands numpy a copy. Only for arrays nothing else has seen yet."""
    if not lends_buffers():
        return None
    view = np.asarray(a)
    return view if view.flags.writeable and view.flags.c_contiguous else None


_ROPE_TABLES: dict = {}
ROPE_MIN_POSITIONS = 1024  # tables grow in powers of two from here


def rope(module: nn.Module, x: mx.array, offset) -> mx.array:
    """``module(x, offset=offset)`` for MLX's and mlx-lm's RoPE modules (x: (..., L, D)). On the
    CPU ``mx.fast.rope`` evaluates exp, cos and sin per call, scalar (~170 us for one decode step's
    16 heads of 64); here it is ``x * A + swap(x) * B`` with per-position tables made once by the
    module itself (so every variant's frequencies and scales are its own) and shared by modules
    that agree. A module the tables cannot reproduce keeps its own path."""
    if not on_cpu() or not isinstance(offset, int):
        return module(x, offset=offset)
    tables = rope_tables(module, x.shape[-1], offset + x.shape[-2])
    if tables is None:
        return module(x, offset=offset)
    a, b, swap = tables
    a, b = a[offset:offset + x.shape[-2]], b[offset:offset + x.shape[-2]]
    return (x * a + swap(x) * b).astype(x.dtype)


def _rope_swap(dims: int, traditional: bool):
    """The partner of each rotated feature (pairs (i, i + dims/2), or (2i, 2i + 1) if
    traditional); features past ``dims`` are not rotated (their B is 0, any partner will do)."""
    half = dims // 2

    def swap(x):  # an MLX or a numpy array
        xp = np if isinstance(x, np.ndarray) else mx
        if traditional:
            rot = x[..., :dims].reshape(*x.shape[:-1], half, 2)[..., ::-1].reshape(
                *x.shape[:-1], dims)
        else:
            rot = xp.concatenate([x[..., half:dims], x[..., :half]], axis=-1)
        return rot if dims == x.shape[-1] else xp.concatenate([rot, x[..., dims:]], axis=-1)

    return swap


def rope_tables(module: nn.Module, D: int, positions: int):
    """(A, B, swap) covering at least ``positions`` positions, or None if ``module`` is not a
    per-feature-pair rotation (checked against the module on random input when built)."""
    dims = getattr(module, "dims", getattr(module, "dim", None))
    if not isinstance(dims, int) or dims % 2 or dims > D:
        return None
    traditional = bool(getattr(module, "traditional", False))
    scalars = tuple(sorted((k, v) for k, v in vars(module).items()
                           if isinstance(v, (int, float, bool, str, type(None)))))
    arrays = tuple((k, np.asarray(v).tobytes()) for k, v in sorted(module.items())
                   if isinstance(v, mx.array))
    key = (type(module).__qualname__, D, scalars, arrays)
    found = _ROPE_TABLES.get(key)
    if found is not None and (found is False or found[0].shape[0] >= positions):
        return found or None
    n = max(ROPE_MIN_POSITIONS, 1 << (positions - 1).bit_length())
    # probes: u is 1 on the first feature of each rotated pair (and on the features past dims), v
    # on the second; rotating them gives A (the cosine, times any input scale) on the features
    # each probe marks and B (the signed sine) on their partners
    first = np.zeros(D, np.float32)
    if traditional:
        first[0:dims:2] = 1
    else:
        first[: dims // 2] = 1
    first[dims:] = 1
    u = mx.array(first)
    v = mx.array(np.concatenate([1 - first[:dims], np.zeros(D - dims, np.float32)]))
    probe = mx.broadcast_to(mx.stack([u, v])[:, None], (2, n, D))
    ru, rv = module(probe[None].astype(mx.float32), offset=0)[0]
    a, b = ru * u + rv * v, ru * v + rv * u
    swap = _rope_swap(dims, traditional)
    x = mx.random.normal((2, 3, 8, D), key=mx.random.key(0)) * 3
    ok = mx.allclose(x * a[5:13] + swap(x) * b[5:13], module(x, offset=5), rtol=1e-4, atol=1e-4)
    mx.eval(a, b, ok)
    _ROPE_TABLES[key] = (a, b, swap) if ok.item() else False
    return _ROPE_TABLES[key] or None


HALF = (mx.float16, mx.bfloat16)


def matmul_t(x: mx.array, weight: mx.array) -> mx.array:
    """``x @ weight.T``. On the CPU: half precision is multiplied in float32 (BLAS has no half
    GEMM; MLX's own loop is orders of magnitude slower), and one row (a decode step) runs as the
    faster GEMV ``weight @ x``."""
    if not on_cpu():
        return x @ weight.T
    dtype = x.dtype
    if dtype in HALF or weight.dtype in HALF:
        x, weight = x.astype(mx.float32), weight.astype(mx.float32)
    if x.size == x.shape[-1]:
        y = _gemv(x.reshape(-1), weight).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = x @ weight.T
    return y.astype(dtype)


def _gemv(x: mx.array, weight: mx.array) -> mx.array:
    """``weight @ x`` through BLAS ``sgemv`` (1.4x MLX's ``sgemm`` here: decode reads every
    weight once per token); MLX's own product where there is no bound OpenBLAS."""
    sgemv = blas.sgemv()
    if sgemv is None or x.dtype != mx.float32 or weight.dtype != mx.float32:
        return weight @ x

    def forward(x, weight):
        mx.eval(x, weight)
        w = np.asarray(weight)
        return mx.array(gemv_numpy(w, np.asarray(x))) if w.flags.c_contiguous else weight @ x

    return _with_mlx_gradient(forward, lambda x, w: w @ x, x, weight)


def gemv_numpy(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w @ x`` for a C-contiguous float32 (N, K) ``w`` through the bound OpenBLAS's sgemv
    (numpy's own BLAS where none is bound: ``MM1_MLX_BLAS=off``, or macOS)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    sgemv = blas.sgemv()
    if sgemv is None:
        return w @ x
    y = np.empty(w.shape[0], np.float32)
    sgemv(101, 111, w.shape[0], w.shape[1], 1.0, w.ctypes.data, w.shape[1],  # row-major
                    x.ctypes.data, 1, 0.0, y.ctypes.data, 1)
    return y


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        y = matmul_t(x, self.weight)
        return y + self.bias if "bias" in self else y

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", quantize_input: bool = False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        q = QuantizedLinear.from_linear(self, group_size, bits, mode)
        q.train(self.training)
        return q


def as_fast(layer: nn.Module) -> nn.Module:
    """MLX's own ``Linear`` / ``QuantizedLinear`` (what mlx-lm's LoRA ``fuse`` returns) as this
    module's subclass: the same parameters, only how the product runs differs."""
    kind = {nn.Linear: Linear, nn.QuantizedLinear: QuantizedLinear}.get(type(layer))
    if kind is not None:
        layer.__class__ = kind
    return layer


_STREAMS: list = []
QUANT_SPLIT = 1 << 18  # quantized weights with this many elements are split over the streams
GEMV_ROWS = 4  # quantized products of up to this many rows read the packed weight once per row
BLOCK_BYTES = 1 << 24  # more rows (prefill): float32 weight rows dequantized per block
_BLOCKS = threading.local()  # per thread: (MLX buffer, its numpy view) the blocks reuse


def streams() -> list:
    """One CPU stream per usable core, made once (``MM1_MLX_CPU_STREAMS`` overrides). MLX runs
    each stream on its own thread: its own kernels (quantized products, dequantize) split across
    them run in parallel. (BLAS calls from two streams serialize: products are not split.)"""
    if not _STREAMS:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = int(os.environ.get("MM1_MLX_CPU_STREAMS", 0)) or min(cores or 1, 8)
        _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(max(1, n)))
    return _STREAMS


def _block(size: int) -> tuple:
    """This thread's float32 MLX buffer of at least ``size`` values and a writable numpy view of
    it, or (None, None) where MLX does not lend its buffers. It stays: 16 MB per thread that
    prefills."""
    if not lends_buffers():
        return None, None
    buffer, view = getattr(_BLOCKS, "buffer", (None, None))
    if buffer is None or buffer.size < size:
        buffer = mx.zeros((size,))
        mx.eval(buffer)
        view = shared_view(buffer)
        _BLOCKS.buffer = buffer, view
    return buffer, view


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu():
            return super().__call__(x)
        dtype = x.dtype
        x = x.astype(mx.float32)  # quantized_matmul with half inputs is ~30x slower here
        if not self.training and quant.handles(self):
            y = self._numba_product(x)
        else:
            y = self._mlx_product(x)
        y = y.astype(dtype)
        return y + self["bias"] if "bias" in self else y

    def _numba_product(self, x: mx.array) -> mx.array:
        """A few rows (decode outside ``cpu.step``) through the fused kernel, one row at a time;
        more (prefill) through blocks of dequantized rows (``_dequantized_product``)."""
        rows = x.size // x.shape[-1]
        if rows > GEMV_ROWS:
            return self._dequantized_product(x)
        mx.eval(x)
        xs = np.ascontiguousarray(np.asarray(x).reshape(rows, -1))
        y = np.stack([quant.gemv(self, r) for r in xs])
        return mx.array(y.reshape(*x.shape[:-1], -1))

    def _dequantized_product(self, x: mx.array) -> mx.array:
        """``x`` times the weight, as blocks of up to ``BLOCK_BYTES`` of float32 rows that
        ``quant.dequantize`` writes, bit for bit as MLX's, into one reused MLX buffer per thread
        (``_block``), each multiplied by MLX's own product: the float model's BLAS call, no float
        copy of the model, no fresh pages. Each block is evaluated before the next one overwrites
        the buffer. Against the float model's product of the same shape (a layer of the
        benchmark decoder: one block, 632 rows) this adds the dequantization, 4-8% (the buffer's
        lines mostly come back from memory: BLAS's product evicted them); BLAS writing into a
        zero-filled MLX result, as before, added 7-17%."""
        n, k = self["weight"].shape[0], x.shape[-1]
        step = max(16, BLOCK_BYTES // (4 * k))
        buffer, view = _block(min(step, n) * k)
        parts = []
        for a in range(0, n, step):
            rows = slice(a, min(n, a + step))
            size = (rows.stop - a) * k
            if view is None:  # MLX did not lend its buffer: a fresh array per block
                w = mx.array(quant.dequantize(self, rows))
            else:
                w = buffer[:size].reshape(-1, k)
                quant.dequantize(self, rows, out=view[:size].reshape(-1, k))
            parts.append(x @ w.T)
            mx.eval(parts[-1])
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    def _mlx_product(self, x: mx.array) -> mx.array:
        quantized = self.training or x.size == x.shape[-1]
        # QLoRA keeps the small quantized weights in the graph, and one row (decode) reads less
        # through quantized_matmul; many rows (prefill) dequantize into BLAS products.
        parts = []
        for stream, (a, b) in self._row_blocks():
            w, scales = self["weight"][a:b], self["scales"][a:b]
            biases = None if self.get("biases") is None else self["biases"][a:b]
            with mx.stream(stream):
                if quantized:
                    parts.append(mx.quantized_matmul(x, w, scales, biases, transpose=True,
                                                     group_size=self.group_size, bits=self.bits,
                                                     mode=self.mode))
                    continue
                w = mx.dequantize(w, scales, biases, self.group_size, self.bits, mode=self.mode)
            parts.append(matmul_t(x, w))  # on the caller's stream: BLAS, multi-threaded
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    def _row_blocks(self) -> list:
        """(stream, (first, end) output row) per stream; one block for small layers."""
        rows = self["weight"].shape[0]
        n = len(streams()) if rows * self["scales"].shape[-1] * self.group_size >= QUANT_SPLIT else 1
        bounds = [round(rows * i / n) for i in range(n + 1)]
        return [(streams()[i] if n > 1 else mx.default_stream(mx.cpu), (bounds[i], bounds[i + 1]))
                for i in range(n)]
