"""One decode step of the decoder on the CPU, in numpy and compiled products.

MLX on the CPU spends ~15-80 us per evaluated op (each is handed to a worker thread), and a decode
step is ~50 small ops per layer around its 7 products: on the 2-core development machine 18 ms of
a 50 ms step of the benchmark's 16-layer decoder, against 30 ms of reading the weights. Here the
same step runs on zero-copy numpy views of the MLX weights, gathered once per layer
(``LayerStep``), reading each weight once with ``cpu.quant``'s numba kernels (quantized layers,
and the products and attention of a float decoder of at least ``quant.FLOAT_BYTES``:
``quant.pooled``; the element-wise work between them too, ``glue``) or else the bound OpenBLAS's
``sgemv`` and numpy. The KV caches stay mlx-lm's: after the layer attended to
them, the new keys and values are written with its ``update_and_fetch`` (evaluated once per step)
at the first step after a prefill, and then straight into the cache's buffers (``_store``).

The contract: ``decode_step(lm)`` returns a ``DecodeStep`` prepared once for the model's current
layers (prepared again only when they change: LoRA wrapping, quantizing, a new dtype), or None
where this step would not compute what the MLX layers compute: not on the CPU, in training, a
config field in ``FIELDS`` marked refused, or a layer that is not a plain float32 ``Linear`` /
mlx-lm ``SwitchLinear`` (or its 4/8-bit affine form that ``cpu.quant``'s kernels read), an RMS
norm, or a RoPE that ``cpu.ops.rope_tables`` can tabulate. Generation asks once per reply
(``DecodeStep.accepts`` its plain float32 ``KVCache``\\ s) and then calls it for every token;
the model's own ``__call__`` never takes this path.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable
from dataclasses import fields
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU, SwitchLinear

from . import blas, quant
from .ops import LOG2E, Linear, QuantizedLinear, gemv_numpy, np_silu, on_cpu, rope_tables

ENABLED = True  # tests and benchmarks compare against the MLX layers by switching it off

# How the step treats every field of ``TextConfig`` (tests/test_cpu.py checks that none is
# missing): "read" fields shape the arithmetic below; "refused" ones make ``prepare`` return
# None when set; "training" ones do not change a forward pass.
FIELDS = {
    "vocab_size": "read", "hidden_size": "read", "intermediate_size": "read",
    "num_hidden_layers": "read", "num_attention_heads": "read", "num_key_value_heads": "read",
    "head_dim": "read", "rms_norm_eps": "read", "max_position_embeddings": "read",
    "rope_theta": "read", "rope_scaling": "read", "rope_traditional": "read",  # via the tables
    "attention_bias": "read", "mlp_bias": "read", "tie_word_embeddings": "read",
    "num_experts": "read", "num_experts_per_tok": "read", "moe_every": "read",
    "moe_intermediate_size": "read", "shared_expert_intermediate_size": "read",
    "norm_topk_prob": "read",
    "qk_norm": "refused", "qk_norm_full": "refused",
    "router_aux_loss_coef": "training", "router_z_loss_coef": "training",
}


class ThreadChoice:
    """How many threads a decode step gives its products: all (``most``) or one, chosen by timing
    one layer of every step (the probe: ``DecodeStep`` times its last layer). The threads are
    ``cpu.quant``'s kernels' where the step runs in them (``quant.pooled``: quantized layers, or
    a large float decoder), else the bound BLAS's.

    On the quiet 2-core development VM two threads decode the benchmark's 4-bit decoder in ~19-23
    ms a token against ~31 on one, and its float32 one in ~47 against ~71. But both pools spin
    between products (the kernels' briefly, see ``mm1_mlx/__init__.py``; OpenBLAS's ~8 ms), and
    with one other busy process on the machine a 2-thread step took 70-190 ms (4-bit) and 140-220
    ms (float32), against ~31 and ~73 on one thread. The choice in use is timed at every step; the
    other one is tried on the probe layer after ``FIRST`` steps, then after twice as many each time
    it loses (at most ``LONGEST``), and takes over when it is faster than ``MARGIN`` x the median
    of the last ``RECENT`` probes of the one in use. A try costs one layer's time, not a step's
    (a whole one-thread step cost ~20 ms of a 32-token float32 reply, twice). The threads change
    no result beyond float32 rounding: each output row is summed by one thread, and on one thread
    the kernels' serial build runs (another summation order: ~1e-6 relative)."""

    FIRST, LONGEST, MARGIN, RECENT = 8, 64, 0.85, 5

    def __init__(self, most: int):
        self.most, self.current = most, most
        self.recent: list[float] = []  # seconds of the last probes with ``current``
        self.wait = self.countdown = self.FIRST

    def pick(self) -> int:
        """The thread count for the next step's probe layer (the others run on ``current``)."""
        if self.most == 1:
            return 1
        self.countdown -= 1
        return (1 if self.current == self.most else self.most) if self.countdown <= 0 \
            else self.current

    def record(self, used: int, seconds: float) -> None:
        """The time of a probe layer run with ``used`` threads (the last ``pick``)."""
        if used == self.current:
            self.recent = (self.recent + [seconds])[-self.RECENT:]
            return
        if self.recent and seconds < self.MARGIN * sorted(self.recent)[len(self.recent) // 2]:
            self.current, self.recent, self.wait = used, [seconds], self.FIRST
        else:
            self.wait = min(2 * self.wait, self.LONGEST)
        self.countdown = self.wait


def blas_settle_seconds() -> float:
    """How long the bound OpenBLAS's idle threads spin after a product before they sleep:
    2^``OPENBLAS_THREAD_TIMEOUT`` (4-30; OpenBLAS's default 28, ``import mm1_mlx`` sets 24 unless
    the user did) cycles of the time-stamp counter, taken at a low 2 GHz (8 ms at 24, 0.13 s at
    28; the development VM's threads spun ~0.1 s at 28)."""
    try:
        exponent = min(max(int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", 28)), 4), 30)
    except ValueError:
        exponent = 28
    return 2.0 ** exponent / 2e9


class LayerThreads:
    """The thread count of each layer of one step (``enter`` before each, then ``close``): one
    thread until ``until`` (``perf_counter``: BLAS's threads may still spin from a prefill), the
    probe layer on ``choice.pick()``'s count, timed for ``choice``, and the rest on
    ``choice.current``; ``close`` gives the pool back its setting, ``choice.most``."""

    def __init__(self, pool, choice: ThreadChoice, probe: int, until: float):
        self.pool, self.choice, self.probe, self.until = pool, choice, probe, until
        self.trial, self.used = choice.pick(), choice.most
        self.timing: tuple | None = None  # (threads, start) of the probe layer while it runs

    def enter(self, i: int) -> None:
        now = self._stop_timing()
        if now < self.until:
            n = 1
        elif i == self.probe:
            n, self.timing = self.trial, (self.trial, now)
        else:
            n = self.choice.current
        self._use(n)

    def close(self) -> None:
        self._stop_timing()
        self._use(self.choice.most)

    def _stop_timing(self) -> float:
        now = time.perf_counter()
        if self.timing is not None:
            self.choice.record(self.timing[0], now - self.timing[1])
            self.timing = None
        return now

    def _use(self, n: int) -> None:
        if n != self.used:
            self.pool.set_threads(n)
            self.used = n


class DecodeStep:
    """The CPU decode step of one ``decoder.LanguageModel``, prepared for its current layers.

    Right after a prompt's prefill the bound OpenBLAS's threads still spin (``blas_settle_seconds``)
    and take a core from the kernels' threads: the first 4-bit step of the benchmark's decoder
    took 60-100 ms on 2 threads against ~22 later. So where the step runs in the kernels' threads,
    the layers within that time of the first step after a prefill (a cache this step did not
    advance last) run on one thread, outside ``ThreadChoice``'s timing (a whole first step on one
    thread, as before, took ~1.6x a steady one: ~30 ms of a 32-token float32 reply)."""

    def __init__(self, lm):
        self.lm = lm
        self.pooled = quant.pooled(lm)  # products and attention in the kernels' threads
        self.glue = glue(self.pooled)
        self.layers: list[LayerStep | None] = [None] * len(lm.layers)  # built at first use
        self.head: Head | None = None
        self.threads: ThreadChoice | None = None  # for the kernels' pool, made at the first step
        self.advanced: tuple | None = None  # (weak reference to cache[0], offset) this step left
        # last: weak, as the cache would keep a reply's KV buffers alive
        self.settle_until = 0.0  # one thread until then (``perf_counter``): BLAS's threads spin

    def accepts(self, cache) -> bool:
        """Whether the step can advance ``cache`` (plain float32 mlx-lm ``KVCache``\\ s)."""
        return (cache is not None and len(cache) == len(self.lm.layers)
                and all(type(c) is KVCache and (c.keys is None or c.keys.dtype == mx.float32)
                        for c in cache))

    def embed(self, token: int) -> np.ndarray:
        """The embedding (1, 1, D) of ``token``, bit for bit ``lm.embed``'s, for ``__call__``:
        read from a float32 or quantized table without an MLX op (~5 us against ~40 for a float
        table's lookup in MLX and ~180 for a 4-bit one's)."""
        table = self.lm.model.embed_tokens
        if not 0 <= token < table.weight.shape[0]:
            row = None
        elif type(table) is nn.Embedding and table.weight.dtype == mx.float32:
            row = np.array(np.asarray(table.weight)[token])
        elif type(table) is nn.QuantizedEmbedding and quant.handles(table):
            row = quant.dequantize(table, slice(token, token + 1))
        else:
            row = None
        if row is None:  # anything else: MLX's lookup
            return np.array(self.lm.embed(mx.array([[token]])), dtype=np.float32)
        return row.reshape(1, 1, -1)

    def __call__(self, embeds, cache) -> mx.array:
        """Logits (1, 1, V) for one token's embedding (1, 1, D: MLX's or ``embed``'s),
        advancing ``cache``."""
        last, self.advanced = self.advanced, None  # None until this step completes
        continued = last is not None and last[0]() is cache[0] and last[1] == cache[0].offset
        logits = self._threaded(embeds, cache, continued)
        self.advanced = (weakref.ref(cache[0]), cache[0].offset)
        return logits

    def _threaded(self, embeds: mx.array, cache, continued: bool) -> mx.array:
        """The step, each layer on the threads ``LayerThreads`` gives it."""
        pool = quant if self.pooled else blas
        most = pool.threads()  # the caller's setting, restored after the step
        if most is None:  # no bound BLAS: numpy's products
            return self._run(embeds, cache, continued)
        if self.threads is None or self.threads.most != most:
            self.threads = ThreadChoice(most)
        if pool is quant and not continued:  # a prefill (or another caller) ran last
            self.settle_until = time.perf_counter() + blas_settle_seconds()
        layers = LayerThreads(pool, self.threads, len(self.lm.layers) - 1,
                              self.settle_until if pool is quant else 0.0)
        try:
            return self._run(embeds, cache, continued, layers.enter)
        finally:
            layers.close()

    def _run(self, embeds: mx.array, cache, continued: bool = False, enter=None) -> mx.array:
        x, lazy = np.array(embeds, dtype=np.float32).reshape(-1), False
        for i, (layer, c) in enumerate(zip(self.lm.layers, cache)):
            if enter is not None:
                enter(i)
            x, queued = self._layer(i, layer)(x, c, continued)
            lazy = lazy or queued
        if enter is not None:
            enter(len(self.lm.layers))  # the head
        if lazy:  # keys and values that went through mlx-lm's update
            mx.eval([(c.keys, c.values) for c in cache])
        if self.head is None or not self.head.current():
            self.head = Head(self.lm, self.pooled, self.glue)
        return mx.array(self.head(x))[None, None]

    def _layer(self, i: int, layer) -> LayerStep:
        s = self.layers[i]
        if s is None or not s.current(layer):
            s = self.layers[i] = LayerStep(layer, self.pooled, self.glue)
        return s


def decode_step(lm) -> DecodeStep | None:
    """``lm``'s prepared step, prepared again if its layers changed; None where it cannot run."""
    if not (ENABLED and on_cpu()) or lm.training:
        return None
    sig = signature(lm)
    cached = getattr(lm, "_cpu_decode_step", None)
    if cached is None or cached[0] != sig:
        cached = (sig, prepare(lm))
        object.__setattr__(lm, "_cpu_decode_step", cached)  # not a parameter: off the module tree
    return cached[1]


def signature(lm) -> tuple:
    """What a prepared step depends on: every layer object, its weights' dtypes, and whether
    it runs in ``cpu.quant``'s kernels' threads."""
    modules = [m for _, m in tree_flatten(lm.leaf_modules(), is_leaf=nn.Module.is_module)]
    layers = tuple((id(m), type(m), getattr(m, "weight", None) is not None and m.weight.dtype)
                   for m in modules)
    return layers, quant.pooled(lm)


def prepare(lm) -> DecodeStep | None:
    """A ``DecodeStep`` for ``lm`` if it computes what the MLX layers compute, else None."""
    if any(FIELDS[f.name] == "refused" and getattr(lm.args, f.name) for f in fields(lm.args)):
        return None
    if type(lm.model.norm) is not nn.RMSNorm or not _plain(_head(lm)):
        return None
    if not all(_layer_ok(layer) for layer in lm.layers):
        return None
    return DecodeStep(lm)


def _head(lm):
    return lm.model.embed_tokens if lm.args.tie_word_embeddings else lm.lm_head


def _layer_ok(layer) -> bool:
    """Plain projections, RMS norms, a SwiGLU (or top-k MoE) feed-forward and a tabulable RoPE."""
    at, mlp = layer.self_attn, layer.mlp
    if "q_norm" in at or not _ffn_ok(mlp):
        return False
    if not all(_projection(m) for m in (at.q_proj, at.k_proj, at.v_proj, at.o_proj)):
        return False
    if any(type(n) is not nn.RMSNorm for n in (layer.input_layernorm,
                                               layer.post_attention_layernorm)):
        return False
    return rope_tables(at.rope, at.q_proj.weight.shape[0] // at.n_heads, 1) is not None


def pack_layer(layer) -> None:
    """Give the weights a decode step streams (the layer's ``Linear`` and ``SwitchLinear`` weights,
    or their quantized forms' weights, scales and biases: q, k, v, o, gate, up, down, in that
    order) one buffer per kind of array and dtype, each array a zero-copy view into it;
    evaluates the layer (``io.materialize`` runs it layer by layer as a model loads).

    On the development VM ``sgemv`` read the per-tensor buffers ``mx.load`` makes at ~27 GB/s, one
    buffer per layer (58 MB in the benchmark decoder) at ~31 (the numpy read probe: ~32-34): its
    decode step went 40 -> 35 ms. And q, k, v (gate, up) lying end to end, the step multiplies
    them as one matrix (``Product``). Packing the lazily loaded tensors makes them temporaries, so
    memory grows by one layer at most. Views save, load and train like any array. Only these
    arrays share a buffer (not a ``Linear``'s bias or the norms, which a quantized layer keeps):
    quantizing every projection of a layer frees its float buffer."""
    groups: dict = {}
    for _, m in tree_flatten(layer.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, (nn.Linear, SwitchLinear, nn.QuantizedLinear, QuantizedSwitchLinear)):
            for name in ("weight", "scales", "biases"):
                if name in m:
                    groups.setdefault((name, m[name].dtype), []).append(m)
    for (name, _), modules in groups.items():
        buffer, start = mx.concatenate([m[name].reshape(-1) for m in modules]), 0
        for m in modules:
            a = m[name]
            m[name] = buffer[start:start + a.size].reshape(a.shape)
            start += a.size
    mx.eval(layer.parameters())


def _ffn_ok(mlp) -> bool:
    """A dense SwiGLU MLP, or a top-k MoE block of them (mlx-lm's SwitchGLU), plain weights."""
    if "switch_mlp" not in mlp:
        return "gate_proj" in mlp and all(_projection(m)
                                          for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    sw = mlp.switch_mlp
    experts = (sw.gate_proj, sw.up_proj, sw.down_proj)
    return (type(sw) is SwitchGLU and type(sw.activation) is SwiGLU
            and all(_plain(m, experts=True) for m in experts)
            and _projection(mlp.gate)
            and ("shared_expert" not in mlp
                 or (_ffn_ok(mlp.shared_expert) and _projection(mlp.shared_expert_gate))))


def _projection(layer) -> bool:
    """A plain (see ``_plain``) float or quantized ``Linear``."""
    return type(layer) in (Linear, QuantizedLinear) and _plain(layer)


FLOAT_KINDS, QUANTIZED_KINDS = (Linear, nn.Embedding), (QuantizedLinear, nn.QuantizedEmbedding)


def _plain(layer, experts: bool = False) -> bool:
    """A weight this step reads, in a layer of exactly one of these kinds (not wrapped by LoRA):
    float32 and C-contiguous (what sgemv reads) in a ``Linear`` / ``Embedding`` (``SwitchLinear``
    for ``experts``), or quantized in a form ``cpu.quant``'s kernels read."""
    if type(layer) in ((QuantizedSwitchLinear,) if experts else QUANTIZED_KINDS):
        return quant.handles(layer)
    return (type(layer) in ((SwitchLinear,) if experts else FLOAT_KINDS)
            and layer.weight.dtype == mx.float32 and np.asarray(layer.weight).flags.c_contiguous)


class Product:
    """The products of ``layers`` that share their input (q, k, v; gate, up; or one layer): one
    kernel call over all their rows where those lie end to end in one buffer (``pack_layer``),
    else one call each. One call is one dispatch, one split of the input (``quant``'s int16
    kernels) and one parallel region instead of three: ~35 us of a ~1.1 ms 4-bit layer. The
    kernels are chosen once, here (~5 us a call). Called with the input (K,), it returns each
    layer's output, plus its bias. Made once per step and layer (``LayerStep``)."""

    def __init__(self, layers, pooled: bool):
        bits = layers[0].bits if "scales" in layers[0] else None
        parts = [quant.views(m) if bits else (np.asarray(m.weight),) for m in layers]
        rows = np.cumsum([0] + [a[0].shape[0] for a in parts]).tolist()
        self.slices = [slice(a, b) for a, b in zip(rows, rows[1:])]
        self.biases = [np.asarray(m.bias) if "bias" in m else None for m in layers]
        same = all(getattr(m, "bits", None) == bits for m in layers)
        joined = [_end_to_end([p[i] for p in parts]) for i in range(len(parts[0]))]
        self.joined = same and len(layers) > 1 and all(j is not None for j in joined)
        kernels = pooled or bits is not None  # else BLAS sgemv
        self.calls = [(arrays, arrays[0].shape[0],
                       quant.builds(bits, arrays[0], arrays[1] if bits else None) if kernels
                       else None)
                      for arrays in ([tuple(joined)] if self.joined else parts)]

    def __call__(self, x: np.ndarray) -> list:
        x = np.ascontiguousarray(x, dtype=np.float32)
        build = 0 if quant.multi() else 1
        ys = []
        for arrays, n, builds in self.calls:
            if builds is None:
                ys.append(gemv_numpy(arrays[0], x))
                continue
            y = np.empty(n, np.float32)
            builds[build](*arrays, x, y)
            ys.append(y)
        if self.joined:
            ys = [ys[0][s] for s in self.slices]
        return [y if b is None else y + b for y, b in zip(ys, self.biases)]


def _end_to_end(arrays: list) -> np.ndarray | None:
    """One view of C-contiguous ``arrays`` (same dtype and row shape) that lie one after the
    other in memory, stacked along the first axis; None if they do not."""
    first = arrays[0]
    for a, b in zip(arrays, arrays[1:]):
        if not (b.dtype == first.dtype and b.shape[1:] == first.shape[1:]
                and a.flags.c_contiguous and b.flags.c_contiguous
                and b.ctypes.data == a.ctypes.data + a.nbytes):
            return None
    rows = sum(a.shape[0] for a in arrays)  # the bytes of ``arrays``, all of them valid
    return np.lib.stride_tricks.as_strided(first, (rows, *first.shape[1:]), first.strides)


def _views(cache) -> tuple | None:
    """Numpy views (1, Hkv, capacity, D) of ``cache``'s keys and values (None while empty)."""
    return None if cache.keys is None else (np.asarray(cache.keys), np.asarray(cache.values))


def _store(cache, kv: tuple | None, k: np.ndarray, v: np.ndarray, continued: bool) -> bool:
    """Append the token's keys and values (Hkv, D) to ``cache`` (``kv``: its ``_views``). On a
    cache this step advanced last (``continued``) with room left, they are written straight into
    its evaluated buffers: no MLX op (~1.8 ms of a ~25 ms 4-bit step of the benchmark's decoder
    went to 32 of them and their evaluation). Else by mlx-lm's ``update_and_fetch`` (lazy,
    evaluated once per step): True.

    Writing into an MLX buffer is safe here because only position ``offset`` changes, which no
    holder of the buffer has yet: each step after a prefill or a trim (not ``continued``) goes
    through MLX, whose update copies a buffer that another array shares (a copied cache), and
    a copy of the cache taken since sees only the positions before its own offset."""
    pos = cache.offset
    if continued and pos < kv[0].shape[2]:
        keys, values = kv
        if all(a.flags.c_contiguous and a.flags.writeable for a in (keys, values)):
            keys[0, :, pos] = k
            values[0, :, pos] = v
            cache.offset = pos + 1
            return False
    cache.update_and_fetch(mx.array(k)[None, :, None], mx.array(v)[None, :, None])
    return True  # lazy: the step evaluates them at its end


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: tuple | None, pos: int,
            scale: float, pooled: bool = False) -> np.ndarray:
    """Attention of the new token (q (Hq, D), its k/v (Hkv, D)) over the ``pos`` cached positions
    (``kv``: the cache's ``_views``) and itself, before the cache holds it: (Hq, D). In a layer
    whose products run in ``cpu.quant``'s kernels (``pooled``), on their threads too, as many as
    the step gives them (``ThreadChoice``): BLAS's own threads fought the kernels' over 2 cores
    (35 vs 49 ms a step at 2 threads), and with another busy process, BLAS's at 2 threads beside
    the kernels' at one took 185 ms a step."""
    Hkv, D = k.shape
    q = q.reshape(Hkv, -1, D) * np.float32(scale * LOG2E)  # base-2 scores
    rep = q.shape[1]
    if pooled and pos:
        keys, values = kv[0][0], kv[1][0]
        if keys.flags.c_contiguous and values.flags.c_contiguous:
            return quant.attend(q, keys, values, pos, k, v).reshape(-1, D)
    s = np.empty((Hkv, rep, pos + 1), np.float32)  # cached positions, then the new one
    s[..., pos] = (q * k[:, None]).sum(-1)
    batched = None
    if pos:  # views of the evaluated cache
        keys, values = kv
        if keys.flags.c_contiguous and values.flags.c_contiguous:
            batched = blas.sgemm_batch_strided()
        stride = keys.shape[2] * D  # one head of the (1, Hkv, capacity, D) cache
    if batched is not None:  # q k^T
        batched(101, 111, 112, rep, pos, D, 1.0, q.ctypes.data, D, rep * D,
                keys.ctypes.data, D, stride, 0.0, s.ctypes.data, pos + 1, rep * (pos + 1), Hkv)
    elif pos:
        s[..., :pos] = np.matmul(q, keys[0, :, :pos].transpose(0, 2, 1))
    s -= s.max(axis=-1, keepdims=True)
    np.exp2(s, out=s)
    o = np.zeros((Hkv, rep, D), np.float32)
    if batched is not None:  # p v over the cached positions
        batched(101, 111, 111, rep, D, pos, 1.0, s.ctypes.data, pos + 1, rep * (pos + 1),
                values.ctypes.data, D, stride, 0.0, o.ctypes.data, D, rep * D, Hkv)
    elif pos:
        o[...] = np.matmul(s[..., :pos], values[0, :, :pos])
    o += s[..., pos:] * v[:, None]
    return (o / s.sum(axis=-1, keepdims=True)).reshape(-1, D)


def _gemv(w: np.ndarray, x: np.ndarray, pooled: bool) -> np.ndarray:
    """A float weight's product: in the kernels' threads (``pooled``), else BLAS ``sgemv``."""
    return quant.gemv_float(w, x) if pooled else gemv_numpy(w, x)


class LayerStep:
    """One decoder layer's share of a decode step, gathered once from its modules: the products
    (``Product``: q|k|v, o, the feed-forward's), the norms' weights, the heads, RoPE's tables as
    numpy. ``DecodeStep`` builds it at the layer's first step and again when a module or array
    under the layer was replaced (``current``, ~3 us: by identity). Reading all this through the
    modules' attributes at every step (~0.7 us each) and the element-wise work as numpy operations
    took ~150 us a layer, ~2.5 ms of a 4-bit step of the benchmark's decoder (~17 ms); now ~65.
    It holds views of the layer's arrays until it is rebuilt, or its step is (``decode_step``
    prepares a new one when layers were replaced: quantized, LoRA-wrapped)."""

    def __init__(self, layer, pooled: bool, glue: Glue):
        at = layer.self_attn
        self.module, self.entries = layer, _entries(layer)
        self.norms = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        self.qkv = Product([at.q_proj, at.k_proj, at.v_proj], pooled)
        self.o = Product([at.o_proj], pooled)
        self.ffn = (Experts if "switch_mlp" in layer.mlp else FeedForward)(layer.mlp, pooled, glue)
        D = at.q_proj.weight.shape[0] // at.n_heads
        self.heads, self.rope, self.rope_tables = (at.n_heads, at.n_kv_heads, D), at.rope, None
        self.scale, self.pooled, self.glue = at.scale, pooled, glue

    def current(self, layer) -> bool:
        """Whether ``layer`` and everything under it are still the objects this was built from."""
        return layer is self.module and all(c[k] is v for c, k, v in self.entries)

    def __call__(self, x: np.ndarray, cache, continued: bool) -> tuple:
        """(the layer's output for ``x`` (D,), whether the cache update is lazy: ``_store``)."""
        glue, (Hq, Hkv, D) = self.glue, self.heads
        pos = cache.offset
        a, b, partner = self.tables(pos + 1)
        h = np.empty_like(x)
        glue.rms_norm(x, *self.norms[0], h)
        q, k, v = self.qkv(h)
        q, k, v = q.reshape(Hq, D), k.reshape(Hkv, D), v.reshape(Hkv, D)
        glue.rope(q, a[pos], b[pos], partner)
        glue.rope(k, a[pos], b[pos], partner)
        kv = _views(cache)
        o = _attend(q, k, v, kv, pos, self.scale, self.pooled)
        lazy = _store(cache, kv, k, v, continued)
        x = x + self.o(o.reshape(-1))[0]
        glue.rms_norm(x, *self.norms[1], h)
        return x + self.ffn(h), lazy

    def tables(self, positions: int) -> tuple:
        """RoPE's (A, B) rows for at least ``positions`` positions, as numpy views (``rope_tables``),
        and each feature's partner in its rotated pair."""
        t = self.rope_tables
        if t is None or t[0].shape[0] < positions:
            D = self.heads[2]
            a, b, swap = rope_tables(self.rope, D, positions)
            partner = np.ascontiguousarray(swap(np.arange(D)), dtype=np.intp)
            t = self.rope_tables = (np.asarray(a), np.asarray(b), partner)
        return t


class FeedForward:
    """A SwiGLU feed-forward's share of a step: gate|up as one product, then down."""

    def __init__(self, mlp, pooled: bool, glue: Glue):
        self.gate_up = Product([mlp.gate_proj, mlp.up_proj], pooled)
        self.down = Product([mlp.down_proj], pooled)
        self.silu_mul = glue.silu_mul

    def __call__(self, h: np.ndarray) -> np.ndarray:
        g, u = self.gate_up(h)
        self.silu_mul(g, u, g)
        return self.down(g)[0]


class Experts:
    """A top-k mixture of SwiGLU experts' share of a step (mlx-lm's ``SwitchGLU`` behind a
    router), plus a shared expert behind a sigmoid gate where the block has one."""

    def __init__(self, mlp, pooled: bool, glue: Glue):
        sw = mlp.switch_mlp
        self.router = Product([mlp.gate], pooled)
        self.top_k, self.renormalize = mlp.top_k, mlp.norm_topk_prob
        self.gate, self.up, self.down = (ExpertProducts(m, pooled)
                                         for m in (sw.gate_proj, sw.up_proj, sw.down_proj))
        self.shared = ((FeedForward(mlp.shared_expert, pooled, glue),
                        Product([mlp.shared_expert_gate], pooled))
                       if "shared_expert" in mlp else None)
        self.silu_mul = glue.silu_mul

    def __call__(self, h: np.ndarray) -> np.ndarray:
        logits = self.router(h)[0]
        experts = np.argpartition(-logits, self.top_k - 1)[: self.top_k]
        probs = np.exp(logits - logits.max())
        scores = probs[experts] / probs.sum()
        if self.renormalize:
            scores /= scores.sum()
        y = np.zeros_like(h)
        for e, score in zip(experts, scores):
            g = self.gate(e, h)
            self.silu_mul(g, self.up(e, h), g)
            y += score * self.down(e, g)
        if self.shared is not None:
            ffn, gate = self.shared
            y += np_silu(np.float32(1), gate(h)[0]) * ffn(h)  # a sigmoid
        return y


class ExpertProducts:
    """One projection of every expert (mlx-lm's ``SwitchLinear`` or its quantized form):
    ``(e, x)`` gives expert ``e``'s product, plus its bias."""

    def __init__(self, layer, pooled: bool):
        self.layer, self.quantized = layer, "scales" in layer
        self.weight = None if self.quantized else np.asarray(layer.weight)
        self.bias = np.asarray(layer.bias) if "bias" in layer else None
        self.pooled = pooled

    def __call__(self, e: int, x: np.ndarray) -> np.ndarray:
        if self.quantized:
            y = quant.gemv(self.layer, x, expert=e)
        else:
            y = _gemv(self.weight[e], x, self.pooled)
        return y if self.bias is None else y + self.bias[e]


class Head:
    """The final norm and the head's product (``lm_head``, or the tied embedding table)."""

    def __init__(self, lm, pooled: bool, glue: Glue):
        owner, name = (lm.model, "embed_tokens") if lm.args.tie_word_embeddings else (lm, "lm_head")
        self.entries = [(lm, "model", lm.model), *_entries(lm.model, "norm"),
                        *_entries(owner, name)]
        self.norm, self.product = _norm(lm.model.norm), Product([owner[name]], pooled)
        self.rms_norm = glue.rms_norm

    def current(self) -> bool:
        """Whether the head, the final norm and their arrays are still the ones gathered."""
        return all(c[k] is v for c, k, v in self.entries)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = np.empty_like(x)
        self.rms_norm(x, *self.norm, h)
        return self.product(h)[0]


def _entries(parent, key=None) -> list:
    """(container, key, value) for every module, array, list and dict under ``parent[key]``
    (under ``parent`` for no key), and for ``parent[key]`` itself: what a step's views and
    products were gathered from, compared by identity (``current``)."""
    if key is not None:
        value = parent[key]
        return [(parent, key, value), *_entries(value)] if isinstance(value, (dict, list)) \
            else [(parent, key, value)]
    keys = parent.keys() if isinstance(parent, dict) else range(len(parent))
    return [e for k in keys for e in _entries(parent, k)]


def _norm(norm: nn.RMSNorm) -> tuple:
    return np.asarray(norm.weight), np.float32(norm.eps)


class Glue(NamedTuple):
    """The element-wise work between a step's products, each writing its result in place
    (``rms_norm(x, w, eps, out)``, ``rope(x, a, b, partner)`` on x itself, ``silu_mul(g, u, out)``):
    ``cpu.quant``'s compiled kernels, or numpy (``glue``)."""

    rms_norm: Callable
    rope: Callable
    silu_mul: Callable


def glue(pooled: bool) -> Glue:
    """The compiled kernels in a step that runs in their threads (numba is loaded there anyway: one
    call each instead of 4-8 numpy operations); else numpy's operations, the same arithmetic."""
    k = quant.kernels() if pooled else None
    return NUMPY_GLUE if k is None else Glue(k.rms_norm, k.rope, k.silu_mul)


def _np_rms_norm(x: np.ndarray, w: np.ndarray, eps: np.float32, out: np.ndarray) -> None:
    scale = np.float32(1) / np.sqrt(np.dot(x, x) / np.float32(x.size) + eps)
    np.multiply(np.multiply(x, scale, out=out), w, out=out)


def _np_rope(x: np.ndarray, a: np.ndarray, b: np.ndarray, partner: np.ndarray) -> None:
    x[...] = x * a + x[:, partner] * b


def _np_silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    np.multiply(np_silu(g, g), u, out=out)


NUMPY_GLUE = Glue(_np_rms_norm, _np_rope, _np_silu_mul)
