"""Fusing LoRA adapters: float bases exactly, quantized (QLoRA) bases re-quantized as they were."""

import mlx.core as mx
import pytest
from conftest import make_config, make_model
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from PIL import Image
from test_lora import small_args

from mm1_mlx import checkpoint, fuse, lora
from mm1_mlx.errors import MM1Error
from mm1_mlx.models.quantization import quantize_model
from mm1_mlx.tuner import adapters


def logits(model, processor):
    img = Image.new("RGB", (40, 40), (250, 250, 250))
    img.paste((20, 40, 230), (8, 8, 32, 32))
    ids, px, _ = processor("what color is the square ?", [img])
    return model(mx.array([ids]), mx.array(px)).astype(mx.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_lora import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data"))


def test_fuse_float_base(tmp_path, tiny_checkpoint, data):
    ad = tmp_path / "ad"
    lora.train(small_args(tiny_checkpoint, data, ad, iters=4), quiet=True)
    out = fuse.main(["--model", str(tiny_checkpoint), "--adapter-path", str(ad), "--out",
                     str(tmp_path / "fused")])
    fused, processor = checkpoint.load(str(out))
    unfused, _ = checkpoint.load(str(tiny_checkpoint), adapter_path=str(ad))
    base, _ = checkpoint.load(str(tiny_checkpoint))
    la, lf, lb = (logits(m, processor) for m in (unfused, fused, base))
    assert mx.abs(la - lb).max().item() > 0.1  # the adapter does something...
    assert mx.allclose(la, lf, atol=1e-4).item()  # ...and fusing keeps exactly that
    assert not any(isinstance(m, adapters.LORA_TYPES) for _, m in fused.named_modules())
    assert fused.config.name == "mm1+ad"
    with pytest.raises(MM1Error, match="not on this model mm1\\+ad"):  # no double application
        adapters.load_adapters(fused, ad)


@pytest.fixture(scope="module")
def moe_4bit(tmp_path_factory, processor):
    """A 4-bit MoE checkpoint whose expert stacks all quantize (group 32)."""
    config = make_config(processor, experts=4)
    config.text_config.moe_intermediate_size = 64
    model = make_model(config)
    quantize_model(model, bits=4, group_size=32)
    path = tmp_path_factory.mktemp("q") / "moe4"
    checkpoint.save(model, processor, path)
    return path


def test_qlora_on_quantized_moe_then_fuse(tmp_path, moe_4bit, data):
    ad = tmp_path / "ad"
    log = lora.train(small_args(moe_4bit, data, ad, iters=4), quiet=True)
    assert log["train"][-1][1] < log["train"][0][1]
    saved = mx.load(str(ad / "adapters.safetensors"))
    assert any(".switch_mlp.gate_proj.lora_a" in k for k in saved)  # expert stacks adapted
    # LoRA matrices, and the float connector trained whole (the default)
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") or k.startswith("connector.")
               for k in saved)

    base, processor = checkpoint.load(str(moe_4bit))
    unfused, _ = checkpoint.load(str(moe_4bit), adapter_path=str(ad))
    requant, _ = checkpoint.load(str(fuse.fuse(str(moe_4bit), str(ad), str(tmp_path / "f4"))))
    deq, _ = checkpoint.load(str(fuse.fuse(str(moe_4bit), str(ad), str(tmp_path / "f16"),
                                           dequantize=True, dtype="float32")))
    # re-quantized exactly as the base: the same modules, the same settings
    assert requant.config.quantization["modules"] == base.config.quantization["modules"]
    assert isinstance(requant.language_model.layers[1].mlp.switch_mlp.up_proj,
                      QuantizedSwitchLinear)
    assert deq.config.quantization is None
    lb, la, lq, ld = (logits(m, processor) for m in (base, unfused, requant, deq))
    change = mx.abs(la - lb).max().item()
    assert change > 0.1
    assert mx.abs(la - ld).max().item() < 0.02 * change + 1e-2  # rounding only
    # re-quantizing the merged weights costs a little 4-bit noise, far less than the adapter
    assert mx.abs(la - lq).mean().item() < 0.3 * mx.abs(la - lb).mean().item()


def test_dequantized_compute_matches_quantized(tmp_path, moe_4bit, data):
    """--dequantize-base computes the same losses from float copies; its adapter fits the base."""
    q = lora.train(small_args(moe_4bit, data, tmp_path / "q", iters=2), quiet=True)
    f = lora.train(small_args(moe_4bit, data, tmp_path / "f", iters=2, dequantize_base=True),
                   quiet=True)
    for (_, a), (_, b) in zip(q["train"], f["train"]):
        assert abs(a - b) < 1e-3 * max(1.0, a)
    model, _ = checkpoint.load(str(moe_4bit), adapter_path=str(tmp_path / "f"))
    assert model.config.quantization is not None
