"""The converter: inputs (safetensors, shards, pickles, hub ids), failures, idempotency, OpenCLIP,
key layouts, sparse upcycling and quantization."""

import mm1_mlx  # noqa: F401, I001  (binds the BLAS before mlx.core loads)
import json
import os

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from test_parity import (  # noqa: E402
    IMAGE_ID,
    VOCAB,
    decoder,
    make_tokenizer,
    save_llava,
    save_vision,
)

from convert.__main__ import main as convert_main  # noqa: E402
from mm1_mlx.formats.assemble import llava_source  # noqa: E402
from mm1_mlx.formats.weights import convert_weights  # noqa: E402
from mm1_mlx.models.vision import VisionModel  # noqa: E402


def run_cli(argv, capsys):
    """(exit code, stderr) of the converter CLI."""
    try:
        convert_main([*argv, "--dtype", "float32"])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_fails(argv, capsys, out, *needles):
    code, err = run_cli([*argv, "--mlx-path", str(out)], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return lines[0]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    save_llava(path)
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A CLIP tower and a Llama decoder saved separately."""
    path = tmp_path_factory.mktemp("parts")
    save_vision(path / "vision")
    hf = decoder("llama")
    hf.save_pretrained(path / "text")
    make_tokenizer().save_pretrained(path / "text")
    return path, hf


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_convert_weights_is_idempotent_and_layouts_agree(llava_dir):
    src = llava_source(llava_dir)
    once = convert_weights(src.weights, src.model)
    assert same(convert_weights(once, src.model), once)
    # transformers-5 runtime layout and the layout LLaVA checkpoints are published in
    def relayout(old, new):
        return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in src.weights.items()}

    v5 = relayout("vision_tower.", "model.vision_tower.")
    v5 = {k.replace("language_model.model.", "model.language_model.", 1)
          .replace("language_model.lm_head.", "lm_head.", 1)
          .replace("multi_modal_projector.", "model.multi_modal_projector.", 1): v
          for k, v in v5.items()}
    published = relayout("vision_tower.", "vision_tower.vision_model.")
    assert same(convert_weights(v5, src.model), once)
    assert same(convert_weights(published, src.model), once)


def test_moe_weights_idempotent(tmp_path):
    from mm1_mlx.formats.configs import hf_vision_config, text_config
    from mm1_mlx.models.config import ModelConfig

    hf = decoder("mixtral")
    vc = hf_vision_config({"model_type": "clip_vision_model", "hidden_size": 32,
                           "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 8})
    config = ModelConfig(vision_config=vc, text_config=text_config(hf.config.to_dict()))
    raw = {f"language_model.{k}": mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    once = convert_weights(raw, config, allow_missing=("connector.", "vision_tower."))
    # in memory transformers 5 fuses experts (gate_up_proj); files hold experts.N.w1/w2/w3
    p = "language_model.model.layers.1.mlp.switch_mlp."
    assert once[p + "down_proj.weight"].shape == (4, 32, 64)
    fused = hf.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    assert np.array_equal(np.array(once[p + "up_proj.weight"][2]), fused[2, 64:].numpy())
    assert same(convert_weights(once, config, allow_missing=("connector.", "vision_tower.")), once)


def test_hostile_pickle_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    text = tmp_path / "text"
    text.mkdir()
    decoder("llama").config.save_pretrained(text)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Evil()},
               text / "pytorch_model.bin")
    assert not marker.exists()
    save_vision(tmp_path / "vision")
    assert_fails(["--vision", str(tmp_path / "vision"), "--text", str(text)], capsys,
                 tmp_path / "out", "refusing to load", "pytorch_model.bin")
    assert not marker.exists()


def test_pickle_weights_and_upcycling(tmp_path, parts, capsys):
    """A benign .bin converts; upcycled experts are identical copies and compute the dense model."""
    path, hf = parts
    text = tmp_path / "text_bin"
    text.mkdir()
    hf.config.save_pretrained(text)
    make_tokenizer().save_pretrained(text)
    torch.save(hf.state_dict(), text / "pytorch_model.bin")
    common = ["--vision", str(path / "vision"), "--text", str(text), "--connector",
              "c-abstractor", "--image-tokens", "4", "--connector-hidden", "32"]
    assert run_cli([*common, "--mlx-path", str(tmp_path / "dense")], capsys)[0] == 0
    assert run_cli([*common, "--mlx-path", str(tmp_path / "moe"), "--upcycle-experts", "4",
                    "--moe-every", "2", "--top-k", "2"], capsys)[0] == 0
    dense, proc = mm1_mlx.load(str(tmp_path / "dense"))
    moe, _ = mm1_mlx.load(str(tmp_path / "moe"))
    tc = moe.config.text_config
    assert (tc.num_experts, tc.moe_every, tc.num_experts_per_tok) == (4, 2, 2)
    assert not tc.is_moe_layer(0) and tc.is_moe_layer(1)
    stack = moe.language_model.layers[1].mlp.switch_mlp.gate_proj.weight
    assert all(mx.array_equal(stack[e], stack[0]).item() for e in range(4))
    assert mx.array_equal(stack[0], dense.language_model.layers[1].mlp.gate_proj.weight).item()
    router = np.array(moe.language_model.layers[1].mlp.gate.weight)
    assert 0 < np.abs(router).max() < 1e-2
    ids = mx.array([proc("describe this picture")[0]])
    np.testing.assert_allclose(np.array(moe(ids)), np.array(dense(ids)), atol=1e-5)
    ref = hf(input_ids=torch.tensor(np.array(ids))).logits.detach().numpy()
    assert np.abs(np.array(dense(ids))[..., :VOCAB] - ref).max() <= 1e-3


def test_openclip_tower(tmp_path, parts, capsys):
    """An OpenCLIP-format ViT (visual.*, packed in_proj, open_clip_config.json) matches HF CLIP."""
    path, _ = parts
    from transformers import CLIPVisionModel

    hf = CLIPVisionModel.from_pretrained(path / "vision").eval()
    sd = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    oc = {"visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
          "visual.class_embedding": sd["embeddings.class_embedding"],
          "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
          "visual.ln_pre.weight": sd["pre_layrnorm.weight"],
          "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
          "visual.ln_post.weight": sd["post_layernorm.weight"],
          "visual.ln_post.bias": sd["post_layernorm.bias"],
          "visual.proj": torch.zeros(32, 16), "logit_scale": torch.ones(()),
          "token_embedding.weight": torch.zeros(10, 16)}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(2):
        hfp, ocp = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            for o, h in names.items():
                oc[f"{ocp}{o}.{kind}"] = sd[f"{hfp}{h}.{kind}"]
            oc[f"{ocp}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{hfp}self_attn.{n}_proj.{kind}"] for n in "qkv"])
    vdir = tmp_path / "openclip"
    vdir.mkdir()
    save_file({k: v.contiguous() for k, v in oc.items()}, vdir / "open_clip_model.safetensors")
    (vdir / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {
            "image_size": 32, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 2.0,
            "patch_size": 8}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                           "resize_mode": "squash"}}))
    out = tmp_path / "mlx"
    code, err = run_cli(["--vision", str(vdir), "--text", str(path / "text"), "--connector", "mlp",
                         "--mlx-path", str(out)], capsys)
    assert code == 0, err
    model, proc = mm1_mlx.load(str(out))
    assert proc.image.image_mean == [0.5] * 3 and proc.image.resize_mode == "squash"
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    ours = model.vision_tower(mx.array(px.permute(0, 2, 3, 1).numpy()))
    assert isinstance(model.vision_tower, VisionModel)
    assert np.abs(np.array(ours) - ref.numpy()).max() <= 1e-4


def test_truncated_safetensors(tmp_path, llava_dir, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llava_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    assert_fails(["--hf-path", str(bad)], capsys, tmp_path / "out", "model.safetensors")


def test_shape_mismatch_and_missing_tensor(tmp_path, llava_dir, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llava_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    line = assert_fails(["--hf-path", str(bad)], capsys, tmp_path / "out", "shape mismatch",
                        "language_model.model.layers.0.mlp.gate_proj.weight (64, 32) != (48, 32)")
    assert "layers.1.mlp.down_proj.weight" in line  # every mismatch is named

    (bad / "config.json").write_text((llava_dir / "config.json").read_text())
    sd = load_file(llava_dir / "model.safetensors")
    del sd["language_model.model.layers.1.self_attn.k_proj.weight"]
    sd["language_model.model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    assert_fails(["--hf-path", str(bad)], capsys, tmp_path / "out",
                 "missing tensors: language_model.model.layers.1.self_attn.k_proj.weight",
                 "unmapped tensors: language_model.model.layers.1.self_attn.extra.weight")


def test_hub_id_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert_fails(["--hf-path", "nobody/no-such-llava"], capsys, tmp_path / "out",
                 "nobody/no-such-llava", "HF_HUB_OFFLINE")


def test_llava_carries_tokenizer_template_and_preprocessing(tmp_path, llava_dir, capsys):
    out = tmp_path / "mlx"
    assert run_cli(["--hf-path", str(llava_dir), "--mlx-path", str(out)], capsys)[0] == 0
    model, proc = mm1_mlx.load(str(out))
    cfg = model.config
    assert cfg.image_token_id == IMAGE_ID == proc.image_token_id
    assert cfg.connector_config.type == "mlp" and cfg.connector_config.hidden_act == "gelu"
    assert cfg.vision_config.feature_layer == -2 and not cfg.vision_config.keep_class_token
    assert cfg.num_image_tokens == 16 == proc.num_image_tokens
    assert proc.image.image_size == 32 and proc.image.resize_mode == "crop"
    text = proc.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "USER: hi\nASSISTANT:"
    assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_quantize(tmp_path, llava_dir, capsys):
    out = tmp_path / "q"
    code, err = run_cli(["--hf-path", str(llava_dir), "--mlx-path", str(out), "-q",
                         "--q-bits", "8", "--q-group-size", "32"], capsys)
    assert code == 0, err
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 8 and q["group_size"] == 32
    qm, _ = mm1_mlx.load(str(out))
    ids = mx.array([[5, 6, 7, 8, 9]])
    src = llava_source(llava_dir)
    from mm1_mlx.checkpoint import build

    ref = build(src.model, convert_weights(src.weights, src.model)).eval()
    assert "language_model.model.layers.0.self_attn.q_proj" in q["modules"]
    assert not any(k.startswith("vision_tower.") for k in q["modules"])
    np.testing.assert_allclose(np.array(qm(ids)), np.array(ref(ids)), atol=2e-2)


def test_hostile_sources_and_values(tmp_path, llava_dir, parts, capsys):
    """Integer / bool / complex weights, a broken LLaVA config (reported as a config, not as a
    tokenizer problem), values the converted config cannot hold, outputs over the inputs."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llava_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(llava_dir / "model.safetensors")
    for dtype in (torch.int32, torch.bool, torch.complex64):
        w = dict(sd, **{"language_model.model.norm.weight":
                        sd["language_model.model.norm.weight"].to(dtype)})
        save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
        assert_fails(["--hf-path", str(bad)], capsys, tmp_path / "out", "norm.weight",
                     "floating")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((llava_dir / "config.json").read_text())
    for text_config in ("x", {"model_type": "llama"}, dict(cfg["text_config"],
                                                           num_attention_heads=0)):
        (bad / "config.json").write_text(json.dumps(dict(cfg, text_config=text_config)))
        line = assert_fails(["--hf-path", str(bad)], capsys, tmp_path / "out", "config")
        assert "tokenizer" not in line
    path, _ = parts
    src = ["--vision", str(path / "vision"), "--text", str(path / "text")]
    assert_fails([*src, "--image-tokens", "5"], capsys, tmp_path / "out", "square")
    assert_fails([*src, "--feature-layer", "99"], capsys, tmp_path / "out", "feature_layer")
    before = sorted(p.name for p in (path / "text").iterdir())
    code, err = run_cli([*src, "--mlx-path", str(path / "text")], capsys)
    assert code == 2 and "input" in err and sorted(p.name for p in (path / "text").iterdir()) \
        == before
