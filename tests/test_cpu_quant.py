"""The numba kernels over MLX's quantized weights (``mm1_mlx/cpu/quant.py``): products and
dequantized weights equal MLX's, the decode step with them gives MLX's own quantized model's
tokens, and everything falls back to MLX's kernels without them."""

import mm1_mlx  # noqa: F401, I001  (binds BLAS before mlx.core)

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from mm1_mlx.cpu import blas
from mm1_mlx.cpu import ops as cpu_ops
from mm1_mlx.cpu import quant as cpu_quant
from mm1_mlx.cpu import step as cpu_step
from mm1_mlx.cpu.ops import Linear, on_cpu
from mm1_mlx.models.config import TextConfig
from mm1_mlx.models.decoder import LanguageModel

pytestmark = pytest.mark.skipif(not on_cpu() or cpu_quant.kernels() is None,
                                reason="needs the CPU and numba (cpu_quant's kernels)")
SETTINGS = [(bits, group) for bits in (4, 8) for group in (32, 64, 128)]
# the kernels' two ways with groups of 64: int16 pieces of the activations (x86 with AVX2) and
# float activations (every other CPU, and MM1_MLX_QUANT_KERNELS=float); other groups: float
NEEDS_AVX2 = pytest.mark.skipif(cpu_quant.kernels() is None or not cpu_quant.kernels().INT16,
                                reason="needs x86 with AVX2")
ACTIVATIONS = [pytest.param(True, id="int16", marks=NEEDS_AVX2), pytest.param(False, id="float")]
KERNELS = [pytest.param(bits, group, int16, id=f"{bits}-{group}-{'int16' if int16 else 'float'}",
                        marks=NEEDS_AVX2 if int16 else ())
           for bits, group in SETTINGS for int16 in ((True, False) if group == 64 else (False,))]


def _quantized_linear(n, k, bits, group, seed=0, bias=False):
    mx.random.seed(seed)
    lin = Linear(k, n, bias=bias)
    lin.weight = mx.random.normal((n, k)) * 0.05 + 0.01  # off-centre: biases matter
    q = lin.to_quantized(group, bits)
    q.eval()  # inference: the kernels' products (training keeps MLX's, for QLoRA)
    mx.eval(q.parameters())
    return q


@pytest.mark.parametrize("rows", [70, 67])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("bits,group,int16", KERNELS)
def test_gemv_and_dequantize_equal_mlx(bits, group, int16, parallel, rows, monkeypatch):
    monkeypatch.setattr(cpu_quant, "INT16", int16)
    # both kernels: split over the cores (large weights) and in the calling thread (small ones);
    # 70 rows: 17 blocks of four and 2 left over, or a block of 64 and 6; 67: an odd last row
    monkeypatch.setattr(cpu_quant, "PARALLEL_BYTES", 0 if parallel else 1 << 40)
    q = _quantized_linear(rows, 384, bits, group)
    args = (q.weight, q.scales, q.biases)
    x = mx.random.normal((384,), key=mx.random.key(1))
    want = mx.quantized_matmul(x[None], *args, transpose=True, group_size=group, bits=bits)[0]
    got = cpu_quant.gemv(q, np.array(x))
    np.testing.assert_allclose(got, np.array(want), rtol=2e-5, atol=2e-5)
    w = np.array(mx.dequantize(*args, group_size=group, bits=bits))
    assert np.array_equal(cpu_quant.dequantize(q), w)  # bit for bit
    assert np.array_equal(cpu_quant.dequantize(q, slice(3, 9)), w[3:9])
    out = np.full((6, 384), np.nan, np.float32)
    cpu_quant.dequantize(q, slice(60, 66), out=out)
    assert np.array_equal(out, w[60:66])


