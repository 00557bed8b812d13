"""Fast paths for MLX's CPU backend (Linux); on Metal every function here is MLX's own op.

Measured on the 2-core development machine (``../shared/CPU-NOTES.md``, ``benchmarks/``), with
OpenBLAS bound:
- a one-row product written ``w @ x`` reads the weight 3-5x faster than ``x @ w.T`` (the
  orientation ``nn.Linear`` uses);
- ``quantized_matmul`` runs at ~1 GB/s, so a quantized layer's many-row products (prefill) are
  faster as "dequantize, then BLAS" (one-row products stay quantized: less to read);
- ``exp`` and ``sigmoid`` run scalar (softmax over 16x632x632: ~110 ms) while ``power(2, x)`` is
  2-2.5x faster, so softmax, sigmoid and SiLU are written with base-2 exponentials (same results
  to ~1e-7). Attention then is ``2^(s - max) @ v / sum`` instead of the fused kernel's fallback.
Parameters, keys and results are those of the MLX layers; only the evaluation differs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


LOG2E = 1.4426950408889634


def sigmoid(x: mx.array) -> mx.array:
    if not on_cpu():
        return mx.sigmoid(x)
    return 1 / (1 + mx.power(2.0, x * -LOG2E).astype(x.dtype))


def silu(x: mx.array) -> mx.array:
    return x * sigmoid(x) if on_cpu() else nn.silu(x)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention``: q (B, Hq, L, D), k/v (B, Hkv, S, D), Hq a
    multiple of Hkv; mask None, "causal" (the last L of S positions) or a bool/additive array."""
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    dtype = q.dtype
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))  # BLAS products; no half GEMM on the CPU
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    q = (q * (scale * LOG2E)).reshape(B, Hkv, rep, L, D)  # scores in base-2 units
    s = q @ k[:, :, None].swapaxes(-1, -2)  # (B, Hkv, rep, L, S)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        keep = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
        s = mx.where(keep, s, mx.array(-mx.inf, s.dtype))
    elif mask is not None:
        m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (B|1, Hq|1, L, S)
        m = m.reshape(m.shape[0], *((1, 1) if m.shape[1] == 1 else (Hkv, rep)), *m.shape[2:])
        if m.dtype == mx.bool_:
            s = mx.where(m, s, mx.array(-mx.inf, s.dtype))
        else:
            s = s + (m * LOG2E).astype(s.dtype)
    p = mx.power(2.0, s - s.max(axis=-1, keepdims=True))
    o = (p @ v[:, :, None]) / p.sum(axis=-1, keepdims=True)
    return o.reshape(B, Hq, L, D).astype(dtype)


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
        y = (weight @ x.reshape(-1, 1)).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = x @ weight.T
    return y.astype(dtype)


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


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu():
            return super().__call__(x)
        dtype = x.dtype
        if self.training or x.size == x.shape[-1]:
            # QLoRA keeps the small quantized weights in the graph; one row (decode) reads less
            # through quantized_matmul. In float32: with half inputs it is ~30x slower here.
            y = mx.quantized_matmul(x.astype(mx.float32), self["weight"], self["scales"],
                                    self.get("biases"), transpose=True,
                                    group_size=self.group_size, bits=self.bits, mode=self.mode)
        else:
            w = mx.dequantize(self["weight"], self["scales"], self.get("biases"),
                              self.group_size, self.bits, mode=self.mode)
            y = matmul_t(x, w)
        y = y.astype(dtype)
        return y + self["bias"] if "bias" in self else y
