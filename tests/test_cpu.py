"""The CPU fast paths (``mm1_mlx/cpu/``) against the MLX layers they stand in for.

Every test here runs on the CPU device (pinned by a fixture, so on a Mac too, where the default
device is the GPU and the fast paths would otherwise never run): comparing a fast path with MLX's
own op means something only where the fast path is taken.
"""

import mm1_mlx  # noqa: F401, I001

import gc
import os
import subprocess
import sys
from dataclasses import fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_config, make_model
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from mm1_mlx.checkpoint import load, save
from mm1_mlx.cpu import step as cpu_step
from mm1_mlx.models.config import TextConfig


@pytest.fixture(autouse=True)
def on_the_cpu():
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("setting", ["", "default"])
def test_freed_buffers_are_reused_without_page_faults(setting):
    # layers and decode steps free and reallocate the same large buffers: with glibc's defaults
    # each reuse faults its pages in again (~5-10 us a page on the development VM)
    code = """if True:
        import resource, numpy as np, mm1_mlx
        from mm1_mlx.cpu.blas import retain_freed_memory
        on = retain_freed_memory()
        def work():
            for mb in (3, 7, 16, 7, 3, 24, 7):
                a = np.ones(mb << 18, np.float32); b = a * 2; del a, b
        work()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10): work()
        print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)"""
    env = dict(os.environ, MM1_MLX_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if setting == "default":
        assert out[0] == "False" and int(out[1]) > 5000  # the workload does fault without it
    else:
        assert out[0] == "True" and int(out[1]) < 500


def _streamed_weights(layer) -> list:
    """(name, weight) of the layer's projections, in module order."""
    return [(k, m.weight) for k, m in tree_flatten(layer.leaf_modules(), is_leaf=nn.Module.is_module)
            if "weight" in m and m.weight.ndim >= 2 and "norm" not in k]


def test_load_packs_each_decoder_layer_into_one_buffer(processor, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_step, "ENABLED", False)  # its RoPE tables would count in the peak
    model = make_model(make_config(processor, experts=4, layers=6))  # dense and MoE layers
    path = save(model, processor, tmp_path / "a")
    params = dict(tree_flatten(model.parameters()))
    total = sum(w.nbytes for w in params.values())
    layer = max(sum(w.nbytes for _, w in tree_flatten(la.parameters()))
                for la in model.language_model.layers)
    gc.collect()  # an earlier test's arrays freed during the load would hide its own
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    back, _ = load(str(path))
    # each layer's loaded tensors are temporaries of its packing: not a second copy of them all
    assert total <= mx.get_peak_memory() - before < total + 2 * layer
    for la in back.language_model.layers:
        names, views = zip(*[(k, np.asarray(w)) for k, w in _streamed_weights(la)])
        assert names[:4] == tuple(f"self_attn.{p}_proj" for p in "qkvo")  # read order
        for a, b in zip(views, views[1:]):  # one buffer, one weight after the other
            assert b.ctypes.data == a.ctypes.data + a.nbytes
    # the views hold the stored values, and save and load back like any array
    again, _ = load(str(save(back, processor, tmp_path / "b")))
    for k, w in tree_flatten(again.parameters()):
        assert np.array_equal(np.array(w), np.array(params[k])), k


def test_quantizing_packed_layers_frees_their_float_buffers(processor, tmp_path):
    import gc

    path = save(make_model(make_config(processor, layers=4)), processor, tmp_path / "a")
    model, _ = load(str(path))
    layers = model.language_model.layers
    floats = sum(w.nbytes for la in layers for _, w in _streamed_weights(la))
    before = mx.get_active_memory()
    nn.quantize(model.language_model, group_size=32, bits=4,  # every projection; norms stay
                class_predicate=lambda p, m: "layers." in p and hasattr(m, "to_quantized"))
    mx.eval(model.parameters())
    gc.collect()
    # a norm or bias left as a view would keep its layer's whole float buffer alive
    assert before - mx.get_active_memory() > 0.7 * floats


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_checkpoint_computes_in_float32_on_the_cpu_when_it_fits(
        processor, tmp_path, dtype, monkeypatch):
    from mm1_mlx import checkpoint

    model = make_model(make_config(processor))
    model.set_dtype(dtype)
    path = save(model, processor, tmp_path / "half")
    stored = dict(tree_flatten(model.parameters()))
    up, _ = load(str(path))  # the CPU's fast type: same values, float32
    for k, w in tree_flatten(up.parameters()):
        assert w.dtype == mx.float32 and np.array_equal(np.array(w), np.array(stored[k].astype(w.dtype)))
    as_stored, _ = load(str(path), compute_dtype=None)
    assert {w.dtype for _, w in tree_flatten(as_stored.parameters())} == {dtype}
    size = sum(w.size for w in stored.values()) * 4
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 2 * size - 1)  # would not fit
    kept, _ = load(str(path))
    assert {w.dtype for _, w in tree_flatten(kept.parameters())} == {dtype}
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 2 * size)
    assert checkpoint.fits_float32(kept) and not checkpoint.fits_float32(up)