def test_int16_pieces_rebuild_the_activations():
    # x = a * hi + b * lo per group of 64, to within max|x_g| * 2^-29 (below float32 rounding of
    # the sums); groups of zeros, tiny values and a dynamic range of 2^40 included
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(64 * 6) * 2.0 ** rng.integers(-20, 20, 64 * 6)).astype(np.float32)
    x[64:128] = 0
    x[128:192] *= np.float32(1e-38)
    for nibbles in (True, False):
        pieces, a, sums = cpu_quant.kernels().split16(x, nibbles)
        b = a * np.float32(cpu_quant.kernels().LO)
        assert pieces.dtype == np.int16 and pieces.shape == (6, 128)
        hi, lo = np.empty((6, 64)), np.empty((6, 64))
        if nibbles:  # even positions, then odd
            hi[:, 0::2], hi[:, 1::2], lo[:, 0::2], lo[:, 1::2] = np.split(pieces, 4, axis=1)
        else:
            hi, lo = np.split(pieces, 2, axis=1)
        rebuilt = a[:, None].astype(np.float64) * hi + b[:, None].astype(np.float64) * lo
        top = np.abs(x.reshape(6, 64)).max(1, keepdims=True).astype(np.float64)
        assert (np.abs(rebuilt - x.reshape(6, 64)) <= top * 2.0 ** -29).all()
        assert (rebuilt[1] == 0).all()
        assert (np.abs(pieces[:, :64]) <= 32767).all() and (np.abs(pieces[:, 64:]) <= 16384).all()
        np.testing.assert_allclose(sums, x.reshape(6, 64).sum(1), rtol=1e-5)
    # under 2^-112 throughout: zero pieces (their steps' reciprocals would overflow float32)
    pieces, a, _ = cpu_quant.kernels().split16(np.full(64, 1e-36, np.float32), True)
    assert not pieces.any() and a[0] == 0


@NEEDS_AVX2
@pytest.mark.parametrize("bits", [4, 8])
def test_int16_kernel_passes_inf_and_nan_on_as_float_does(bits):
    q = _quantized_linear(8, 256, bits, 64)
    x = np.ones(256, np.float32)
    x[70] = np.nan
    assert np.isnan(cpu_quant.gemv(q, x)).all()
    x[70] = np.inf
    assert not np.isfinite(cpu_quant.gemv(q, x)).any()


