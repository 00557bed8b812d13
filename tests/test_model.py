"""The core model: values, not shapes. KV cache, MoE routing, aux losses, connectors, images."""

import mm1_mlx  # noqa: F401, I001

import json
import math

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


@pytest.mark.parametrize("tied", [True, False])
def test_last_only_logits_equal_the_last_row(processor, tied):
    cfg = make_config(processor)
    cfg.text_config.tie_word_embeddings = tied
    model = make_model(cfg)
    ids = mx.array([[5, 9, 11, 4, 7, 3]]) % (processor.image_token_id - 1)
    full = model(ids)
    np.testing.assert_allclose(np.array(model(ids, last_only=True)), np.array(full[:, -1:]),
                               rtol=1e-5, atol=1e-5)