@pytest.mark.parametrize("rows", [1, 7])
def test_cpu_linear_fast_paths_equal_mlx_layers(rows, monkeypatch):
    from mm1_mlx.cpu import ops as cpu
    from mm1_mlx.cpu.ops import Linear, QuantizedLinear

    mx.random.seed(3)
    ours = Linear(128, 96)
    ref = nn.Linear(128, 96)
    ref.update(ours.parameters())
    x = mx.random.normal((1, rows, 128))
    np.testing.assert_allclose(np.array(ours(x)), np.array(ref(x)), rtol=1e-5, atol=1e-5)
    # one row runs through BLAS sgemv; gradients stay MLX's
    grads = [nn.value_and_grad(m, lambda m, x: (m(x) ** 2).sum())(m, x)[1] for m in (ours, ref)]
    for (k, g), (_, w) in zip(tree_flatten(grads[0]), tree_flatten(grads[1])):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-4, err_msg=k)
    monkeypatch.setattr(cpu, "QUANT_SPLIT", 1)  # quantized layers split over the CPU streams
    ours.eval()
    q = ours.to_quantized(group_size=64, bits=4)
    assert type(q) is QuantizedLinear and not q.training  # the mode carries over
    q_ref = nn.QuantizedLinear.from_linear(ref, 64, 4)
    want = np.array(q_ref(x))  # quantized_matmul
    np.testing.assert_allclose(np.array(q(x)), want, rtol=1e-4, atol=1e-4)
    q.train()  # training (QLoRA) keeps the quantized product: no dequantized copy in the graph
    np.testing.assert_array_equal(np.array(q(x)), want)


