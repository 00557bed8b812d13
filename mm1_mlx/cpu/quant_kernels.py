"""numba kernels over MLX's affine-quantized weights, and the attention of a decode step that
uses them (imported only by ``cpu.quant``, which checks numba is there and chooses where compiled
kernels are cached).

The layout is ``mx.quantize``'s: each row's values packed low bits first into uint32 words, read
here as bytes (little-endian: 8-bit values are the bytes themselves, a 4-bit byte holds value 2t in
its low nibble and 2t + 1 in its high one), and per group of ``K / G`` values a scale and a bias:
``w = scale * q + bias``. A row's product is ``sum_g scale_g * (q_g . x_g) + bias_g * sum(x_g)``,
the same dequantized values as MLX's, summed in another order (float32 rounding).

Rows go four at a time (they share each load of ``x``; LLVM vectorizes the group loop), split
over the threads by ``prange``. Nibbles are cut with ``np.bitwise_and`` / ``np.right_shift`` on the
bytes: numba types Python's ``&`` and ``>>`` on small integers as int64, which LLVM vectorizes four
or eight lanes wide (``vpmovzxbq`` + ``vcvtqq2ps``) instead of eight or sixteen: 1.3-1.4x slower.
Each kernel compiles (or loads from the cache) at its first call: ``cpu.quant.warm_up`` makes
that call when a quantized model loads, for the bit widths it has.
"""

from __future__ import annotations

from types import FunctionType

import numpy as np
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_OPTIONS = dict(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy",
                boundscheck=False)
