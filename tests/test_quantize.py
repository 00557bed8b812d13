"""Quantization: real outputs of quantized tiny models, exact reloads, records, CLI errors."""

import mm1_mlx  # noqa: F401, I001  (binds BLAS before mlx.core)

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mm1_mlx.checkpoint import load, save
from mm1_mlx.models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from mm1_mlx.errors import MM1Error
from mm1_mlx.models.model import Model
from mm1_mlx.processor import ImageSettings, Processor
from mm1_mlx.models.quantization import apply_quantization, dequantize_model, quantize_model, weight_stats
from mm1_mlx.quantize import main, mean_kl

WORDS = ("what color is the square circle shape how many shapes are there where describe image "
         "it a an red blue green yellow one two left right top bottom center yes no . ? user "
         "assistant :").split()


@pytest.fixture(scope="module")
def processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<pad>", "<image>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])
    return Processor(fast, ImageSettings(image_size=32), num_image_tokens=4)


def make_model(processor, intermediate=128, experts=0, seed=0) -> Model:
    mx.random.seed(seed)
    config = ModelConfig(
        vision_config=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=32, patch_size=8),
        connector_config=ConnectorConfig(type="avg-pool", num_image_tokens=4),
        text_config=TextConfig(vocab_size=len(processor.tokenizer), hidden_size=64,
                               intermediate_size=intermediate, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               num_experts=experts, moe_intermediate_size=128,
                               shared_expert_intermediate_size=64 if experts else 0),
        image_token_id=processor.image_token_id,
    )
    model = Model(config)
    # a peakier head than the random init, so next-token distributions are not near uniform
    head = model.language_model.lm_head
    head.weight = head.weight * 6
    mx.eval(model.parameters())
    model.eval()
    return model


@pytest.fixture(scope="module")
def inputs(processor):
    rng = np.random.default_rng(0)
    img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    from PIL import Image

    ids, px, _ = processor("what color is the square ? how many shapes", [Image.fromarray(img)])
    return mx.array([ids]), mx.array(px)


def logprobs(model, inputs):
    ids, px = inputs
    return nn.log_softmax(model(ids, pixel_values=px)[0].astype(mx.float32), axis=-1)


def test_quantize_save_load_is_bit_exact(processor, inputs, tmp_path):
    for mode, gs in [("affine", 64), ("mxfp4", 32)]:
        model = make_model(processor)
        q = quantize_model(model, bits=4, group_size=gs, mode=mode)
        assert json.loads(json.dumps(q)) == q  # JSON-serialisable
        save(model, processor, tmp_path / mode)
        loaded, _ = load(str(tmp_path / mode), compute_dtype=None)  # as stored
        assert loaded.config.quantization == q
        ids, px = inputs
        a, b = model(ids, pixel_values=px), loaded(ids, pixel_values=px)
        assert np.array_equal(np.array(a), np.array(b))
        # by default the CPU computes a quantized model's float parts in float32: same values
        cpu_loaded, _ = load(str(tmp_path / mode))
        floats = [v for _, v in tree_flatten(cpu_loaded.parameters())
                  if mx.issubdtype(v.dtype, mx.floating)]
        assert floats and all(v.dtype == mx.float32 for v in floats)
        np.testing.assert_allclose(np.array(cpu_loaded(ids, pixel_values=px)), np.array(a),
                                   rtol=2e-2, atol=2e-2)
        q_proj = loaded.language_model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.mode == mode
        at = cpu_loaded.language_model.model.layers[0].self_attn  # packed as it loaded
        for name in ("weight", "scales", "biases") if mode == "affine" else ("weight", "scales"):
            views = [np.asarray(getattr(at, p)[name]) for p in ("q_proj", "k_proj", "v_proj")]
            assert all(b.ctypes.data == a.ctypes.data + a.nbytes  # one after the other
                       for a, b in zip(views, views[1:])), name


def test_quantized_logits_close_to_float(processor, inputs):
    ref = logprobs(make_model(processor), inputs)
    kls = {}
    for bits in (8, 4):
        model = make_model(processor)
        quantize_model(model, bits=bits, group_size=64)
        new = logprobs(model, inputs)
        kls[bits] = mean_kl([ref], [new])
        assert not np.array_equal(np.array(ref), np.array(new))  # it really changed
    assert kls[8] < 1e-3, kls
    assert kls[8] < kls[4] < 0.05, kls
    # agreement on the most likely next token
    model = make_model(processor)
    quantize_model(model, bits=8)
    top_q = np.array(logprobs(model, inputs).argmax(-1))
    assert (top_q == np.array(ref.argmax(-1))).mean() > 0.9


