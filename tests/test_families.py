"""Other projects' checkpoints (issue 23): Honeybee's C-Abstractor, DFN-CLIP, AIMv2, FastVLM.

Each reference is built by its own library in a subprocess (``tests/references.py``: timm,
open_clip, transformers), small and random, saved in that project's layout; we convert it with
our converter and compare what both compute.
"""

import mm1_mlx  # noqa: F401, I001  (binds the BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from references import run_reference  # noqa: E402
from test_parity import IMAGE_ID, VOCAB, convert_cli, make_tokenizer, mlx_greedy  # noqa: E402

from mm1_mlx.formats import honeybee  # noqa: E402
from mm1_mlx.models.config import ModelConfig  # noqa: E402
from mm1_mlx.models.connector import CAbstractor  # noqa: E402
from mm1_mlx.models.vision import VisionModel  # noqa: E402


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- Honeybee's C-Abstractor ----------------------------------------------------------------

HONEYBEE = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=48, patch_size=8),
    text=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    # hidden 24 != vision 32: the first block's shortcut is a conv; 22 % 4 != 0 for SE's round()
    projector=dict(num_query_tokens=9, hidden_size=24, depth=2, mlp_depth=2, pos_emb=True,
                   prenorm=True, feature_layer_index=-1),
    image_token_id=IMAGE_ID,
)


@pytest.fixture(scope="module")
def honeybee_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("honeybee")
    ids = [1, 5, 6, *[IMAGE_ID] * 9, 7, 8, 9]
    io = run_reference("honeybee", out, **HONEYBEE, input_ids=ids, cls_pos_emb=True)
    make_tokenizer().save_pretrained(out)
    return out, io


def test_honeybee_cabstractor_parity(honeybee_dir):
    """Their abstractor (timm RegStage, as their code builds it) vs ours, on the same features."""
    path, io = honeybee_dir
    cfg = json_config(path)
    config = ModelConfig(connector_config=honeybee.connector_config(cfg))
    config.vision_config.image_size, config.vision_config.patch_size = 48, 8
    raw = mx.load(str(path / "model.safetensors"))
    w = honeybee.honeybee_weights({k: v for k, v in raw.items() if k.startswith("abstractor.")},
                                  config)
    again = honeybee.honeybee_weights(w, config)  # idempotent
    assert again.keys() == w.keys() and all(np.array_equal(again[k], w[k]) for k in w)
    conn = CAbstractor(config.connector_config, 32, 48, num_patches=36)
    conn.load_weights([(k[len("connector."):], v) for k, v in w.items()], strict=True)
    ours = conn(mx.array(io["features"]))
    np.testing.assert_allclose(np.array(ours), io["abstractor_out"], rtol=1e-5, atol=1e-5)
    assert w["connector.stage1.0.conv2.conv.weight"].shape == (24, 3, 3, 1)  # depthwise


def test_honeybee_cli_parity(honeybee_dir, tmp_path):
    path, io = honeybee_dir
    model, processor = convert_cli(["--hf-path", str(path), "--mlx-path", str(tmp_path / "mlx")])
    cc = model.config.connector_config
    assert (cc.group_size, cc.layer_norm_eps, cc.pos_emb, cc.prenorm) == (1, 1e-5, True, True)
    ours, tokens = mlx_greedy(model, io["input_ids"], pixel_values=mx.array(io["pixel_values"]))
    assert rel_err(ours, io["logits"]) <= 1e-3
    assert tokens == io["tokens"].tolist()
    prompt = processor.apply_chat_template(processor.messages("what is this ?", 1))
    assert prompt.endswith("Human: <image>\nHuman: what is this ?\nAI: ")
    assert processor.image.resize_mode == "squash" and processor.image.image_std == [0.25] * 3


def json_config(path):
    import json

    return json.loads((path / "config.json").read_text())


# ---- DFN-CLIP (OpenCLIP) ------------------------------------------------------------------

def openclip_tower(path, layer, image_size):
    from test_parity import TEXT

    from mm1_mlx.formats.assemble import vision_source
    from mm1_mlx.formats.configs import text_config
    from mm1_mlx.formats.weights import convert_weights

    src = vision_source(path, layer)
    vc = src.vision
    vc.keep_class_token = True
    vc.pretrain_image_size, vc.image_size = vc.image_size, image_size
    config = ModelConfig(vision_config=vc, text_config=text_config(dict(TEXT, model_type="llama")))
    w = convert_weights(src.weights, config, allow_missing=("connector.", "language_model."))
    tower = VisionModel(vc)
    tower.load_weights([(k[len("vision_tower."):], v) for k, v in w.items()], strict=True)
    return tower, src


# DFN5B-CLIP-ViT-H-14-378's vision_cfg (image_size 378, patch 14: a 27x27 grid, quick_gelu),
# narrow and shallow
DFN = dict(image_size=378, layers=3, width=32, head_width=8, patch_size=14)


