"""Linear layers with fast paths for MLX's CPU backend (Linux); unchanged behaviour on Metal.

Measured on the 2-core development machine (see ``benchmarks/``): with OpenBLAS bound, a one-row
product written ``w @ x`` reads the weight 3-5x faster than ``x @ w.T`` (the orientation
``nn.Linear`` uses), and ``quantized_matmul`` runs at ~1 GB/s, so a quantized layer is faster on
the CPU as "dequantize, then the BLAS product". Parameters, keys and results are those of
``nn.Linear`` / ``nn.QuantizedLinear``; only the evaluation order differs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def matmul_t(x: mx.array, weight: mx.array) -> mx.array:
    """``x @ weight.T``; one row (a decode step) runs as the faster GEMV ``weight @ x`` on the CPU."""
    if x.size == x.shape[-1] and on_cpu():
        return (weight @ x.reshape(-1, 1)).reshape(*x.shape[:-1], weight.shape[0])
    return x @ weight.T


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
        if self.training or not on_cpu():  # QLoRA keeps the small quantized weights in the graph
            return super().__call__(x)
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size,
                          self.bits, mode=self.mode)
        y = matmul_t(x, w.astype(x.dtype))
        return y + self["bias"] if "bias" in self else y