@pytest.mark.parametrize("numpy_path", [False, True])
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("loud", [False, True])
def test_cpu_attention_equals_the_fused_kernel(mask, heads, numpy_path, loud, monkeypatch):
    from mm1_mlx.cpu import ops as cpu

    # the numpy softmax runs for long attention only; here for every size
    monkeypatch.setattr(cpu, "NUMPY_SCORES", 1 if numpy_path else 1 << 60)
    mx.random.seed(1)
    (hq, hkv), L, S = heads, 19, 23  # S > L: queries are the last L positions (a cache prefix)
    q, k, v = (mx.random.normal((2, h, n, 16)) for h, n in ((hq, L), (hkv, S), (hkv, S)))
    tol = 1e-5
    if loud:  # base-2 scores past 64 (to ~140): the softmax must shift by the row maximum
        q, tol = q * 20, 1e-4  # float32 rounding of such scores alone is ~1e-5 (both kernels)
    if mask == "bool":
        mask = mx.random.uniform(shape=(2, 1, L, S)) > 0.3
        mask[..., -1] = True  # every query keeps at least one key
    elif mask == "additive":
        mask = mx.random.normal((hq, L, S))

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)

    def ours(q, k, v):
        return cpu.attention(q, k, v, 0.25, mask)

    np.testing.assert_allclose(np.array(ours(q, k, v)), np.array(fused(q, k, v)),
                               rtol=tol, atol=tol)
    # gradients (training, LoRA): numpy's on the numpy path, equal to MLX's fused kernel's
    want = mx.grad(lambda *a: (fused(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    got = mx.grad(lambda *a: (ours(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("numpy_path", [False, True])
def test_cpu_activations_equal_mlx(numpy_path, monkeypatch):
    from mm1_mlx.cpu import ops as cpu

    monkeypatch.setattr(cpu, "NUMPY_ELEMENTS", 1 if numpy_path else 1 << 60)
    x = mx.linspace(-120, 120, 4001)
    pairs = [(cpu.sigmoid, mx.sigmoid), (cpu.silu, nn.silu),
             (cpu.quick_gelu, lambda a: a * mx.sigmoid(1.702 * a)), (cpu.gelu, nn.gelu),
             (cpu.gelu_approx, nn.gelu_approx)]
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-6, atol=1e-7)
        got = mx.grad(lambda a, f=ours: (f(a) ** 2).sum())(x)  # finite where 2^x overflows
        want = mx.grad(lambda a, f=theirs: (f(a) ** 2).sum())(x)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_cpu_half_precision_products_run_in_float32():
    from mm1_mlx.cpu.ops import attention, matmul_t

    mx.random.seed(4)
    x, w = mx.random.normal((1, 3, 64)), mx.random.normal((48, 64))
    x16, w16 = x.astype(mx.float16), w.astype(mx.float16)
    want = x16.astype(mx.float32) @ w16.astype(mx.float32).T
    for rows in (x16, x16[:, :1]):  # prefill and decode orientations
        got = matmul_t(rows, w16)
        assert got.dtype == mx.float16
        np.testing.assert_allclose(np.array(got.astype(mx.float32)),
                                   np.array(want[:, : rows.shape[1]]), rtol=2e-3, atol=2e-2)
    q, k, v = (mx.random.normal((1, 2, 4, 16)).astype(mx.float16) for _ in range(3))
    ref = mx.fast.scaled_dot_product_attention(*(a.astype(mx.float32) for a in (q, k, v)),
                                               scale=0.25, mask="causal")
    got = attention(q, k, v, 0.25, "causal")
    assert got.dtype == mx.float16
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref), atol=2e-3)


ROPES = {
    "default": (dict(), 16),
    "traditional": (dict(rope_traditional=True), 16),
    "partial": (dict(), 8),  # rotates 8 of 16 features (rotary_pct-style)
    "llama3": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}), 16),
    "yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                                "mscale_all_dim": 0.5, "original_max_position_embeddings": 64}), 16),
    "longrope": (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0,
                                    "long_factor": [1.5] * 8, "short_factor": [1.0] * 8,
                                    "original_max_position_embeddings": 64}), 16),
}


def _rope_module(name):
    from mlx_lm.models.rope_utils import initialize_rope

    kw, dims = ROPES[name]
    if name == "partial":
        return nn.RoPE(dims, base=500.0)
    return initialize_rope(dims, 10000.0, kw.get("rope_traditional", False),
                           kw.get("rope_scaling"), 4096)


@pytest.mark.parametrize("name", sorted(ROPES))
def test_cpu_rope_tables_equal_the_module(name, monkeypatch):
    from mm1_mlx.cpu import ops as cpu

    monkeypatch.setattr(cpu, "ROPE_MIN_POSITIONS", 16)  # tables must grow past their first size
    module = _rope_module(name)
    for offset, L, dtype in [(0, 19, mx.float32), (37, 1, mx.float32), (300, 3, mx.float32),
                             (5, 4, mx.bfloat16)]:
        x = (mx.random.normal((2, 3, L, 16), key=mx.random.key(offset)) * 4).astype(dtype)
        got, want = cpu.rope(module, x, offset), module(x, offset=offset)
        assert got.dtype == want.dtype
        tol = 1e-5 if dtype == mx.float32 else 3e-2
        np.testing.assert_allclose(np.array(got.astype(mx.float32)),
                                   np.array(want.astype(mx.float32)), rtol=tol, atol=tol)
    assert cpu.rope_tables(module, 16, 301)[0].shape[0] >= 301  # the table path did run

    class Reversed(nn.Module):  # not a rotation of feature pairs: keeps its own path
        dims = 16

        def __call__(self, x, offset=0):
            return x[..., ::-1] * (offset + 1)

    x = mx.random.normal((1, 2, 3, 16))
    assert cpu.rope_tables(Reversed(), 16, 8) is None
    np.testing.assert_array_equal(np.array(cpu.rope(Reversed(), x, 2)), np.array(x[..., ::-1] * 3))


