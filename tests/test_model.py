"""The core model: values, not shapes. KV cache, MoE routing, aux losses, connectors, images."""

import mm1_mlx  # noqa: F401, I001

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_config, make_model
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from mm1_mlx.checkpoint import load, save
from mm1_mlx.models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from mm1_mlx.models.connector import adaptive_avg_pool, build_connector, conv_same
from mm1_mlx.models.decoder import SparseMoeBlock, router_losses
from mm1_mlx.models.vision import VisionModel


def ids_with_images(processor, n_images, text=(5, 6, 7)):
    T = processor.num_image_tokens
    ids = [3]
    for _ in range(n_images):
        ids += [processor.image_token_id] * T + list(text)
    return mx.array([ids])


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


def test_config_roundtrip_ignores_unknown_keys(processor):
    cfg = make_config(processor, experts=4)
    d = json.loads(json.dumps(cfg.to_dict()))
    d["text_config"]["some_future_key"] = 1
    d["unknown_top"] = "x"
    back = ModelConfig.from_dict(d)
    assert back.to_dict() == cfg.to_dict()
    t = TextConfig(hidden_size=64, num_attention_heads=4)
    assert (t.num_key_value_heads, t.head_dim, t.moe_intermediate_size) == (4, 16, t.intermediate_size)


@pytest.mark.parametrize("experts", [0, 4])
def test_kv_cached_decode_equals_full_forward(processor, experts):
    model = make_model(make_config(processor, experts=experts, layers=2))
    ids = ids_with_images(processor, 2)
    px = mx.random.normal((2, 32, 32, 3))
    full = model(ids, px)
    feats = model.encode_images(px).reshape(-1, model.config.text_config.hidden_size)
    cache = make_prompt_cache(model.language_model)
    L = ids.shape[1]
    n0 = 3  # prefill part of the first image, then one token at a time
    outs = [model(ids[:, :n0], cache=cache, image_features=feats[:n0 - 1])]
    used = n0 - 1
    for i in range(n0, L):
        is_img = int(ids[0, i].item()) == processor.image_token_id
        f = feats[used:used + 1] if is_img else None
        used += is_img
        outs.append(model(ids[:, i:i + 1], cache=cache, image_features=f))
    inc = mx.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.array(inc), np.array(full), atol=1e-4, rtol=1e-4)


def test_moe_equals_naive_loop():
    args = TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_experts=5,
                      num_experts_per_tok=2, moe_intermediate_size=24)
    mx.random.seed(1)
    block = SparseMoeBlock(args)
    block.eval()
    x = mx.random.normal((2, 7, 32))
    y = block(x)
    assert isinstance(y, mx.array)  # no router losses unless asked (return_aux)
    logits = np.array(block.gate(x)).reshape(-1, 5)
    xs = np.array(x).reshape(-1, 32)
    sw = block.switch_mlp
    g, u, d = (np.array(p.weight) for p in (sw.gate_proj, sw.up_proj, sw.down_proj))
    ref = []
    for t in range(xs.shape[0]):
        top = np.argsort(-logits[t])[:2]
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        w = p[top] / p[top].sum()
        out = 0
        for e, we in zip(top, w):
            h = g[e] @ xs[t]
            out = out + we * (d[e] @ ((h / (1 + np.exp(-h))) * (u[e] @ xs[t])))
        ref.append(out)
    np.testing.assert_allclose(np.array(y).reshape(-1, 32), np.stack(ref), atol=1e-4, rtol=1e-4)


def test_aux_losses_match_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 6)).astype(np.float32)
    inds = np.argsort(-logits, axis=-1)[:, :2]
    balance, z = router_losses(mx.array(logits), mx.array(inds), 6)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    f = np.array([(inds == e).sum() for e in range(6)]) / (50 * 2)
    lse = np.log(np.exp(logits).sum(-1))
    assert math.isclose(balance.item(), 6 * (f * p.mean(0)).sum(), rel_tol=1e-5)
    assert math.isclose(z.item(), (lse**2).mean(), rel_tol=1e-5)


def test_return_aux_gives_weighted_aux_in_any_mode(processor):
    model = make_model(make_config(processor, experts=4, layers=4))
    ids = ids_with_images(processor, 1)
    px = mx.random.normal((1, 32, 32, 3))
    model.train()
    logits, aux = model(ids, px, return_aux=True)
    assert isinstance(model(ids, px), mx.array)  # the mode never changes what is returned
    model.eval()
    np.testing.assert_allclose(np.array(logits), np.array(model(ids, px)), atol=1e-5)
    assert math.isclose(model(ids, px, return_aux=True)[1].item(), aux.item(), rel_tol=1e-5)
    args = model.config.text_config
    emb = model.embed(ids, model.encode_images(px))
    h, parts = emb, []
    mask = "causal"
    for layer in model.language_model.model.layers:
        r = layer.post_attention_layernorm(h + layer.self_attn(layer.input_layernorm(h), mask))
        if isinstance(layer.mlp, SparseMoeBlock):
            lg, inds, _ = layer.mlp.route(r)
            parts.append(router_losses(lg.reshape(-1, 4), inds.reshape(-1, 2), 4))
        h, _ = layer(h, mask)
    want = np.mean([args.router_aux_loss_coef * b.item() + args.router_z_loss_coef * zz.item()
                    for b, zz in parts])
    assert len(parts) == 2 and math.isclose(aux.item(), want, rel_tol=1e-4)


