"""numba kernels for the CPU decode step: products over MLX's affine-quantized weights (and over
float32 weights, ``gemv_f32``), the dequantization prefill uses, and the step's attention
(imported only by ``cpu.quant``, which checks numba is there and chooses where compiled kernels
are cached).

The layout is ``mx.quantize``'s: each row's values packed low bits first into uint32 words, read
here as bytes (little-endian: 8-bit values are the bytes themselves, a 4-bit byte holds value 2t in
its low nibble and 2t + 1 in its high one), and per group of ``K / G`` values a scale and a bias:
``w = scale * q + bias``. A row's product is ``sum_g scale_g * (q_g . x_g) + bias_g * sum(x_g)``,
the same dequantized values as MLX's, summed in another order (float32 rounding).

Three ways, by CPU and group size: on x86 with AVX2, groups of 64 (MLX's default) multiply int16
pieces of the activations by the widened weights (``gemv{4,8}_g64_i16``, ``vpmaddwd``: fewest
instructions per weight); elsewhere (ARM, older x86, ``MM1_MLX_QUANT_KERNELS=float``) groups of 64
keep float activations (``gemv{4,8}_g64``); other group sizes take the general ``gemv4`` /
``gemv8``. In the general kernels rows go four at a time (they share each load of ``x``; LLVM
vectorizes the group loop), split over the threads by ``prange``. Nibbles are cut with
``np.bitwise_and`` / ``np.right_shift`` on the bytes: numba types Python's ``&`` and ``>>`` on
small integers as int64, which LLVM vectorizes four or eight lanes wide (``vpmovzxbq`` +
``vcvtqq2ps``) instead of eight or sixteen: 1.3-1.4x slower. Each kernel compiles (or loads from
the cache) at its first call: ``cpu.quant.warm_up`` makes that call when a model whose step runs
here loads.
"""

from __future__ import annotations

import math
import platform
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


# --- groups of 64 with the activations split into two int16 pieces (x86 with AVX2) ------------
#
# On a CPU without AVX-512 ``gemv4_g64`` spends ~20 instructions on 32 weights: widening bytes to
# 32-bit lanes, converting to float and multiplying, 8 lanes at a time. Here each group's 64
# activations are split exactly enough into two int16 pieces, x = a_g * (hi + LO * lo) (a_g a
# power of two, |hi| <= 32767, |lo| <= 16384, residual <= max|x_g| * 2^-29: below float32's
# rounding of the sums), and the weights widen only to 16 bits and multiply-add in pairs
# (``vpmaddwd``, 16 per instruction) into exact int32 sums (at most 8 products of 255 * 32767 a
# lane): ~14 instructions per 32 4-bit weights, ~1.6-1.7x the float kernel's rate. Only the
# group's two sums meet floats, ``scale * (a_g * sum_hi + b_g * sum_lo)``; the bias term is the
# float kernels'.