def _decode_logits(lm, prompt, steps, step=None):
    """Greedy logits of the prompt's last position and ``steps`` more: prefill by the MLX layers,
    then each token by ``step`` (a ``cpu.step.DecodeStep``) or, without one, the MLX layers."""
    cache = make_prompt_cache(lm)
    logits = lm(lm.embed(mx.array([prompt])), cache, last_only=True)
    forward = step or lm
    out, tok = [np.array(logits[0, -1])], mx.array([[prompt[-1]]])
    for _ in range(steps):
        logits = forward(lm.embed(tok), cache)
        out.append(np.array(logits[0, -1]))
        tok = logits[:, -1].argmax(-1, keepdims=True)
    return np.stack(out), cache


def counted(step, calls: list):
    """``step``, counting its calls in ``calls``."""
    return lambda *a: calls.append(1) or step(*a)


def _choose_path(path, monkeypatch):
    """Where a float decode step computes: in ``cpu.quant``'s kernels' threads (``kernels``: what
    a large float decoder does), or BLAS products with the cache read by OpenBLAS's batched GEMM
    (``batched``, where it has one) or numpy (``numpy``)."""
    from mm1_mlx.cpu import blas as backend
    from mm1_mlx.cpu import quant

    if path == "kernels":
        if quant.kernels() is None:
            pytest.skip("needs numba (cpu.quant's kernels)")
        monkeypatch.setattr(quant, "FLOAT_BYTES", 0)
    elif path == "batched" and backend.sgemm_batch_strided() is None:
        pytest.skip("the bound BLAS has no cblas_sgemm_batch_strided (OpenBLAS < 0.3.28)")
    elif path == "numpy":
        monkeypatch.setattr(backend, "sgemm_batch_strided", lambda: None)


PATHS = ["kernels", "batched", "numpy"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", ["gqa-tied", "mha-bias-untied", "traditional", "partial",
                                     "llama3", "moe-bias", "moe-shared-every-2"])