ROWS = 4  # rows per block
_INLINE = dict(_OPTIONS, parallel=False, inline="always")
AHEAD = 8192  # bytes: how far ahead of the rows being read ``gemv4_g64`` asks for the weights
_PREFETCH = "llvm.prefetch.p0" if binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask the CPU to start loading the cache line of ``arr[index]`` (a 1-D array; a hint: it
    never faults). The hardware prefetcher alone left the 4-bit kernel waiting on memory for
    ~20% of its time: it reads 512-byte rows, too short a stream for it to run far enough ahead."""

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), _PREFETCH)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])  # read, keep, data
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@njit(**_INLINE)
def _lo(b, low):
    """The low nibble of byte ``b`` as float32 (uint8 arithmetic: see the module docstring)."""
    return np.float32(np.bitwise_and(b, low))


@njit(**_INLINE)
def _hi(b, four):
    return np.float32(np.right_shift(b, four))


@njit(**_OPTIONS)
def gemv4(w, scales, biases, x, out):
    """out = W x for 4-bit W: w (N, K / 2) bytes, scales and biases (N, G), x (K,)."""
    N, B = w.shape
    G = scales.shape[1]
    per = B // G  # bytes per group
    xe, xo = np.ascontiguousarray(x[0::2]), np.ascontiguousarray(x[1::2])
    sums = (xe + xo).reshape(G, per).sum(axis=1)
    low, four = np.uint8(15), np.uint8(4)
    for blk in prange((N + ROWS - 1) // ROWS):
        n0 = blk * ROWS
        if n0 + ROWS > N:  # the last rows, one by one
            for n in range(n0, N):
                total = np.float32(0)
                for g in range(G):
                    a = np.float32(0)
                    for i in range(per):
                        t = g * per + i
                        b = w[n, t]
                        a += _lo(b, low) * xe[t] + _hi(b, four) * xo[t]
                    total += scales[n, g] * a + biases[n, g] * sums[g]
                out[n] = total
            continue
        r0, r1, r2, r3 = w[n0], w[n0 + 1], w[n0 + 2], w[n0 + 3]
        t0 = t1 = t2 = t3 = np.float32(0)
        for g in range(G):
            lo = g * per
            a0 = a1 = a2 = a3 = np.float32(0)
            for i in range(per):  # from 0: numba's negative-index check then vectorizes
                t = lo + i
                e, o = xe[t], xo[t]
                b0, b1, b2, b3 = r0[t], r1[t], r2[t], r3[t]
                a0 += _lo(b0, low) * e + _hi(b0, four) * o
                a1 += _lo(b1, low) * e + _hi(b1, four) * o
                a2 += _lo(b2, low) * e + _hi(b2, four) * o
                a3 += _lo(b3, low) * e + _hi(b3, four) * o
            s = sums[g]
            t0 += scales[n0, g] * a0 + biases[n0, g] * s
            t1 += scales[n0 + 1, g] * a1 + biases[n0 + 1, g] * s
            t2 += scales[n0 + 2, g] * a2 + biases[n0 + 2, g] * s
            t3 += scales[n0 + 3, g] * a3 + biases[n0 + 3, g] * s
        out[n0], out[n0 + 1], out[n0 + 2], out[n0 + 3] = t0, t1, t2, t3


@njit(**_INLINE)
def _prefetch_rows(flat, flat_scales, flat_biases, n0, B, G):
    """Ask for rows ``n0`` and ``n0 + 1`` of ``AHEAD`` bytes on (``B`` bytes a row), and for their
    scales and biases (``G`` a row) as many rows ahead."""
    ahead = n0 * B + AHEAD
    for c in range(0, min(2 * B, flat.size - ahead), 64):  # two rows' cache lines
        _prefetch(flat, ahead + c)
    ahead = n0 * G + AHEAD * G // B
    for c in range(0, min(2 * G, flat_scales.size - ahead), 16):
        _prefetch(flat_scales, ahead + c)
        _prefetch(flat_biases, ahead + c)


PER64 = 32  # bytes in a 4-bit group of 64 values (MLX's default group size)
BLOCK = 64  # rows per parallel block of ``gemv4_g64``


@njit(**_OPTIONS)
def gemv4_g64(w, scales, biases, x, out):
    """``gemv4`` for groups of 64 values, ~1.4x faster: the group loop has a literal trip count,
    each row keeps 32 lanes of scaled partial sums across its groups, reduced once per row
    (``gemv4`` reduces every group's sum to a scalar: at 32 bytes a group, those horizontal sums
    cost as much as the products), and the rows ``AHEAD`` bytes on are prefetched. Rows go two
    at a time, blocks of ``BLOCK`` rows per thread."""
    N, B = w.shape
    G = B // PER64
    flat, flat_scales, flat_biases = w.reshape(-1), scales.reshape(-1), biases.reshape(-1)
    xe, xo = np.ascontiguousarray(x[0::2]), np.ascontiguousarray(x[1::2])
    sums = (xe + xo).reshape(G, PER64).sum(axis=1)
    low, four = np.uint8(15), np.uint8(4)
    for blk in prange((N + BLOCK - 1) // BLOCK):
        acc = np.zeros((2, PER64), np.float32)
        end = min(N, blk * BLOCK + BLOCK)
        for n0 in range(blk * BLOCK, end, 2):
            n1 = min(n0 + 1, end - 1)  # an odd last row is computed twice, written once
            _prefetch_rows(flat, flat_scales, flat_biases, n0, B, G)
            r0, r1 = w[n0], w[n1]
            acc[:] = 0
            t0 = t1 = np.float32(0)
            for g in range(G):
                lo = g * PER64
                s0, s1 = scales[n0, g], scales[n1, g]
                for i in range(PER64):
                    t = lo + i
                    e, o = xe[t], xo[t]
                    b0, b1 = r0[t], r1[t]
                    acc[0, i] += s0 * (_lo(b0, low) * e + _hi(b0, four) * o)
                    acc[1, i] += s1 * (_lo(b1, low) * e + _hi(b1, four) * o)
                s = sums[g]
                t0 += biases[n0, g] * s
                t1 += biases[n1, g] * s
            out[n1] = t1 + acc[1].sum()
            out[n0] = t0 + acc[0].sum()


@njit(**_OPTIONS)
def gemv8(w, scales, biases, x, out):
    """out = W x for 8-bit W: w (N, K) bytes, scales and biases (N, G), x (K,)."""
    N, K = w.shape
    G = scales.shape[1]
    per = K // G
    sums = x.reshape(G, per).sum(axis=1)
    for blk in prange((N + ROWS - 1) // ROWS):
        n0 = blk * ROWS
        if n0 + ROWS > N:
            for n in range(n0, N):
                total = np.float32(0)
                for g in range(G):
                    a = np.float32(0)
                    for i in range(per):
                        k = g * per + i
                        a += np.float32(w[n, k]) * x[k]
                    total += scales[n, g] * a + biases[n, g] * sums[g]
                out[n] = total
            continue
        r0, r1, r2, r3 = w[n0], w[n0 + 1], w[n0 + 2], w[n0 + 3]
        t0 = t1 = t2 = t3 = np.float32(0)
        for g in range(G):
            lo = g * per
            a0 = a1 = a2 = a3 = np.float32(0)
            for i in range(per):
                k = lo + i
                v = x[k]
                a0 += np.float32(r0[k]) * v
                a1 += np.float32(r1[k]) * v
                a2 += np.float32(r2[k]) * v
                a3 += np.float32(r3[k]) * v
            s = sums[g]
            t0 += scales[n0, g] * a0 + biases[n0, g] * s
            t1 += scales[n0 + 1, g] * a1 + biases[n0 + 1, g] * s
            t2 += scales[n0 + 2, g] * a2 + biases[n0 + 2, g] * s
            t3 += scales[n0 + 3, g] * a3 + biases[n0 + 3, g] * s
        out[n0], out[n0 + 1], out[n0 + 2], out[n0 + 3] = t0, t1, t2, t3


@njit(**_OPTIONS)
def gemv8_g64(w, scales, biases, x, out):
    """``gemv8`` for groups of 64 values, as ``gemv4_g64`` is for 4 bits: 64 lanes of scaled
    partial sums per row across its groups (one horizontal sum a row, not one a group), rows two
    at a time, the rows ``AHEAD`` bytes on prefetched, blocks of ``BLOCK`` rows per thread."""
    N, K = w.shape
    G = K // 64
    flat, flat_scales, flat_biases = w.reshape(-1), scales.reshape(-1), biases.reshape(-1)
    sums = x.reshape(G, 64).sum(axis=1)
    for blk in prange((N + BLOCK - 1) // BLOCK):
        acc = np.zeros((2, 64), np.float32)
        end = min(N, blk * BLOCK + BLOCK)
        for n0 in range(blk * BLOCK, end, 2):
            n1 = min(n0 + 1, end - 1)  # an odd last row is computed twice, written once
            _prefetch_rows(flat, flat_scales, flat_biases, n0, K, G)
            r0, r1 = w[n0], w[n1]
            acc[:] = 0
            t0 = t1 = np.float32(0)
            for g in range(G):
                lo = g * 64
                s0, s1 = scales[n0, g], scales[n1, g]
                for i in range(64):
                    v = x[lo + i]
                    acc[0, i] += s0 * (np.float32(r0[lo + i]) * v)
                    acc[1, i] += s1 * (np.float32(r1[lo + i]) * v)
                s = sums[g]
                t0 += biases[n0, g] * s
                t1 += biases[n1, g] * s
            out[n1] = t1 + acc[1].sum()
            out[n0] = t0 + acc[0].sum()


@njit(**_OPTIONS)
def dequantize4(w, scales, biases, out):
    """out (N, K) = scale * q + bias for 4-bit w (N, K / 2) bytes."""
    N, B = w.shape
    G = scales.shape[1]
    per = B // G
    low, four = np.uint8(15), np.uint8(4)
    for n in prange(N):
        for g in range(G):
            s, c = scales[n, g], biases[n, g]
            for i in range(per):
                t = g * per + i
                b = w[n, t]
                out[n, 2 * t] = s * _lo(b, low) + c
                out[n, 2 * t + 1] = s * _hi(b, four) + c


@njit(**_OPTIONS)
def dequantize8(w, scales, biases, out):
    """out (N, K) = scale * q + bias for 8-bit w (N, K) bytes."""
    N, K = w.shape
    G = scales.shape[1]
    per = K // G
    for n in prange(N):
        for g in range(G):
            s, c = scales[n, g], biases[n, g]
            for i in range(per):
                k = g * per + i
                out[n, k] = s * np.float32(w[n, k]) + c


@njit(**_OPTIONS)
def attend(q, keys, values, pos, k, v, out):
    """One new token's attention for a decode step whose products run in these kernels: ``q``
    (Hkv, rep, D) pre-scaled to base-2 scores, the cache's first ``pos`` positions of ``keys`` /
    ``values`` (Hkv, capacity, D), the token's own ``k`` / ``v`` (Hkv, D); ``out`` (Hkv, rep, D).
    Heads go over the threads: BLAS's batched products here brought BLAS's thread pool into the
    step, which spun on the cores the next kernel needed (3.5 ms a layer at 2 threads, not 1)."""
    Hkv, rep, D = q.shape
    for h in prange(Hkv):
        s = np.empty(pos + 1, np.float32)
        for r in range(rep):
            for p in range(pos):
                a = np.float32(0)
                for d in range(D):
                    a += q[h, r, d] * keys[h, p, d]
                s[p] = a
            a = np.float32(0)
            for d in range(D):
                a += q[h, r, d] * k[h, d]
            s[pos] = a
            top = s.max()
            total = np.float32(0)
            for p in range(pos + 1):
                s[p] = np.exp2(s[p] - top)
                total += s[p]
            acc = np.zeros(D, np.float32)
            for p in range(pos):
                w = s[p]
                for d in range(D):
                    acc[d] += w * values[h, p, d]
            for d in range(D):
                out[h, r, d] = (acc[d] + s[pos] * v[h, d]) / total


# small weights (a tiny model, a router), and every product of a step given one thread, run in the
# calling thread: waking the pool for a small one costs more than it saves, and on one thread the
# serial build is ~15% faster than the parallel one
_SERIAL = dict(_OPTIONS, parallel=False)


def _serial(kernel):
    """``kernel`` compiled without threads, as a copy of its Python function under its own name:
    numba's cache keys a function by its name and bytecode, not by ``parallel``, so the two builds
    of one function loaded each other's code (a "serial" kernel ran on every thread)."""
    py = kernel.py_func
    copy = FunctionType(py.__code__, py.__globals__, py.__name__ + "_serial", py.__defaults__,
                        py.__closure__)
    copy.__qualname__ = copy.__name__
    return njit(**_SERIAL)(copy)


gemv4_serial = _serial(gemv4)
gemv4_g64_serial = _serial(gemv4_g64)
gemv8_serial = _serial(gemv8)
gemv8_g64_serial = _serial(gemv8_g64)
dequantize4_serial = _serial(dequantize4)
dequantize8_serial = _serial(dequantize8)
attend_serial = _serial(attend)