@pytest.mark.parametrize("kind", ["c-abstractor", "avg-pool", "attention-pool", "mlp"])
def test_connector_token_count_and_response(kind):
    cfg = ConnectorConfig(type=kind, num_image_tokens=9, hidden_size=16, depth=1)
    mx.random.seed(0)
    conn = build_connector(cfg, 24, 40)
    x = mx.random.normal((2, 36, 24))
    y = conn(x)
    T = 36 if kind == "mlp" else 9
    assert y.shape == (2, T, 40)
    y2 = conn(x.at[1].add(mx.random.normal((36, 24))))
    assert np.allclose(np.array(y[0]), np.array(y2[0]), atol=1e-6)  # images independent
    assert np.abs(np.array(y[1]) - np.array(y2[1])).max() > 1e-3  # responds to its input


def test_adaptive_pool_matches_definition():
    x = mx.random.normal((1, 7, 7, 3))
    y = np.array(adaptive_avg_pool(x, 3))
    xn = np.array(x)
    for i in range(3):
        for j in range(3):
            lo_i, hi_i = (i * 7) // 3, -((-(i + 1) * 7) // 3)
            lo_j, hi_j = (j * 7) // 3, -((-(j + 1) * 7) // 3)
            np.testing.assert_allclose(y[0, i, j], xn[0, lo_i:hi_i, lo_j:hi_j].mean((0, 1)),
                                       atol=1e-5)


def test_conv_same_equals_conv2d():
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=False)
    x = mx.random.normal((2, 5, 4, 6))
    np.testing.assert_allclose(np.array(conv_same(x, conv.weight)), np.array(conv(x)), atol=1e-5)


def test_images_fill_their_own_positions(processor):
    model = make_model(make_config(processor))
    px = mx.random.normal((2, 32, 32, 3))
    feats = model.encode_images(px)
    ids = ids_with_images(processor, 2)
    emb = np.array(model.embed(ids, feats))[0]
    pos = np.where(np.array(ids[0]) == processor.image_token_id)[0]
    T = processor.num_image_tokens
    np.testing.assert_array_equal(emb[pos[:T]], np.array(feats[0]))
    np.testing.assert_array_equal(emb[pos[T:]], np.array(feats[1]))
    text = np.array(model.language_model.embed(ids))[0]
    others = np.setdiff1d(np.arange(len(emb)), pos)
    np.testing.assert_array_equal(emb[others], text[others])
    # swapping the images changes the outputs after the first image
    out = np.array(model(ids, px))
    swapped = np.array(model(ids, px[::-1]))
    assert np.abs(out[0, pos[0]:] - swapped[0, pos[0]:]).max() > 1e-4
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, px[:1])


def test_position_embedding_interpolation():
    cfg = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8)
    vm = VisionModel(cfg)
    # a constant position table stays constant when resized; a linear ramp stays a ramp
    pe = vm.embeddings.position_embedding
    grid = np.linspace(0, 1, 4, dtype=np.float32)
    ramp = np.repeat(grid[None, :], 4, 0).reshape(16, 1) * np.ones((1, 16), np.float32)
    pe.weight = mx.array(np.concatenate([np.zeros((1, 16), np.float32), ramp]))
    from mm1_mlx.models.vision import interpolate_grid

    up = np.array(interpolate_grid(mx.array(ramp), 4, 8)).reshape(8, 8, 16)[..., 0]
    assert np.all(np.diff(up, axis=1) >= -1e-6) and np.allclose(up[:, 0], up[0, 0])
    out = vm(mx.random.normal((1, 64, 64, 3)))  # 8x8 patches at the 4x4-trained table
    assert out.shape == (1, 64, 16) and np.isfinite(np.array(out)).all()