@pytest.mark.parametrize("run_size", [378, 434])
def test_dfn_clip_parity(tmp_path, run_size):
    io = run_reference("openclip", tmp_path, vision=DFN, run_image_size=run_size)
    px = mx.array(io["pixel_values"])
    for layer in (-2, -1):
        tower, src = openclip_tower(tmp_path, layer, run_size)
        assert rel_err(tower(px), io["hidden"][layer]) <= 1e-4
    assert src.vision.hidden_act == "quick_gelu" and tower.config.num_patches == (run_size // 14) ** 2
    s = src.image_settings
    assert (s.image_size, s.resize_mode, s.image_std) == (378, "squash", [0.2, 0.25, 0.3])


@pytest.mark.parametrize("src,dst", [(27, 31), (27, 16), (5, 5)])
def test_antialias_matrix_is_torchs(src, dst):
    import torch

    from mm1_mlx.models.vision import interpolate_grid

    grid = torch.randn(1, 3, src, src)
    ref = torch.nn.functional.interpolate(grid, size=(dst, dst), mode="bicubic", antialias=True,
                                          align_corners=False)
    pos = mx.array(grid[0].permute(1, 2, 0).reshape(src * src, 3).numpy())
    ours = np.array(interpolate_grid(pos, src, dst, antialias=True)).reshape(dst, dst, 3)
    np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), atol=1e-5)


# ---- AIMv2 --------------------------------------------------------------------------------

def aimv2_model(path, kind):
    import torch
    from transformers import Aimv2Config, Aimv2Model, Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  image_size=28, patch_size=7, use_head=True)
    if kind == "aimv2":  # the contrastive model: its vision_config, weights under vision_model.
        text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=4, vocab_size=64, max_position_embeddings=16)
        hf = Aimv2Model(Aimv2Config(vision_config=vision, text_config=text, projection_dim=16))
    else:
        hf = Aimv2VisionModel(Aimv2VisionConfig(**vision, qkv_bias=True))
    randomize_torch(hf)
    hf.eval().save_pretrained(path)
    return hf.vision_model if kind == "aimv2" else hf


def randomize_torch(module):
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))


@pytest.mark.parametrize("kind", ["aimv2_vision_model", "aimv2"])
def test_aimv2_encoder_parity(tmp_path, kind):
    import torch

    from mm1_mlx.formats.assemble import vision_source
    from mm1_mlx.formats.weights import convert_weights

    hf = aimv2_model(tmp_path, kind)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
    assert len(out.hidden_states) == 4  # the embeddings, then one per layer
    ours_px = mx.array(px.permute(0, 2, 3, 1).numpy())
    for layer, post, ref in [(-2, False, out.hidden_states[-2]), (-1, False, out.hidden_states[-1]),
                             (-1, True, out.last_hidden_state)]:
        src = vision_source(tmp_path, layer)
        src.vision.post_layernorm = post
        config = ModelConfig(vision_config=src.vision)
        w = convert_weights(src.weights, config, allow_missing=("connector.", "language_model."))
        tower = VisionModel(src.vision)
        tower.load_weights([(k[len("vision_tower."):], v) for k, v in w.items()], strict=True)
        assert rel_err(tower(ours_px), ref.numpy()) <= 1e-4
    assert (src.vision.rms_norm, src.vision.gated_mlp, src.vision.qkv_bias) == \
        (True, True, kind == "aimv2_vision_model")


def test_aimv2_assembly(tmp_path):
    """--vision AIMV2 --text LLAMA with a fresh C-Abstractor: converts, loads, generates."""
    from test_parity import decoder, image, mlx_greedy

    aimv2_model(tmp_path / "vision", "aimv2_vision_model")
    decoder("llama").save_pretrained(tmp_path / "text")
    make_tokenizer(VOCAB).save_pretrained(tmp_path / "text")
    model, processor = convert_cli(["--vision", str(tmp_path / "vision"), "--text",
                                    str(tmp_path / "text"), "--image-tokens", "4",
                                    "--mlx-path", str(tmp_path / "mlx")])
    assert model.config.vision_config.gated_mlp and model.config.connector_config.group_size == 1
    ids, px, _ = processor([{"role": "user", "content": "<image>\ndescribe this picture"}],
                           [image()])
    logits, tokens = mlx_greedy(model, np.array([ids]), n=3, pixel_values=mx.array(px))
    assert np.isfinite(logits).all() and len(tokens) == 3


# ---- FastVLM -----------------------------------------------------------------------------------

FASTVLM = dict(
    # fastvit_mci3's layout (3 RepMixer stages, 2 attention stages with RepCPE), one block each
    model_args=dict(layers=[1, 1, 1, 1, 2], embed_dims=[8, 16, 32, 32, 64]),
    text=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    image_token_id=IMAGE_ID, image_tokens=9, image_size=192,  # 192 / 64 = 3: 9 image tokens
)


