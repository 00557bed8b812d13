"""Core ML export of the image encoder + connector (convert/coreml.py, convert/torch_twin.py)."""

import json
import sys

# isort: off
import mm1_mlx  # noqa: F401  (binds OpenBLAS before mlx.core loads)
import mlx.core as mx

# isort: on
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mm1_mlx import checkpoint
from mm1_mlx.models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from mm1_mlx.models.model import Model
from mm1_mlx.processor import ImageSettings, Processor

pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

from convert import coreml, torch_twin  # noqa: E402
from mm1_mlx import coreml as coreml_backend  # noqa: E402

MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<image>", "a", "red", "circle", "USER:", "ASSISTANT:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])


def tiny_config(connector: str, connector_kw: dict | None = None, **vision) -> ModelConfig:
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="gelu")
    vc.update(vision)
    cc = dict(type=connector, num_image_tokens=4, hidden_size=32, depth=1, num_heads=4)
    cc.update(connector_kw or {})
    return ModelConfig(
        vision_config=VisionConfig(**vc),
        connector_config=ConnectorConfig(**cc),
        text_config=TextConfig(vocab_size=8, hidden_size=48, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=4),
        image_token_id=2, name=f"tiny-{connector}")


def random_model(config: ModelConfig, seed: int = 0) -> Model:
    """A model whose every parameter (norms and biases too) is random, so each one matters."""
    mx.random.seed(seed)
    model = Model(config)
    params = {k: mx.random.normal(v.shape) * (0.3 if v.ndim > 1 else 0.5) + (v.ndim == 1)
              for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(params.items()))
    return model.eval()