def test_moe_experts_quantize(processor, inputs, tmp_path):
    ref = logprobs(make_model(processor, experts=4), inputs)
    model = make_model(processor, experts=4)
    q = quantize_model(model, bits=8)
    mlp = model.language_model.model.layers[1].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(mlp.switch_mlp, name)
        assert isinstance(layer, QuantizedSwitchLinear) and layer.bits == 8
    assert isinstance(mlp.gate, nn.QuantizedLinear) and mlp.gate.bits == 8  # router
    assert q["modules"]["language_model.model.layers.1.mlp.shared_expert_gate"]["bits"] == 8
    new = logprobs(model, inputs)
    assert mean_kl([ref], [new]) < 2e-3
    # 4-bit experts through gather_qmm, and the record rebuilds them on load
    model4 = make_model(processor, experts=4)
    quantize_model(model4, bits=4)
    assert mean_kl([ref], [logprobs(model4, inputs)]) < 0.1
    save(model4, processor, tmp_path / "moe4")
    loaded, _ = load(str(tmp_path / "moe4"), compute_dtype=None)  # as stored
    assert np.array_equal(np.array(logprobs(loaded, inputs)), np.array(logprobs(model4, inputs)))


def test_per_module_record_rebuilds_exactly(processor):
    model = make_model(processor, intermediate=96)  # down_proj input 96 is not a multiple of 64
    q = quantize_model(model, bits=4, group_size=64, recipe="mixed_4_8")
    skip = "language_model.model.layers.0.mlp.down_proj"
    assert skip not in q["modules"] and "96" in q["skipped"][skip]
    m = q["modules"]
    assert m["language_model.lm_head"]["bits"] == 8
    assert m["language_model.model.layers.1.self_attn.v_proj"]["bits"] == 8  # last layer
    assert m["language_model.model.layers.0.self_attn.v_proj"]["bits"] == 4
    assert m["language_model.model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert m["language_model.model.embed_tokens"]["bits"] == 4
    assert not any(k.startswith(("vision_tower", "connector")) for k in m)
    fresh = Model(ModelConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))))
    apply_quantization(fresh, q)
    kinds = {k: (type(v).__name__, getattr(v, "bits", None), getattr(v, "group_size", None))
             for k, v in fresh.named_modules()}
    assert kinds == {k: (type(v).__name__, getattr(v, "bits", None), getattr(v, "group_size", None))
                     for k, v in model.named_modules()}
    shapes = {k: v.shape for k, v in tree_flatten(fresh.parameters())}
    assert shapes == {k: v.shape for k, v in tree_flatten(model.parameters())}
    with pytest.raises(MM1Error, match="does not have"):
        apply_quantization(Model(model.config), {"modules": {"language_model.nope": {"bits": 4}}})


def test_vision_and_connector_bits(processor, inputs):
    ref = logprobs(make_model(processor), inputs)
    model = make_model(processor)
    q = quantize_model(model, bits=8, vision_bits=8, connector_bits=8)
    fc1 = model.vision_tower.encoder.layers[0].mlp.fc1
    assert isinstance(fc1, nn.QuantizedLinear) and fc1.bits == 8
    assert isinstance(model.connector.readout.layers[0], nn.QuantizedLinear)
    assert type(model.vision_tower.embeddings.position_embedding) is nn.Embedding
    assert "vision_tower.encoder.layers.0.self_attn.q_proj" in q["modules"]
    assert mean_kl([ref], [logprobs(model, inputs)]) < 2e-3
    plain = make_model(processor)
    quantize_model(plain, bits=8)
    assert not isinstance(plain.vision_tower.encoder.layers[0].mlp.fc1, nn.QuantizedLinear)
    assert plain.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == mx.float16


def test_four_bit_decoder_bytes(processor):
    model = make_model(processor)
    fp16_bytes = weight_stats(model, "language_model.")[1] * 2
    quantize_model(model, bits=4, group_size=64)
    q_bytes, _ = weight_stats(model, "language_model.")
    assert q_bytes <= 0.30 * fp16_bytes, q_bytes / fp16_bytes
    assert model.language_model.model.layers[0].self_attn.q_proj.scales.dtype == mx.float16