@pytest.fixture(scope="module")
def fastvlm_dirs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fastvlm")
    io = run_reference("fastvlm", out, **FASTVLM, input_ids=[1, 5, *[IMAGE_ID] * 9, 7, 8])
    for d in ("native", "apple"):
        make_tokenizer().save_pretrained(out / d)
    return out, io


@pytest.mark.parametrize("layout", ["native", "apple"])
def test_fastvlm_cli_parity(fastvlm_dirs, tmp_path, layout):
    path, io = fastvlm_dirs
    model, processor = convert_cli(["--hf-path", str(path / layout),
                                    "--mlx-path", str(tmp_path / "mlx")])
    vc = model.config.vision_config
    assert (vc.layers, vc.token_mixers[3], vc.pos_embs, vc.hidden_size) == \
        ([1, 1, 1, 1, 2], "attention", [False, False, False, True, True], 128)
    px = mx.array(io["pixel_values"])
    assert rel_err(model.vision_tower(px), io["features"]) <= 1e-4
    ours, tokens = mlx_greedy(model, io["input_ids"], pixel_values=px)
    assert rel_err(ours, io["logits"]) <= 1e-3
    assert tokens == io["tokens"].tolist()
    if layout == "apple":  # ml-fastvlm's processor: pad to square, mean 0, std 1
        assert (processor.image.resize_mode, processor.image.image_std) == ("pad", [1.0] * 3)


def test_fastvlm_weights_idempotent(fastvlm_dirs):
    from mm1_mlx.formats import fastvlm

    path, _ = fastvlm_dirs
    native = fastvlm.fastvlm_weights(mx.load(str(path / "native/model.safetensors")))
    apple = fastvlm.fastvlm_weights(mx.load(str(path / "apple/model.safetensors")))
    assert native.keys() == apple.keys()
    assert all(np.array_equal(native[k], apple[k]) for k in native)
    again = fastvlm.fastvlm_weights(native)
    assert again.keys() == native.keys() and all(np.array_equal(again[k], native[k])
                                                 for k in native)


def test_fastvlm_coreml_export(fastvlm_dirs, tmp_path):
    """FastVLM's encoder + projector as Core ML, as Apple ships it (prediction needs macOS)."""
    pytest.importorskip("coremltools")
    from convert import torch_twin
    from convert.coreml import main as coreml_main

    path, io = fastvlm_dirs
    convert_cli(["--hf-path", str(path / "apple"), "--mlx-path", str(tmp_path / "mlx")])
    model, _ = mm1_mlx.load(str(tmp_path / "mlx"))
    twin = torch_twin.build_twin(model, [0.0] * 3, [1.0] * 3)
    images = np.random.default_rng(0).random((2, 192, 192, 3), np.float32)
    ref = torch_twin.mlx_features(model, images, [0.0] * 3, [1.0] * 3)
    assert rel_err(torch_twin.twin_features(twin, images), ref) <= 1e-4
    # the converter's config records 192 px (mm_vision_tower mobileclip_l_192)
    coreml_main(["--model", str(tmp_path / "mlx"), "--out", str(tmp_path / "enc.mlpackage"),
                 "--precision", "float32"])
    import coremltools as ct

    spec = ct.utils.load_spec(str(tmp_path / "enc.mlpackage"))
    (inp,) = spec.description.input
    assert inp.name == "image" and (inp.type.imageType.width, inp.type.imageType.height) == (192, 192)
    (out,) = spec.description.output
    assert list(out.type.multiArrayType.shape) == [1, 9, 32]  # 3x3 positions, decoder width


def test_honeybee_archive_named(tmp_path, capsys):
    from convert.__main__ import main as convert_main

    (tmp_path / "7B-C-Abs-M144.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(SystemExit) as e:
        convert_main(["--hf-path", str(tmp_path / "7B-C-Abs-M144.tar.gz"),
                      "--mlx-path", str(tmp_path / "out")])
    assert e.value.code == 2 and "extract it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fastvlm_and_honeybee_load_by_model(fastvlm_dirs, honeybee_dir, tmp_path, monkeypatch):
    """``load`` (``--model``) converts them like LLaVA: the family table knows both layouts."""
    monkeypatch.setenv("MM1_MLX_CACHE", str(tmp_path / "cache"))
    (fpath, fio), (hpath, hio) = fastvlm_dirs, honeybee_dir
    model, _ = mm1_mlx.load(str(fpath / "apple"), dtype="float32")
    ours = model(mx.array(fio["input_ids"]), pixel_values=mx.array(fio["pixel_values"]))
    assert rel_err(ours, fio["logits"]) <= 1e-3
    model, _ = mm1_mlx.load(str(hpath), dtype="float32")
    ours = model(mx.array(hio["input_ids"]), pixel_values=mx.array(hio["pixel_values"]))
    assert rel_err(ours, hio["logits"]) <= 1e-3