def test_numpy_decode_step_equals_the_mlx_layers(variant, path, monkeypatch):
    from mm1_mlx.models.decoder import LanguageModel

    _choose_path(path, monkeypatch)

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if variant == "mha-bias-untied":
        kw.update(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                  tie_word_embeddings=False)
    elif variant in ("traditional", "llama3"):
        kw.update(ROPES[variant][0])
    elif variant == "moe-bias":  # every layer routes its token to 2 of 4 experts
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_bias=True)
    elif variant == "moe-shared-every-2":  # Qwen2-MoE style: gated shared expert, raw top-k
        kw.update(num_experts=5, num_experts_per_tok=2, moe_every=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=40, norm_topk_prob=False)
    mx.random.seed(7)
    lm = LanguageModel(TextConfig(**kw))
    if variant == "partial":
        for layer in lm.layers:
            layer.self_attn.rope = nn.RoPE(8, base=500.0)
    lm.update(tree_map_scaled(lm.parameters(), 3.0))  # logits far from uniform
    mx.eval(lm.parameters())
    lm.eval()
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    want, want_cache = _decode_logits(lm, prompt, 12)
    step, calls = cpu_step.decode_step(lm), []
    assert step is not None and step.accepts(make_prompt_cache(lm))
    assert step.pooled == (path == "kernels")
    got, got_cache = _decode_logits(lm, prompt, 12, counted(step, calls))
    assert len(calls) == 12  # every decode step ran in numpy
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    for a, b in zip(got_cache, want_cache):  # the caches hold the same keys and values
        assert a.offset == b.offset == len(prompt) + 12
        for x, y in zip(a.state, b.state):
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_numpy_decode_step_from_an_empty_cache(path, monkeypatch):
    # a one-token prompt is "prefilled" by the decode step itself, with nothing cached yet
    from mm1_mlx.models.decoder import LanguageModel

    _choose_path(path, monkeypatch)
    mx.random.seed(8)
    lm = LanguageModel(TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4))
    mx.eval(lm.parameters())
    lm.eval()
    step = cpu_step.decode_step(lm)
    outs = []
    for forward in (lm, step):
        cache = make_prompt_cache(lm)
        steps = [forward(lm.embed(mx.array([[t]])), cache) for t in (3, 9, 4)]
        outs.append(np.array(mx.concatenate(steps, axis=1)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert step.accepts(make_prompt_cache(lm))


def tree_map_scaled(params, s):
    from mlx.utils import tree_map

    return tree_map(lambda p: p * s if p.ndim == 2 else p, params)


def test_numpy_decode_step_leaves_other_models_to_mlx(processor):
    from mlx_lm.models.cache import RotatingKVCache

    from mm1_mlx.models.quantization import quantize_model
    from mm1_mlx.tuner.adapters import apply_lora, lora_config

    def runs_numpy(model, cache=None):
        lm = model.language_model
        cache = cache or make_prompt_cache(lm)
        lm(lm.embed(mx.array([[3, 4, 5]])), cache)
        step = cpu_step.decode_step(lm)
        if step is None or not step.accepts(cache):
            return False
        step(lm.embed(mx.array([[6]])), cache)  # and it runs
        return True

    cfg = make_config(processor)
    assert runs_numpy(make_model(cfg))
    assert runs_numpy(make_model(make_config(processor, experts=4)))  # MoE layers too
    rotating = [RotatingKVCache(max_size=64) for _ in range(2)]
    assert not runs_numpy(make_model(cfg), rotating)
    model = make_model(cfg)
    model.train()
    assert not runs_numpy(model)
    model = make_model(cfg)
    apply_lora(model, lora_config(4, 8.0, 0.0, -1, ["self_attn.q_proj"]))
    model.eval()
    assert not runs_numpy(model)  # LoRA-wrapped projections
    model = make_model(cfg)
    quantize_model(model, bits=4, group_size=32)
    assert not runs_numpy(model)
    model = make_model(cfg)
    model.set_dtype(mx.float16)
    assert not runs_numpy(model)


def test_every_text_config_field_is_declared_by_the_decode_step():
    """A new TextConfig field must be declared read, refused or training-only by ``cpu.step``:
    otherwise the numpy step could silently ignore what the MLX layers do with it."""
    assert set(cpu_step.FIELDS) == {f.name for f in fields(TextConfig)}
    assert set(cpu_step.FIELDS.values()) <= {"read", "refused", "training"}


@pytest.mark.parametrize("name", [k for k, v in cpu_step.FIELDS.items() if v == "refused"])
def test_refused_fields_leave_the_model_to_mlx(name):
    from mm1_mlx.models.decoder import LanguageModel

    kw = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=4)
    lm = LanguageModel(TextConfig(**kw, **{name: True}))
    lm.eval()
    assert cpu_step.prepare(lm) is None
    assert cpu_step.prepare(LanguageModel(TextConfig(**kw))) is not None


def test_decode_step_is_prepared_once_and_again_when_layers_change(processor):
    from mm1_mlx.tuner.adapters import apply_lora, fuse_lora, lora_config

    model = make_model(make_config(processor))
    model.eval()
    lm = model.language_model
    step = cpu_step.decode_step(lm)
    assert step is not None and cpu_step.decode_step(lm) is step  # prepared once
    apply_lora(model, lora_config(4, 8.0, 0.0, -1, ["self_attn.q_proj"]))
    model.eval()
    assert cpu_step.decode_step(lm) is None  # LoRA-wrapped projections: the MLX layers run
    fuse_lora(model)
    again = cpu_step.decode_step(lm)
    assert again is not None and again is not step  # prepared for the fused layers
    model.train()
    assert cpu_step.decode_step(lm) is None  # training: never


class Counting:
    """A decode step that counts its calls."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def accepts(self, kv) -> bool:
        return self.step.accepts(kv)

    def embed(self, token):
        return self.step.embed(token)

    def __call__(self, *args):
        self.calls += 1
        return self.step(*args)


def test_generation_decodes_through_the_prepared_step(processor, monkeypatch):
    """``generate_step`` takes the CPU step (chosen once per reply) and gives the tokens the MLX
    layers give."""
    from mm1_mlx.generate import generate_step, make_sampling

    model = make_model(make_config(processor))
    model.eval()
    lm = model.language_model
    step = Counting(cpu_step.decode_step(lm))
    monkeypatch.setattr(cpu_step, "decode_step", lambda lm: step)

    def tokens(enabled):
        kv = make_prompt_cache(lm)
        logits = model(mx.array([[3, 5, 7, 9]]), cache=kv, last_only=True)
        sampler, procs = make_sampling(processor, 0.0, 1.0, 0, 0.0, None)
        return list(generate_step(model, kv, logits, mx.array([3, 5, 7, 9]), sampler, procs, 8))

    got = tokens(True)
    monkeypatch.setattr(cpu_step, "decode_step", lambda lm: None)
    assert step.calls == 7 and got == tokens(False)  # the 8th token is not fed back