def _avx2() -> bool:
    """Whether numba compiles for an x86 CPU with AVX2 (``NUMBA_CPU_FEATURES``, else the host)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    from numba.core import config

    return "+avx2" in (config.CPU_FEATURES or binding.get_host_cpu_features().flatten()).split(",")


INT16 = _avx2()  # whether the ``_i16`` kernels can run here (``cpu.quant`` chooses them then)
PIECES = 128  # int16 pieces of a group of 64 activations
LO = 2.0 ** -14  # the lo piece's step against the hi piece's (2^(e-29) / 2^(e-15))
_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
_BYTES16, _SHORTS16 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(_I16, 16)
_INTS8, _FLOATS8 = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)


def _splat(builder, value):
    """``value`` (float) in all 8 lanes."""
    undef = ir.Constant(_FLOATS8, ir.Undefined)
    lane0 = builder.insert_element(undef, value, _I32(0))
    return builder.shuffle_vector(lane0, undef, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _pointer(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


def _weights16(builder, row, bits, i64):
    """A group's 64 weights as four vectors of 16 int16, in the order of its pieces (``split16``):
    8-bit, the bytes in order; 4-bit, the low nibbles (even values) of its 32 bytes, then the
    high ones (odd values)."""
    def load(k):
        ptr = builder.bitcast(builder.gep(row, [i64(16 * k)]), _BYTES16.as_pointer())
        return builder.zext(builder.load(ptr, align=1), _SHORTS16)

    if bits == 8:
        return [load(k) for k in range(4)]
    halves = [load(0), load(1)]
    low, four = ir.Constant(_SHORTS16, [15] * 16), ir.Constant(_SHORTS16, [4] * 16)
    return [builder.and_(v, low) for v in halves] + [builder.lshr(v, four) for v in halves]


def _row_i16(bits):
    """Code of ``_row{bits}_i16``: a row's ``sum_g scales[sstart + g] * a[g] * (q_g . hi_g
    + LO * q_g . lo_g)`` over its ``groups`` groups of ``8 * bits`` bytes from ``w[start]``,
    ``pieces`` from ``split16`` flattened. All arrays 1-D, C-contiguous."""

    def codegen(context, builder, signature, args):
        _, start, _, _, _, sstart, groups = args
        wp, xp, ap, sp = (_pointer(context, builder, signature.args[i], args[i])
                          for i in (0, 2, 3, 4))
        madd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_INTS8, [_SHORTS16, _SHORTS16]),
            "llvm.x86.avx2.pmadd.wd")
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_FLOATS8, [_FLOATS8] * 3), "llvm.fma.v8f32")
        acc = cgutils.alloca_once_value(builder, ir.Constant(_FLOATS8, [0.0] * 8))
        i64 = groups.type
        with cgutils.for_range(builder, groups) as loop:
            g = loop.index
            q = _weights16(builder, builder.gep(wp, [builder.add(start, builder.mul(g, i64(8 * bits)))]),
                           bits, i64)
            xs = builder.gep(xp, [builder.mul(g, i64(PIECES))])

            def dot(first):  # q_g . (the hi or lo piece): 8 int32 lanes, exact
                total = None
                for k in range(4):
                    ptr = builder.bitcast(builder.gep(xs, [i64(16 * (first + k))]),
                                          _SHORTS16.as_pointer())
                    part = builder.call(madd, [q[k], builder.load(ptr, align=2)])
                    total = part if total is None else builder.add(total, part)
                return builder.sitofp(total, _FLOATS8)

            scale = builder.load(builder.gep(sp, [builder.add(sstart, g)]))
            factor = builder.fmul(scale, builder.load(builder.gep(ap, [g])))
            both = builder.call(fma, [dot(4), ir.Constant(_FLOATS8, [LO] * 8), dot(0)])
            builder.store(builder.call(fma, [both, _splat(builder, factor), builder.load(acc)]), acc)
        lanes = builder.load(acc)
        total = builder.extract_element(lanes, _I32(0))
        for j in range(1, 8):
            total = builder.fadd(total, builder.extract_element(lanes, _I32(j)))
        return total

    return codegen


@intrinsic
def _row4_i16(typingctx, w, start, pieces, a, scales, sstart, groups):
    return types.float32(w, start, pieces, a, scales, sstart, groups), _row_i16(4)


@intrinsic
def _row8_i16(typingctx, w, start, pieces, a, scales, sstart, groups):
    return types.float32(w, start, pieces, a, scales, sstart, groups), _row_i16(8)


@njit(**_INLINE)
def split16(x, nibbles):
    """``x`` (K,) as two int16 pieces per group of 64 (see above): pieces (K / 64, 128), the
    group's hi then lo piece, each in the order ``_weights16`` gives the weights (``nibbles``:
    even positions, then odd); the powers of two ``a`` (K / 64,; the lo piece's are ``LO * a``),
    and each group's float32 sum (the bias term's). A group with an inf or nan gets a nan factor
    (its rows' products are nan, as in float); one under 2^-112 throughout, zero pieces."""
    G = x.size // 64
    pieces = np.zeros((G, PIECES), np.int16)
    a, sums = np.zeros(G, np.float32), np.empty(G, np.float32)
    for g in range(G):
        top, total = np.float32(0), np.float32(0)
        for i in range(64):
            v = x[64 * g + i]
            top = max(top, abs(v))
            total += v
        sums[g] = total
        if not np.isfinite(top) or not np.isfinite(total):
            a[g] = np.float32(np.nan)
            continue
        _, e = math.frexp(top)  # top < 2^e
        if e < -111:  # 2^(15 - e) would overflow float32; a group this small adds nothing
            continue
        a[g] = np.float32(math.ldexp(1.0, e - 15))
        up = np.float32(math.ldexp(1.0, 15 - e))  # 1 / a[g]: scalings by powers of two are exact
        for i in range(64):
            v = x[64 * g + i] * up  # |v| < 2^15
            hi = min(max(np.rint(v), np.float32(-32767)), np.float32(32767))
            at = (i & 1) * 32 + (i >> 1) if nibbles else i
            pieces[g, at] = np.int16(hi)
            pieces[g, 64 + at] = np.int16(np.rint((v - hi) * np.float32(1 / LO)))
    return pieces, a, sums


@njit(**_OPTIONS)
def gemv4_g64_i16(w, scales, biases, x, out):
    """``gemv4_g64`` with int16 activations (``split16``), for CPUs with AVX2; blocks of
    ``BLOCK`` rows per thread. (The prefetching that helps the float kernel slowed this one.)"""
    N, B = w.shape
    G = B // PER64
    pieces, a, sums = split16(x, True)
    flat, flat_pieces, flat_scales = w.reshape(-1), pieces.reshape(-1), scales.reshape(-1)
    for blk in prange((N + BLOCK - 1) // BLOCK):
        for n in range(blk * BLOCK, min(N, blk * BLOCK + BLOCK)):
            t = np.float32(0)
            for g in range(G):
                t += biases[n, g] * sums[g]
            out[n] = t + _row4_i16(flat, n * B, flat_pieces, a, flat_scales, n * G, G)


@njit(**_OPTIONS)
def gemv8_g64_i16(w, scales, biases, x, out):
    """``gemv8_g64`` with int16 activations, as ``gemv4_g64_i16``. (Two kernels, not one with
    the width read from the shapes: that one's branch cost 0.9x at 8 bits, 0.75x with the row in
    an inline helper, interleaved.)"""
    N, K = w.shape
    G = K // 64
    pieces, a, sums = split16(x, False)
    flat, flat_pieces, flat_scales = w.reshape(-1), pieces.reshape(-1), scales.reshape(-1)
    for blk in prange((N + BLOCK - 1) // BLOCK):
        for n in range(blk * BLOCK, min(N, blk * BLOCK + BLOCK)):
            t = np.float32(0)
            for g in range(G):
                t += biases[n, g] * sums[g]
            out[n] = t + _row8_i16(flat, n * K, flat_pieces, a, flat_scales, n * G, G)


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
def gemv_f32(w, x, out):
    """out = W x for float32 W (N, K), C-contiguous: one row an iteration (LLVM vectorizes its
    sum), the rows split over the threads. The float decode step's products, on the same threads
    as the quantized kernels and the attention: ~31 GB/s at 2 threads and ~24 at one on the
    development VM (AVX2 code), against ~23-26 and ~16 for OpenBLAS's ``sgemv``, whose own
    thread pool wakes and syncs for each of a step's ~113 products."""
    N, K = w.shape
    for n in prange(N):
        row = w[n]
        total = np.float32(0)
        for k in range(K):
            total += row[k] * x[k]
        out[n] = total


# prefill's dequantization: in the calling thread (it runs between BLAS products, whose idle
# threads spin on the other cores for ~6-8 ms: a parallel build ran ~1.2x slower there than this
# one), and without fast-math's contraction: a multiply, then an add, so every value is bit for
# bit what ``mx.dequantize`` gives (a fused multiply-add rounds once, ~1 ulp off for half of them)
_DEQUANTIZE = dict(_OPTIONS, parallel=False,
                   fastmath={"nnan", "ninf", "nsz", "arcp", "afn", "reassoc"})


@njit(**_DEQUANTIZE)
def dequantize4(w, scales, biases, out):
    """out (N, K) = scale * q + bias for 4-bit w (N, K / 2) bytes. Each row's bytes are first
    spread into 16-bit words, low nibble in the low byte and high nibble in the high one, so that
    those words' bytes (little-endian, as everywhere here) are the values in order: the group loop
    then reads bytes and writes floats contiguously, and LLVM vectorizes both loops (writing the
    two nibbles of a byte to interleaved places did not vectorize: ~1.1-1.4x slower)."""
    N, B = w.shape
    G = scales.shape[1]
    per = 2 * B // G  # values a group
    spread = np.empty(B, np.uint16)
    values = spread.view(np.uint8)
    low, high, four = np.uint16(15), np.uint16(240), np.uint16(4)
    for n in range(N):
        row, o = w[n], out[n]
        for t in range(B):
            b = np.uint16(row[t])
            spread[t] = np.bitwise_or(np.bitwise_and(b, low),
                                      np.left_shift(np.bitwise_and(b, high), four))
        for g in range(G):
            s, c, base = scales[n, g], biases[n, g], g * per
            for i in range(per):  # from the group's start: a range(start, end) did not vectorize
                o[base + i] = s * np.float32(values[base + i]) + c


@njit(**_DEQUANTIZE)
def dequantize8(w, scales, biases, out):
    """out (N, K) = scale * q + bias for 8-bit w (N, K) bytes."""
    N, K = w.shape
    G = scales.shape[1]
    per = K // G
    for n in range(N):
        row, o = w[n], out[n]
        for g in range(G):
            s, c, base = scales[n, g], biases[n, g], g * per
            for i in range(per):
                o[base + i] = s * np.float32(row[base + i]) + c


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 ``bits`` (a bitcast, which LLVM vectorizes)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


# Cephes' exp2f: 2^f = 1 + f P(f) on [-1/2, 1/2], within ~1e-7 relative
_P0, _P1, _P2 = np.float32(1.535336188319500e-4), np.float32(1.339887440266574e-3), \
    np.float32(9.618437357674640e-3)
_P3, _P4, _P5 = np.float32(5.550332471162809e-2), np.float32(2.402264791363012e-1), \
    np.float32(6.931472028550421e-1)


@njit(**_INLINE)
def _exp2_nonpositive(x):
    """2^x for x <= 0 (a softmax's shifted scores): 2^f for the remainder f to the nearest
    integer n, by Cephes' polynomial, times 2^n made from its bits. Within ~1e-7 relative of
    libm's exp2 down to 2^-126; below that it gives ~2^-126 (nothing, beside a sum that holds a
    1). Unlike the call to libm, LLVM vectorizes it: ~2x faster over a row of scores."""
    x = max(x, np.float32(-126))
    n = np.round(x)
    f = x - n
    p = np.float32(1) + f * (((((_P0 * f + _P1) * f + _P2) * f + _P3) * f + _P4) * f + _P5)
    return p * _float_from_bits(np.left_shift(np.int32(n + np.float32(127)), np.int32(23)))


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
                s[p] = _exp2_nonpositive(s[p] - top)
                total += s[p]
            acc = np.zeros(D, np.float32)
            for p in range(pos):
                w = s[p]
                for d in range(D):
                    acc[d] += w * values[h, p, d]
            for d in range(D):
                out[h, r, d] = (acc[d] + s[pos] * v[h, d]) / total


# The element-wise work between a step's products (norms, RoPE, SwiGLU): one compiled call each
# instead of 4-8 numpy operations of ~1 us. No threads (a few thousand values), nothing returned
# (a returned array is boxed again: ~1 us a call). Fast-math, but not the flags that assume no
# inf: SwiGLU's 2^big is inf on purpose (x / inf = 0, sigmoid's limit).
_GLUE = dict(_OPTIONS, parallel=False, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
_LOG2E = np.float32(-1.4426950408889634)  # -log2(e): sigmoid(z) = 1 / (1 + 2^(-z log2 e))


@njit(**_GLUE)
def rms_norm(x, w, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * w for float32 ``x``, ``w`` (D,), float32 ``eps``."""
    total = np.float32(0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    r = np.float32(1) / np.sqrt(total / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = x[i] * r * w[i]


@njit(**_GLUE)
def rope(x, a, b, partner):
    """Rotate each row of ``x`` (R, D) in place: x[j] a[j] + x[partner[j]] b[j] (``cpu.ops``' tables
    at one position, and each feature's partner in its rotated pair)."""
    R, D = x.shape
    row = np.empty(D, np.float32)
    for r in range(R):
        for j in range(D):
            row[j] = x[r, j] * a[j] + x[r, partner[j]] * b[j]
        for j in range(D):
            x[r, j] = row[j]


@njit(**_GLUE)
def silu_mul(g, u, out):
    """out = silu(g) * u (SwiGLU), silu(g) = g / (1 + 2^(-g log2 e)); ``out`` may be ``g``."""
    for i in range(g.shape[0]):
        out[i] = g[i] / (np.float32(1) + np.exp2(g[i] * _LOG2E)) * u[i]


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
gemv4_g64_i16_serial = _serial(gemv4_g64_i16)
gemv8_g64_i16_serial = _serial(gemv8_g64_i16)
gemv8_serial = _serial(gemv8)
gemv8_g64_serial = _serial(gemv8_g64)
gemv_f32_serial = _serial(gemv_f32)
attend_serial = _serial(attend)