def test_settings_errors(processor):
    model = make_model(processor)
    with pytest.raises(MM1Error, match="mxfp4"):
        quantize_model(model, bits=8, group_size=32, mode="mxfp4")
    quantize_model(model, bits=4)
    with pytest.raises(MM1Error, match="already quantized"):
        quantize_model(model, bits=4)


def test_cli_quantize_report_and_requantize_error(processor, tmp_path, capsys):
    src, out, again = tmp_path / "float", tmp_path / "q8", tmp_path / "q8q"
    save(make_model(processor), processor, src)
    report = main(["--model", str(src), "--out", str(out), "--bits", "8", "--eval-prompts", "2",
                   "--eval-n", "2"])
    assert (out / "quantization_report.json").exists() and (out / "quantization_report.md").exists()
    saved = json.loads((out / "quantization_report.json").read_text())
    assert saved["kl"]["mean"] == report["kl"]["mean"] and 0 < saved["kl"]["mean"] < 1e-2
    assert saved["size_after"] < 0.6 * saved["size_before"]
    assert 8 < saved["bits_per_weight"]["decoder"] < 9
    shown = capsys.readouterr()
    assert "size on disk" in shown.out
    # the default evaluation takes most of the time: it is announced and shows progress
    for step in ("--no-eval skips it", "float model: KL", "float model: accuracy",
                 "quantized model: KL", "eval: 100%"):
        assert step in shown.err, step
    with pytest.raises(SystemExit) as e:
        main(["--model", str(out), "--out", str(again), "--no-eval"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already quantized" in err and err.count("\n") == 1
    assert not again.exists()


def test_dequantize_round_trip(processor, inputs, tmp_path):
    model = make_model(processor, experts=4)
    quantize_model(model, bits=4)
    save(model, processor, tmp_path / "q")
    # float32: MoE gather_mm on Linux CPU takes only float32
    main(["--model", str(tmp_path / "q"), "--out", str(tmp_path / "f"), "--dequantize",
          "--dtype", "float32"])
    floats, _ = load(str(tmp_path / "f"))
    assert floats.config.quantization is None
    params = dict(tree_flatten(floats.parameters()))
    n = 0
    for path, m in model.named_modules():
        if hasattr(m, "scales"):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
            got = params[f"{path}.weight"]
            assert got.dtype == mx.float32 and np.array_equal(np.array(got), np.array(w)), path
            n += 1
    assert n > 10
    assert not any(hasattr(m, "scales") for _, m in floats.named_modules())
    # the float model computes what the quantized one does (up to float16 activations)
    assert mean_kl([logprobs(model, inputs)], [logprobs(floats, inputs)]) < 1e-3
    # the in-memory dequantize gives the same weights (in float16)
    dequantize_model(model)
    head = model.language_model.lm_head.weight
    assert head.dtype == mx.float16
    assert np.array_equal(np.array(head), np.array(floats.language_model.lm_head.weight))
    with pytest.raises(MM1Error, match="not quantized"):
        dequantize_model(model)


def test_cli_accuracy_delta(processor, inputs, tmp_path, monkeypatch):
    """With an ``mm1_mlx.shapes.eval.evaluate``, the report holds float and quantized accuracy."""
    import sys
    import types

    src = tmp_path / "float"
    save(make_model(processor), processor, src)
    target = np.array(logprobs(make_model(processor), inputs).argmax(-1))

    def evaluate(model, processor, n, seed, progress=False):  # % of next tokens agreeing
        return {"overall": 100 * float((np.array(logprobs(model, inputs).argmax(-1)) == target)
                                       .mean())}

    monkeypatch.setitem(sys.modules, "mm1_mlx.shapes.eval", types.SimpleNamespace(evaluate=evaluate))
    report = main(["--model", str(src), "--out", str(tmp_path / "q"), "--eval-prompts", "1",
                   "--eval-n", "5"])
    acc = report["accuracy"]
    assert acc["float"] == 100 and acc["n"] == 5
    assert 50 < acc["quantized"] <= 100 and acc["delta"] == acc["quantized"] - 100
    assert "delta" in (tmp_path / "q" / "quantization_report.md").read_text()