QEMU = shutil.which("qemu-x86_64")
EMULATED = """
import json, mm1_mlx, numpy as np, mlx.core as mx
from mm1_mlx.cpu import quant
from mm1_mlx.cpu.ops import Linear
out = {"int16": bool(quant.kernels().INT16)}
mx.random.seed(0)
x = mx.random.normal((256,))
for bits in (4, 8):
    q = Linear(256, 40).to_quantized(64, bits)
    w, s, b = quant.views(q)
    want = mx.quantized_matmul(x[None], q.weight, q.scales, q.biases, transpose=True,
                               group_size=64, bits=bits)[0]
    got = quant.gemv(q, np.array(x))
    out[bits] = [quant._gemv_name(bits, w, s), float(np.abs(got - np.array(want)).max())]
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs Debian's qemu-user (qemu-x86_64) on x86_64; .ci/run installs it")
@pytest.mark.slow
def test_int16_kernels_on_an_emulated_cpu_without_avx512(tmp_path):
    # numba compiles for the CPU it runs on: on a Haswell (AVX2, no AVX-512) the int16 kernels
    # are chosen, compile and give MLX's products, whatever CPU runs the tests
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    env.pop("NUMBA_CPU_NAME", None), env.pop("NUMBA_CPU_FEATURES", None)
    run = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", EMULATED], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["int16"] is True
    for bits in ("4", "8"):
        name, err = found[bits]
        assert name == f"gemv{bits}_g64_i16" and err < 2e-5, found


@pytest.mark.parametrize("bits,group,int16", [k for k in KERNELS if k.values[:2] in
                                               ((4, 64), (8, 64), (8, 32))])
def test_expert_gemv_equals_mlx(bits, group, int16, monkeypatch):
    monkeypatch.setattr(cpu_quant, "INT16", int16)
    mx.random.seed(2)
    sw = SwitchLinear(128, 36, num_experts=3)
    sw.weight = sw.weight + 0.02
    q = sw.to_quantized(group, bits)
    mx.eval(q.parameters())
    assert isinstance(q, QuantizedSwitchLinear) and cpu_quant.handles(q)
    x = mx.random.normal((128,))
    for e in range(3):
        want = mx.quantized_matmul(x[None], q.weight[e], q.scales[e], q.biases[e],
                                   transpose=True, group_size=group, bits=bits)[0]
        np.testing.assert_allclose(cpu_quant.gemv(q, np.array(x), expert=e), np.array(want),
                                   rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_quantized_linear_layer_equals_mlx(rows, monkeypatch):
    # 1-4 rows: the fused product per row; more (prefill): dequantized into a BLAS product
    q = _quantized_linear(96, 256, 4, 64, bias=True)
    x = mx.random.normal((1, rows, 256), key=mx.random.key(3))
    got = np.array(q(x))
    monkeypatch.setattr(cpu_quant, "_KERNELS", [None])  # MLX's kernels
    assert not cpu_quant.handles(q)
    np.testing.assert_allclose(got, np.array(q(x)), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lent", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_product_in_blocks_equals_mlx(bits, lent, monkeypatch):
    # prefill: blocks of 16 dequantized rows (the last one short) in one reused MLX buffer, each
    # multiplied by MLX; or (MLX lends no buffer) a fresh array per block
    monkeypatch.setattr(cpu_ops, "BLOCK_BYTES", 16 * 4 * 256)
    monkeypatch.setattr(cpu_ops, "_BLOCKS", threading.local())
    if not lent:
        monkeypatch.setattr(cpu_ops, "lends_buffers", lambda: False)
    q = _quantized_linear(70, 256, bits, 64, bias=True)
    x = mx.random.normal((1, 9, 256), key=mx.random.key(4))
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=bits)
    got = q(x)
    np.testing.assert_allclose(np.array(got), np.array(x @ w.T + q.bias), rtol=1e-6, atol=1e-6)


def test_prefill_products_do_not_share_the_block_buffer(monkeypatch):
    # the next product overwrites the buffer: a result made from it must already be its own
    monkeypatch.setattr(cpu_ops, "_BLOCKS", threading.local())
    a, b = _quantized_linear(64, 256, 4, 64, seed=1), _quantized_linear(64, 256, 8, 64, seed=2)
    x = mx.random.normal((1, 9, 256), key=mx.random.key(5))
    ya = a(x)
    yb = b(x)
    for layer, y in ((a, ya), (b, yb)):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=layer.bits)
        assert np.array_equal(np.array(y), np.array(x @ w.T))  # one block: MLX's own product


def test_handles_only_what_the_kernels_read():
    q = _quantized_linear(8, 64, 4, 32)
    assert cpu_quant.handles(q)
    q.scales = q.scales.astype(mx.float16)  # half scales (compute_dtype=None): MLX's kernels
    assert not cpu_quant.handles(q)
    q3 = _quantized_linear(8, 64, 3, 32)  # 3 bits: values straddle words
    assert not cpu_quant.handles(q3)
    assert not cpu_quant.handles(Linear(64, 8))


def test_kernels_are_cached_under_the_user_cache(monkeypatch):
    import numba

    path = cpu_quant.kernels().gemv4._cache._cache_path
    assert path.startswith(numba.config.CACHE_DIR or cpu_quant.cache_dir())
    assert "site-packages" not in path


def test_steps_run_in_the_kernels_for_quantized_layers_and_large_float_decoders(monkeypatch):
    float_lm, quantized_lm = _lm(None, 64, False), _lm(4, 64, False)
    assert not cpu_quant.pooled(float_lm)  # a small float decoder keeps BLAS
    assert cpu_quant.pooled(quantized_lm)
    monkeypatch.setattr(cpu_quant, "FLOAT_BYTES", 0)
    assert cpu_quant.pooled(float_lm)
    monkeypatch.setattr(cpu_quant, "_KERNELS", [None])  # no numba: BLAS (and MLX's kernels)
    assert not cpu_quant.pooled(float_lm) and not cpu_quant.pooled(quantized_lm)


def test_loading_the_bundled_float_model_does_not_import_numba():
    # its decode step keeps BLAS (under FLOAT_BYTES): load pays no numba import or kernel loads
    code = ("import sys, mm1_mlx; mm1_mlx.load('mm1-tiny'); "
            "print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_serial_kernels_are_cached_apart_from_parallel_ones():
    # numba's cache keys a function by its name and bytecode, not by ``parallel``: a serial build
    # of the same Python function loaded the parallel build's code and ran on every thread
    k = cpu_quant.kernels()
    serial = [name for name in dir(k) if name.endswith("_serial") and not name.startswith("_")]
    assert len(serial) >= 7
    for name in serial:
        fn, twin = getattr(k, name), getattr(k, name[: -len("_serial")])
        assert not fn.targetoptions.get("parallel") and twin.targetoptions.get("parallel")
        assert fn.py_func.__qualname__ == name != twin.py_func.__qualname__
        assert fn._cache._cache_file._index_name != twin._cache._cache_file._index_name


def test_one_thread_runs_the_serial_builds(monkeypatch):
    # on one thread the serial build is ~15% faster than a parallel build on one thread
    q = _quantized_linear(128, 4096, 4, 64)
    x = np.ones(4096, np.float32)
    monkeypatch.setattr(cpu_quant, "PARALLEL_BYTES", 0)
    most = cpu_quant.threads()
    try:
        cpu_quant.set_threads(1)
        w, scales, _ = cpu_quant.views(q)
        name = cpu_quant._gemv_name(4, w, scales)
        k = cpu_quant.kernels()
        assert name == ("gemv4_g64_i16" if k.INT16 else "gemv4_g64")
        assert cpu_quant._kernel(name, w) is getattr(k, name + "_serial")
        assert cpu_quant._kernel("attend", np.zeros(1)) is k.attend_serial
        if most > 1:  # numba launched several threads
            cpu_quant.set_threads(2)
            assert cpu_quant._kernel("attend", np.zeros(1)) is k.attend
            assert cpu_quant._kernel(name, w) is getattr(k, name)
    finally:
        cpu_quant.set_threads(most)
    np.testing.assert_allclose(cpu_quant.gemv(q, x), np.array(q(mx.array(x)[None])[0]) -
                               (np.array(q.bias) if "bias" in q else 0), rtol=1e-4, atol=1e-3)


def _lm(bits, group, moe, packed=False):
    kw = dict(vocab_size=101, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=not moe)
    if moe:
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, mlp_bias=True,
                  shared_expert_intermediate_size=128, moe_every=1)
    mx.random.seed(11)
    lm = LanguageModel(TextConfig(**kw))
    lm.update(nn.utils.tree_map(lambda p: p * 3 if p.ndim >= 2 else p, lm.parameters()))
    if bits:  # else float32
        nn.quantize(lm, group_size=group, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    lm.set_dtype(mx.float32)  # what load gives a quantized model on the CPU
    if packed:  # as ``load`` leaves it
        for layer in lm.layers:
            cpu_step.pack_layer(layer)
    mx.eval(lm.parameters())
    lm.eval()
    return lm


def _greedy(lm, prompt, steps, calls=None):
    """Greedy logits: prefill by the MLX layers, then each token by the CPU decode step where
    ``cpu.step.decode_step`` gives one (counted in ``calls``), else by the MLX layers."""
    cache = make_prompt_cache(lm)
    step = cpu_step.decode_step(lm)
    forward = step if step is not None and step.accepts(cache) else lm
    logits = lm(lm.embed(mx.array([prompt])), cache, last_only=True)
    out, tok = [np.array(logits[0, -1])], logits[:, -1].argmax(-1, keepdims=True)
    for _ in range(steps):
        if calls is not None:
            calls.append(forward is step)
        logits = forward(lm.embed(tok), cache)
        out.append(np.array(logits[0, -1]))
        tok = logits[:, -1].argmax(-1, keepdims=True)
    return np.stack(out)


@pytest.mark.parametrize("int16", ACTIVATIONS)
@pytest.mark.parametrize("bits,group,moe", [(4, 64, False), (8, 64, False), (8, 32, False),
                                            (4, 128, True), (8, 64, True), (4, 64, True)])
def test_quantized_decode_step_gives_mlx_tokens(bits, group, moe, int16, monkeypatch):
    monkeypatch.setattr(cpu_quant, "INT16", int16)
    monkeypatch.setattr(cpu_quant, "PARALLEL_BYTES", 4096)  # some layers split, some not
    lm = _lm(bits, group, moe)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    calls = []
    got = _greedy(lm, prompt, 10, calls)
    assert len(calls) == 10 and all(calls)  # the numpy step ran
    monkeypatch.setattr(cpu_quant, "_KERNELS", [None])  # MLX's own quantized model
    calls.clear()
    want = _greedy(lm, prompt, 10, calls)
    assert len(calls) == 10 and not any(calls)  # without the kernels the MLX layers run
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (8, 64), (8, 32), (None, 64)])
def test_step_embeddings_are_mlx_lookups_bit_for_bit(bits, group):
    lm = _lm(bits, group, False)
    step = cpu_step.decode_step(lm)
    assert type(lm.model.embed_tokens).__name__ == ("QuantizedEmbedding" if bits else "Embedding")
    for token in range(lm.args.vocab_size):
        want = np.array(lm.embed(mx.array([[token]])))
        assert np.array_equal(step.embed(token), want), token
    assert step.embed(lm.args.vocab_size + 5).shape == want.shape  # MLX's own lookup decides


@pytest.mark.parametrize("bits", [4, 8, None])
def test_packed_layers_multiply_q_k_v_and_gate_up_in_one_call(bits, monkeypatch):
    monkeypatch.setattr(cpu_quant, "PARALLEL_BYTES", 4096)
    lm = _lm(bits, 64, False, packed=True)
    monkeypatch.setattr(cpu_quant, "FLOAT_BYTES", 0)  # the float model in the kernels' threads too
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    products, builds = [], cpu_quant.builds  # the rows of each product call

    def counted(*a):
        return tuple((lambda *b, fn=fn: products.append(b[0].shape[0]) or fn(*b))
                     for fn in builds(*a))
    monkeypatch.setattr(cpu_quant, "builds", counted)
    calls = []
    got = _greedy(lm, prompt, 4, calls)
    assert all(calls) and len(calls) == 4
    D, kv, inter = 128, 2 * 32, 192  # hidden; k and v rows; gate and up rows
    layer = [D + 2 * kv, D, 2 * inter, D]  # q|k|v, o, gate|up, down: four calls a layer
    assert products == [*layer * 2, 101] * 4
    lm.update(nn.utils.tree_map(lambda p: p * 0.5 if p.dtype == mx.float32 and p.ndim >= 2
                                else p, lm.parameters()))
    mx.eval(lm.parameters())  # new arrays (no longer packed): the step follows them
    got = _greedy(lm, prompt, 4)
    monkeypatch.setattr(cpu_step, "ENABLED", False)
    want = _greedy(lm, prompt, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("user,want", [({}, "5000"), ({"GOMP_SPINCOUNT": "300000"}, "300000"),
                                       ({"OMP_WAIT_POLICY": "PASSIVE"}, "unset")])
def test_openmp_pools_spin_briefly_unless_the_user_says(user, want):
    # libgomp's default spin took BLAS's cores (4 tok/s); sleeping at once made 2 threads slower
    # than one; a user's OpenMP setting wins
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user)
    code = "import mm1_mlx, os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == want, out.stderr


@pytest.mark.parametrize("user,want", [({}, "24"), ({"OPENBLAS_THREAD_TIMEOUT": "28"}, "28")])
def test_openblas_threads_spin_briefly_unless_the_user_says(user, want):
    # 2^28 cycles of spinning after a prefill took a core from the first decode steps
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(user)
    code = ("import mm1_mlx, os; from mm1_mlx.cpu import step; "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], step.blas_settle_seconds())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    value, seconds = out.stdout.split()
    assert value == want and float(seconds) == 2.0 ** int(want) / 2e9, out.stderr


def test_thread_choice_follows_the_faster_one():
    choice = cpu_step.ThreadChoice(2)
    steps = []

    def run(n, quiet):
        for _ in range(n):
            used = choice.pick()
            steps.append(used)
            choice.record(used, (0.020 if used == 2 else 0.030) if quiet else
                          (0.190 if used == 2 else 0.035))

    run(40, quiet=True)  # both cores faster: one-thread tries, each after twice as long
    assert [i for i, u in enumerate(steps) if u == 1] == [7, 23] and choice.current == 2
    steps.clear()
    run(30, quiet=False)  # another process busy: the next try of one thread takes over
    assert choice.current == 1 and steps[-10:].count(2) <= 1
    steps.clear()
    run(40, quiet=True)  # the machine quiet again: back to both cores within a few tries
    assert choice.current == 2 and steps[-5:] == [2] * 5
    assert cpu_step.ThreadChoice(1).pick() == 1  # one thread: nothing to choose


@pytest.mark.parametrize("bits", [4, None])
def test_decode_step_threads_do_not_change_logits(bits, monkeypatch):
    # each output row is summed by one thread, each head attended by one: the same logits on 1 or
    # 2 threads, the kernels' (quantized) or BLAS's (float32)
    monkeypatch.setattr(cpu_quant, "PARALLEL_BYTES", 4096)
    monkeypatch.setattr(cpu_step, "blas_settle_seconds", lambda: 0.0)  # the choice decides
    lm = _lm(bits, 64, False)
    pool = cpu_quant if bits else blas
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    most = pool.threads()
    runs, init, layer = {}, cpu_step.ThreadChoice.__init__, cpu_step.LayerStep.__call__
    for n in (1, 2):
        def forced(self, most, n=n):  # every layer on n threads
            init(self, most)
            self.current = min(n, most)
        monkeypatch.setattr(cpu_step.ThreadChoice, "__init__", forced)
        monkeypatch.setattr(cpu_step.ThreadChoice, "pick", lambda self: self.current)  # probe
        used = []
        monkeypatch.setattr(cpu_step.LayerStep, "__call__", lambda *a, used=used, **k:
                            used.append(pool.threads()) or layer(*a, **k))
        calls = []
        runs[n] = _greedy(lm, prompt, 6, calls)
        assert all(calls) and pool.threads() == most  # the step ran; the setting is restored
        assert set(used) == {min(n, most)}
        cpu_step.decode_step(lm).threads = None  # the next run makes its own choice
    # one thread runs the kernels' serial build: another float32 summation order (~1e-6)
    np.testing.assert_allclose(runs[1], runs[2], rtol=1e-5, atol=1e-5)
    assert (runs[1].argmax(-1) == runs[2].argmax(-1)).all()


class _Pool:
    """A thread pool that records what it was set to."""

    def __init__(self):
        self.sets = []

    def set_threads(self, n):
        self.sets.append(n)


def test_layer_threads_one_thread_in_the_window_then_the_choice_with_a_timed_probe():
    pool, choice = _Pool(), cpu_step.ThreadChoice(2)
    layers = cpu_step.LayerThreads(pool, choice, probe=3, until=time.perf_counter() + 10)
    for i in range(5):  # BLAS's threads may spin: one thread, the probe untimed
        layers.enter(i)
    layers.close()
    assert pool.sets == [1, 2] and choice.recent == []
    choice.countdown = 1  # the next step tries one thread, on the probe layer only
    choice.recent = [0.001] * 5  # two-thread probes of 1 ms
    pool.sets.clear()
    layers = cpu_step.LayerThreads(pool, choice, probe=3, until=0.0)
    for i in range(5):
        layers.enter(i)
        if i == 3:
            time.sleep(0.002)  # slower than the recent two-thread probes
        assert pool.sets[-1:] == ([1] if i == 3 else [] if i < 3 else [2])
    layers.close()
    assert pool.sets == [1, 2] and choice.current == 2 and choice.wait == 16  # the try lost
    choice.recent = [0.0001] * 5
    layers = cpu_step.LayerThreads(pool, choice, probe=0, until=0.0)
    layers.enter(0)
    layers.enter(1)
    layers.close()
    assert choice.recent[:4] == [0.0001] * 4 and choice.recent[4] != 0.0001  # the probe timed
    assert pool.sets == [1, 2]  # nothing more set: all on two


@pytest.mark.parametrize("window", [10.0, 0.0])
def test_layers_in_the_window_after_a_prefill_run_on_one_thread_untimed(window, monkeypatch):
    # BLAS's threads spin after a prefill (~0.1 s at OpenBLAS's default timeout: the first 4-bit
    # step took 60-100 ms on 2 threads; ~8 ms at the one ``import mm1_mlx`` sets)
    assert 0.005 < cpu_step.blas_settle_seconds() < 0.5
    monkeypatch.setattr(cpu_step, "blas_settle_seconds", lambda: window)
    monkeypatch.setattr(cpu_quant, "PARALLEL_BYTES", 4096)
    lm = _lm(4, 64, False)
    used, layer = [], cpu_step.LayerStep.__call__
    monkeypatch.setattr(cpu_step.LayerStep, "__call__",
                        lambda *a, **k: used.append(cpu_quant.threads()) or layer(*a, **k))
    most = cpu_quant.threads()
    calls = []
    _greedy(lm, [3, 14, 15, 92, 65], 5, calls)
    step = cpu_step.decode_step(lm)
    assert all(calls) and cpu_quant.threads() == most and len(used) == 5 * len(lm.layers)
    if window:  # the first step after the prefill started it
        assert set(used) == {1} and step.threads.recent == []
    else:  # each step's probe layer timed
        assert len(step.threads.recent) == 5 and set(used) == {most}


def _forced(lm, cache, tokens, step=None):
    """Logits of feeding ``tokens`` one at a time (the CPU step, or the MLX layers)."""
    out = []
    for t in tokens:
        x = lm.embed(mx.array([[t]]))
        out.append(np.array((step(x, cache) if step else lm(x, cache))[0, -1]))
    return np.stack(out)


@pytest.mark.parametrize("bits", [4, None])
def test_kv_written_in_place_equals_mlx_updates(bits, monkeypatch):
    # after the first step of a reply, the step writes each token's keys and values straight into
    # the cache's buffers (no MLX op); a prompt of 254 crosses mlx-lm's 256-position growth
    import copy

    from mlx_lm.models.cache import KVCache, trim_prompt_cache

    lm = _lm(bits, 64, False)
    step = cpu_step.DecodeStep(lm)
    prompt, tokens = [(7 * i) % 101 for i in range(254)], [5, 17, 33, 2, 71, 64]
    updates, update = [], KVCache.update_and_fetch
    monkeypatch.setattr(KVCache, "update_and_fetch",
                        lambda self, k, v: updates.append(self.offset) or update(self, k, v))

    def prefilled():
        cache = make_prompt_cache(lm)
        mx.eval(lm(lm.embed(mx.array([prompt])), cache))
        return cache

    want_cache = prefilled()
    want = _forced(lm, want_cache, tokens)
    cache = prefilled()
    updates.clear()
    got = _forced(lm, cache, tokens, step)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # through MLX: the first step (a prefilled cache) and the one that outgrows the buffer
    assert updates == [254] * 2 + [256] * 2
    for c, w in zip(cache, want_cache):
        assert c.offset == w.offset == 260
        np.testing.assert_allclose(np.array(c.keys[..., :260, :]), np.array(w.keys[..., :260, :]),
                                   rtol=1e-5, atol=1e-5)
    # a copy of the cache (sharing its buffers) branches off; the original's next tokens must
    # not show in it, nor its tokens in the original
    fork = copy.deepcopy(cache)
    more = _forced(lm, cache, [9, 10, 11], step)
    branch = _forced(lm, fork, [40, 41], step)
    again = prefilled()
    np.testing.assert_allclose(_forced(lm, again, tokens + [40, 41])[-2:], branch,
                               rtol=1e-4, atol=1e-4)
    tail = _forced(lm, cache, [12], step)
    np.testing.assert_allclose(_forced(lm, prefilled(), tokens + [9, 10, 11, 12])[-4:],
                               np.concatenate([more, tail]), rtol=1e-4, atol=1e-4)
    # trimmed (as PromptCache.reuse does), then continued
    trim_prompt_cache(cache, 4)
    np.testing.assert_allclose(_forced(lm, cache, [50, 51], step),
                               _forced(lm, prefilled(), tokens + [50, 51])[-2:],
                               rtol=1e-4, atol=1e-4)


def test_only_a_completed_step_marks_its_cache_continued(monkeypatch):
    # a step that failed half-way left some layers' caches behind: the next goes through MLX
    lm = _lm(4, 64, False)
    step, cache = cpu_step.DecodeStep(lm), make_prompt_cache(lm)
    mx.eval(lm(lm.embed(mx.array([[1, 2, 3]])), cache))
    step(lm.embed(mx.array([[4]])), cache)
    assert step.advanced[0]() is cache[0] and step.advanced[1] == 4

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cpu_step, "_store", fail)
    with pytest.raises(KeyboardInterrupt):
        step(lm.embed(mx.array([[5]])), cache)
    assert step.advanced is None
    monkeypatch.undo()
    step(lm.embed(mx.array([[5]])), cache)
    ref = step.advanced[0]
    del cache
    assert ref() is None  # the step does not keep a reply's cache alive


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rep", [1, 3])
def test_attend_equals_softmax_attention(rep, parallel, monkeypatch):
    # the decode step's attention in the kernels' pool: base-2 scores over the cache, then itself
    monkeypatch.setattr(cpu_quant, "PARALLEL_BYTES", 0 if parallel else 1 << 40)
    rng = np.random.default_rng(5)
    hkv, cap, pos, d = 2, 40, 29, 16
    q = rng.standard_normal((hkv, rep, d)).astype(np.float32) * 3
    keys, values = (rng.standard_normal((hkv, cap, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((hkv, d)).astype(np.float32) for _ in range(2))
    allk = np.concatenate([keys[:, :pos], k[:, None]], axis=1)
    allv = np.concatenate([values[:, :pos], v[:, None]], axis=1)
    s = np.exp2(q @ allk.transpose(0, 2, 1) - (q @ allk.transpose(0, 2, 1)).max(-1, keepdims=True))
    want = (s / s.sum(-1, keepdims=True)) @ allv
    got = cpu_quant.attend(q, keys, values, pos, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_exp2_is_libm_exp2_to_float32_rounding():
    # the softmax's vectorizable 2^x (x <= 0): ~1e-7 relative down to 2^-126, then ~2^-126
    exp2 = cpu_quant.kernels()._exp2_nonpositive
    xs = np.concatenate([np.linspace(-126, 0, 4001), [-0.5, -1e-7, -1.5, -63.5]]).astype(np.float32)
    got = np.array([exp2(x) for x in xs], np.float64)
    want = np.exp2(xs.astype(np.float64))
    assert (np.abs(got - want) <= 2e-7 * want).all()
    assert exp2(np.float32(0)) == 1 and exp2(np.float32(-1)) == 0.5
    assert 0 < exp2(np.float32(-1e4)) <= 2.0 ** -125 and 0 < exp2(np.float32(-np.inf)) <= 2.0 ** -125


@pytest.mark.parametrize("traditional,dims", [(False, 16), (True, 16), (False, 8)])
def test_compiled_glue_equals_numpy_glue(traditional, dims):
    # the element-wise work between a step's products: one compiled call each where the step runs
    # in the kernels' threads, numpy's operations elsewhere; the same values to float32 rounding

    compiled, numpy = cpu_step.glue(True), cpu_step.NUMPY_GLUE
    assert compiled is not numpy and cpu_step.glue(False) is numpy
    rng = np.random.default_rng(3)
    x, w = (rng.standard_normal(96).astype(np.float32) * 4 for _ in range(2))
    eps = np.float32(1e-5)
    got, want = np.empty_like(x), np.empty_like(x)
    compiled.rms_norm(x, w, eps, got)
    numpy.rms_norm(x, w, eps, want)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    rope = nn.RoPE(dims, traditional, base=500.0)
    layer = cpu_step.LayerStep.__new__(cpu_step.LayerStep)  # only its RoPE tables
    layer.rope, layer.heads, layer.rope_tables = rope, (3, 3, 16), None
    a, b, partner = layer.tables(40)
    heads = rng.standard_normal((3, 16)).astype(np.float32)
    rows = [heads.copy(), heads.copy()]
    compiled.rope(rows[0], a[37], b[37], partner)
    numpy.rope(rows[1], a[37], b[37], partner)
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-6, atol=1e-6)
    mlx = np.array(rope(mx.array(heads)[None, :, None], offset=37))[0, :, 0]
    np.testing.assert_allclose(rows[0], mlx, rtol=1e-5, atol=1e-5)
    g = np.concatenate([rng.standard_normal(60) * 8, [-1e4, -200.0, 0.0, 200.0]]).astype(np.float32)
    u = rng.standard_normal(64).astype(np.float32)
    want = np.empty_like(g)
    numpy.silu_mul(g, u, want)
    compiled.silu_mul(g, u, g)  # in place, as the step calls it
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)
    assert g[-4] == 0 and g[-3] == 0 and np.isfinite(g).all()  # 2^big is inf: x / inf = 0


@pytest.mark.parametrize("bits", [4, None])
def test_step_rebuilds_the_layers_whose_arrays_were_replaced(bits, monkeypatch):
    # a layer's share of the step is gathered once; replacing any array under it (a norm here) or
    # under the head (the tied table) makes the step gather that part again, and only that part
    monkeypatch.setattr(cpu_quant, "FLOAT_BYTES", 0)
    lm = _lm(bits, 64, False)
    prompt = [3, 14, 15, 92, 65, 35]
    _greedy(lm, prompt, 2)
    step = cpu_step.decode_step(lm)
    built, head = list(step.layers), step.head
    assert all(built) and head is not None
    norm, table = lm.layers[1].post_attention_layernorm, lm.model.embed_tokens
    norm.weight = norm.weight * 1.5 + 0.25
    name = "scales" if bits else "weight"
    table[name] = table[name] * 1.2
    mx.eval(lm.parameters())
    got = _greedy(lm, prompt, 3)
    assert cpu_step.decode_step(lm) is step  # the same modules: the same step
    assert step.layers[0] is built[0] and step.layers[1] is not built[1] and step.head is not head
    monkeypatch.setattr(cpu_step, "ENABLED", False)
    np.testing.assert_allclose(got, _greedy(lm, prompt, 3), rtol=1e-4, atol=1e-4)