def save_tiny(path, config: ModelConfig, seed: int = 0):
    model = random_model(config, seed)
    proc = Processor(tiny_tokenizer(), ImageSettings(image_size=config.vision_config.image_size,
                                                     image_mean=MEAN, image_std=STD),
                     config.num_image_tokens)
    return checkpoint.save(model, proc, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Saved tiny checkpoints, one per connector type (built lazily)."""
    root, made = tmp_path_factory.mktemp("ckpts"), {}

    def get(connector: str):
        if connector not in made:
            made[connector] = save_tiny(root / connector, tiny_config(connector))
        return made[connector]

    return get


def spec_of(path):
    return ct.utils.load_spec(str(path))


def program_ops(spec) -> set:
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    return {op.type for op in block.operations}


# ---- the PyTorch twin vs MLX, float32, rendered images ----
TWIN_CASES = {
    "c-abstractor": ("c-abstractor", {}),
    "avg-pool": ("avg-pool", {}),
    "attention-pool": ("attention-pool", {}),
    "mlp": ("mlp", {"hidden_act": "quick_gelu"}),
    "siglip-like": ("c-abstractor", dict(class_token=False, pre_layernorm=False,
                                         patch_bias=True, post_layernorm=True, feature_layer=-1,
                                         hidden_act="gelu_pytorch_tanh")),
    "mlp-keep-cls": ("mlp", dict(keep_class_token=True)),
    "interpolated-pos": ("avg-pool", dict(image_size=48, pretrain_image_size=32)),
    "honeybee-c-abstractor": ("c-abstractor", {}),
}
# Honeybee's blocks: depthwise 3x3, eps 1e-5, a position embedding, prenorm, a width change
CONNECTOR_KW = {"honeybee-c-abstractor": dict(group_size=1, layer_norm_eps=1e-5, pos_emb=True,
                                              prenorm=True, hidden_size=24)}


@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_twin_matches_mlx(case):
    connector, vision = TWIN_CASES[case]
    config = tiny_config(connector, CONNECTOR_KW.get(case), **vision)
    model = random_model(config, seed=1)
    twin = torch_twin.build_twin(model, MEAN, STD)
    images = coreml.sample_images(config.vision_config.image_size, n=3)
    ref = torch_twin.mlx_features(model, images, MEAN, STD)
    got = torch_twin.twin_features(twin, images)
    T = config.num_image_tokens
    assert ref.shape == got.shape == (3, T, 48)
    assert np.abs(ref).max() > 0.1  # a real signal, not zeros
    assert np.abs(got - ref).max() < 1e-3
    # different images give different tokens: the check is not vacuous
    assert np.abs(ref[0] - ref[1]).max() > 1e-2


def test_twin_dequantizes_quantized_layers():
    import mlx.nn as nn

    config = tiny_config("c-abstractor")
    mx.random.seed(2)
    model = Model(config)
    def linear(_, m):
        return isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0

    nn.quantize(model.vision_tower, group_size=32, bits=8, class_predicate=linear)
    nn.quantize(model.connector, group_size=32, bits=4, class_predicate=linear)
    model.eval()
    assert isinstance(model.vision_tower.encoder.layers[0].mlp.fc1, nn.QuantizedLinear)
    weights = torch_twin.export_weights(model)
    assert not any(k.endswith(".scales") for k in weights)
    pos = weights["vision_tower.embeddings.position_embedding.weight"]
    assert pos.shape == (17, 32) and pos.dtype == np.float32
    twin = torch_twin.build_twin(model, MEAN, STD)
    images = coreml.sample_images(32, n=2)
    ref = torch_twin.mlx_features(model, images, MEAN, STD)
    assert np.abs(torch_twin.twin_features(twin, images) - ref).max() < 1e-3


def test_export_quantized_checkpoint(tmp_path):
    from mm1_mlx.models.quantization import quantize_model

    model = random_model(tiny_config("attention-pool"), seed=3)
    q = quantize_model(model, bits=4, group_size=32, vision_bits=4, connector_bits=8)
    assert any(k.startswith("vision_tower.") for k in q["modules"])
    proc = Processor(tiny_tokenizer(), ImageSettings(image_size=32, image_mean=MEAN,
                                                     image_std=STD), 4)
    ck = checkpoint.save(model, proc, tmp_path / "q")
    out = tmp_path / "q.mlpackage"
    _, diff = coreml.export(str(ck), str(out), "float32")
    assert diff < 1e-3
    meta = dict(spec_of(out).description.metadata.userDefined)
    assert meta["mm1_mlx.connector"] == "attention-pool"


def test_twin_rejects_missing_weights():
    config = tiny_config("mlp")
    model = Model(config)
    twin = torch_twin.ImageEncoder(config, torch_twin.VisionModel(config.vision_config, 2), MEAN,
                                   STD)
    weights = torch_twin.export_weights(model)
    del weights["connector.readout.layers.1.weight"]
    with pytest.raises(mm1_mlx.errors.MM1Error, match="missing.*readout.layers.1.weight"):
        torch_twin.load_twin_weights(twin, weights)


# ---- export: spec, metadata ----
@pytest.mark.parametrize("connector,tokens", [("c-abstractor", 4), ("mlp", 16)])
def test_export_spec(ckpts, tmp_path, capsys, connector, tokens):
    out = tmp_path / "enc.mlpackage"
    coreml.main(["--model", str(ckpts(connector)), "--out", str(out), "--precision", "float32"])
    assert "max |diff|" in capsys.readouterr().out
    spec = spec_of(out)
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,) = spec.description.input
    assert inp.name == "image"
    img = inp.type.imageType
    assert (img.width, img.height) == (32, 32)
    assert img.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    (outp,) = spec.description.output
    assert outp.name == "image_features"
    assert list(outp.type.multiArrayType.shape) == [1, tokens, 48]
    assert outp.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert spec.specificationVersion >= 8  # macOS 14 / iOS 17
    meta = dict(spec.description.metadata.userDefined)
    assert meta["mm1_mlx.model"] == f"tiny-{connector}"
    assert meta["mm1_mlx.image_size"] == "32"
    assert meta["mm1_mlx.num_image_tokens"] == str(tokens)
    assert meta["mm1_mlx.hidden_size"] == "48"
    assert meta["mm1_mlx.version"] == mm1_mlx.__version__
    assert json.loads(meta["mm1_mlx.image_std"]) == STD
    assert float(meta["mm1_mlx.twin_max_abs_diff"]) < 1e-3
    # the normalisation lives in the graph: its constants are in the program
    info = coreml_backend.read_package_info(str(out))
    assert (info.image_size, info.num_image_tokens, info.hidden_size) == (32, tokens, 48)
    assert info.image_mean == MEAN


@pytest.mark.parametrize("compress,op", [("int8", "constexpr_affine_dequantize"),
                                         ("palettize4", "constexpr_lut_to_dense")])
def test_export_compressed(ckpts, tmp_path, compress, op):
    out = tmp_path / "enc.mlpackage"
    coreml.main(["--model", str(ckpts("c-abstractor")), "--out", str(out), "--compress",
                 compress, "--no-check"])
    spec = spec_of(out)
    assert op in program_ops(spec)
    assert dict(spec.description.metadata.userDefined)["mm1_mlx.compress"] == compress


def test_export_replaces_existing_package(ckpts, tmp_path, capsys):
    out = tmp_path / "sub" / "enc.mlpackage"
    coreml.main(["--model", str(ckpts("mlp")), "--out", str(out), "--no-check"])
    capsys.readouterr()
    err = run_error(capsys, ["--model", str(ckpts("c-abstractor")), "--out", str(out),
                             "--no-check"])
    assert "--force" in err  # an existing package is replaced only when asked
    coreml.main(["--model", str(ckpts("c-abstractor")), "--out", str(out), "--no-check",
                 "--force"])
    assert dict(spec_of(out).description.metadata.userDefined)["mm1_mlx.connector"] == \
        "c-abstractor"
    assert sorted(p.name for p in out.parent.iterdir()) == ["enc.mlpackage"]  # no leftovers


# ---- bad input: one line, exit 2 ----
def run_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        coreml.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_error_unsupported_connector(ckpts, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(ckpts("mlp"), ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["connector_config"]["type"] = "perceiver"
    (ck / "config.json").write_text(json.dumps(cfg))
    err = run_error(capsys, ["--model", str(ck), "--out", str(tmp_path / "e.mlpackage")])
    assert "connector_config.type = 'perceiver'" in err and "c-abstractor" in err


def test_error_missing_weights(ckpts, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(ckpts("mlp"), ck)
    w = mx.load(str(ck / "model.safetensors"))
    del w["connector.readout.layers.0.weight"]
    mx.save_safetensors(str(ck / "model.safetensors"), w)
    err = run_error(capsys, ["--model", str(ck), "--out", str(tmp_path / "e.mlpackage")])
    assert "connector.readout.layers.0.weight" in err or "do not fit" in err
    (ck / "model.safetensors").unlink()
    assert "no model" in run_error(capsys, ["--model", str(ck), "--out",
                                            str(tmp_path / "e.mlpackage")])
    assert not (tmp_path / "e.mlpackage").exists()


def test_error_unwritable_output(ckpts, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = run_error(capsys, ["--model", str(ckpts("mlp")), "--out",
                             str(blocker / "enc.mlpackage")])
    assert "cannot write" in err
    err = run_error(capsys, ["--model", str(ckpts("mlp")), "--out", str(tmp_path / "enc.bin")])
    assert ".mlpackage" in err
    err = run_error(capsys, ["--model", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "e.mlpackage")])
    assert "model not found" in err


# ---- the runtime side ----
def test_uint8_round_trip_of_processor_pixels():
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    proc = Processor(tiny_tokenizer(), ImageSettings(image_size=32, image_mean=MEAN,
                                                     image_std=STD, max_image_tiles=4), 4)
    prep = proc.prepare_image(Image.fromarray(arr))
    assert prep.num_sub_images > 1  # tiles + overview
    back = coreml_backend.to_uint8_images(prep.pixels, MEAN, STD)
    again = (back.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
    assert np.abs(again - prep.pixels).max() < 1e-5


def test_backend_needs_macos_and_a_package(tmp_path):
    with pytest.raises(mm1_mlx.errors.MM1Error):
        coreml_backend.read_package_info(str(tmp_path / "missing.mlpackage"))
    if sys.platform != "darwin":
        with pytest.raises(mm1_mlx.errors.MM1Error, match="macOS"):
            coreml_backend.CoreMLEncoder(str(tmp_path / "x.mlpackage"))


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS")
@pytest.mark.parametrize("precision,tol", [("float32", 1e-3), ("float16", 3e-2)])
def test_coreml_prediction_matches_mlx(ckpts, tmp_path, precision, tol):
    path = ckpts("c-abstractor")
    out = tmp_path / "enc.mlpackage"
    coreml.main(["--model", str(path), "--out", str(out), "--precision", precision])
    model, proc = checkpoint.load(str(path))
    enc = coreml_backend.CoreMLEncoder(str(out), compute_units="cpu_only" if precision ==
                                       "float32" else None)
    enc.check_model(model.config)
    images = coreml.sample_images(32, n=3)
    px = ((images - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)
    got = enc.encode(px)
    ref = np.array(model.encode_images(mx.array(px)))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max())


# ---- the default model ----
@pytest.mark.skipif("mm1-tiny" not in checkpoint.bundled_models(),
                    reason="mm1-tiny is not trained yet")
def test_export_default_model(tmp_path):
    out = tmp_path / "mm1-tiny.mlpackage"
    coreml.main(["--out", str(out)])
    config = checkpoint.read_config(checkpoint.resolve("mm1-tiny"))
    spec = spec_of(out)
    img = spec.description.input[0].type.imageType
    assert img.width == img.height == config.vision_config.image_size
    shape = list(spec.description.output[0].type.multiArrayType.shape)
    assert shape == [1, config.num_image_tokens, config.text_config.hidden_size]
    meta = dict(spec.description.metadata.userDefined)
    assert float(meta["mm1_mlx.twin_max_abs_diff"]) < 1e-3
