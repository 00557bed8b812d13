"""MLX's CPU backend made fast (Linux); on Metal none of this runs and MLX's own ops do.

``blas`` binds a portable OpenBLAS before MLX loads; ``ops`` holds the layer-level fast paths
(attention, RoPE, activations, ``Linear``); ``step`` is one decode step of the decoder in numpy
and BLAS, prepared once per model; ``quant`` / ``quant_kernels`` read 4/8-bit weights in numba.
Nothing here is imported at package import time: ``blas`` must load before ``mlx.core``.
"""