def test_save_load_roundtrip_bit_exact(processor, tmp_path):
    model = make_model(make_config(processor, experts=4, layers=2))
    path = save(model, processor, tmp_path / "ckpt")
    back, proc2 = load(str(path))
    a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(back.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    ids = ids_with_images(processor, 1)
    px = mx.random.normal((1, 32, 32, 3))
    assert np.array_equal(np.array(model(ids, px)), np.array(back(ids, px)))
    assert proc2.num_image_tokens == processor.num_image_tokens
    assert proc2.tokenizer.encode("what color") == processor.tokenizer.encode("what color")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _streamed_weights(layer) -> list:
    """(name, weight) of the layer's projections, in module order."""
    return [(k, m.weight) for k, m in tree_flatten(layer.leaf_modules(), is_leaf=nn.Module.is_module)
            if "weight" in m and m.weight.ndim >= 2 and "norm" not in k]


def test_load_packs_each_decoder_layer_into_one_buffer(processor, tmp_path):
    model = make_model(make_config(processor, experts=4, layers=6))  # dense and MoE layers
    path = save(model, processor, tmp_path / "a")
    params = dict(tree_flatten(model.parameters()))
    total = sum(w.nbytes for w in params.values())
    layer = max(sum(w.nbytes for _, w in tree_flatten(la.parameters()))
                for la in model.language_model.layers)
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


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_close_to_float32(processor, dtype):
    model = make_model(make_config(processor))
    ids = ids_with_images(processor, 1)
    px = mx.random.normal((1, 32, 32, 3))
    ref = np.array(model(ids, px))
    model.set_dtype(dtype)
    out = np.array(model(ids, px).astype(mx.float32))
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() < (0.02 if dtype == mx.float16 else 0.08) * max(scale, 1)


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


@pytest.mark.parametrize("tied", [True, False])
def test_last_only_logits_equal_the_last_row(processor, tied):
    cfg = make_config(processor)
    cfg.text_config.tie_word_embeddings = tied
    model = make_model(cfg)
    ids = mx.array([[5, 9, 11, 4, 7, 3]]) % (processor.image_token_id - 1)
    full = model(ids)
    np.testing.assert_allclose(np.array(model(ids, last_only=True)), np.array(full[:, -1:]),
                               rtol=1e-5, atol=1e-5)


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
    # gradients (training, LoRA) are MLX's own in both paths
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


def _decode_logits(lm, prompt, steps, cache_factory=None):
    cache = cache_factory() if cache_factory else make_prompt_cache(lm)
    logits, _ = lm(lm.embed(mx.array([prompt])), cache, last_only=True)
    out, tok = [np.array(logits[0, -1])], mx.array([[prompt[-1]]])
    for _ in range(steps):
        logits, _ = lm(lm.embed(tok), cache)
        out.append(np.array(logits[0, -1]))
        tok = logits[:, -1].argmax(-1, keepdims=True)
    return np.stack(out), cache


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("variant", ["gqa-tied", "mha-bias-untied", "traditional", "partial",
                                     "llama3", "moe-bias", "moe-shared-every-2"])
def test_numpy_decode_step_equals_the_mlx_layers(variant, batched, monkeypatch):
    from mm1_mlx.cpu import blas as backend
    from mm1_mlx.cpu import step as cpu_step
    from mm1_mlx.models.decoder import LanguageModel

    if batched:  # the cache is read by OpenBLAS's batched GEMM (where it has one), else numpy
        if backend.sgemm_batch_strided() is None:
            pytest.skip("the bound BLAS has no cblas_sgemm_batch_strided (OpenBLAS < 0.3.28)")
    else:
        monkeypatch.setattr(backend, "sgemm_batch_strided", lambda: None)

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
    calls = []
    real = cpu_step.decode
    monkeypatch.setattr(cpu_step, "decode", lambda *a: calls.append(r := real(*a)) or r)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    monkeypatch.setattr(cpu_step, "ENABLED", False)
    want, want_cache = _decode_logits(lm, prompt, 12)
    monkeypatch.setattr(cpu_step, "ENABLED", True)
    calls.clear()
    got, got_cache = _decode_logits(lm, prompt, 12)
    assert len(calls) == 13 and calls[0] is None and all(c is not None for c in calls[1:])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    for a, b in zip(got_cache, want_cache):  # the caches hold the same keys and values
        assert a.offset == b.offset == len(prompt) + 12
        for x, y in zip(a.state, b.state):
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batched", [True, False])
def test_numpy_decode_step_from_an_empty_cache(batched, monkeypatch):
    # a one-token prompt is "prefilled" by the decode step itself, with nothing cached yet
    from mm1_mlx.cpu import blas as backend
    from mm1_mlx.cpu import step as cpu_step
    from mm1_mlx.models.decoder import LanguageModel

    if not batched:
        monkeypatch.setattr(backend, "sgemm_batch_strided", lambda: None)
    mx.random.seed(8)
    lm = LanguageModel(TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4))
    mx.eval(lm.parameters())
    lm.eval()
    outs = []
    for enabled in (False, True):
        monkeypatch.setattr(cpu_step, "ENABLED", enabled)
        cache = make_prompt_cache(lm)
        steps = [lm(lm.embed(mx.array([[t]])), cache)[0] for t in (3, 9, 4)]
        outs.append(np.array(mx.concatenate(steps, axis=1)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert cpu_step.decode(lm, lm.embed(mx.array([[1]])), make_prompt_cache(lm)) is not None


def tree_map_scaled(params, s):
    from mlx.utils import tree_map

    return tree_map(lambda p: p * s if p.ndim == 2 else p, params)


def test_numpy_decode_step_leaves_other_models_to_mlx(processor):
    from mlx_lm.models.cache import RotatingKVCache

    from mm1_mlx.cpu import step as cpu_step
    from mm1_mlx.models.quantization import quantize_model
    from mm1_mlx.tuner.adapters import apply_lora, lora_config

    def runs_numpy(model, cache=None):
        lm = model.language_model
        cache = cache or make_prompt_cache(lm)
        lm(lm.embed(mx.array([[3, 4, 5]])), cache)
        return cpu_step.decode(lm, lm.embed(mx.array([[6]])), cache) is not None

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
