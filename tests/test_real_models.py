"""Issue 21: ``--model`` takes Hugging Face transformers and mlx-community (mlx-vlm) checkpoints.

Fixtures are tiny random LLaVA models written here: transformers' ``save_pretrained`` (and the
same tensors in the other key layouts), and mlx-vlm layouts written from its spec (float,
quantized, quantized vision tower, padded vision MLP) or by mlx-vlm's own converter. Parity:
logits and greedy tokens against transformers (float) and against mlx-vlm running the same
quantized weights (where mlx-vlm is installed).
"""

import mm1_mlx  # noqa: F401, I001  (binds the BLAS before mlx.core loads)
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_parity import IMAGE_ID, hf_greedy, image, mlx_greedy, save_llava  # noqa: E402

from mm1_mlx.errors import MM1Error  # noqa: E402
from mm1_mlx.formats import cache, hub  # noqa: E402
from mm1_mlx.generate import main as generate_main  # noqa: E402

PROMPT = "USER: <image>\ndescribe this picture ASSISTANT:"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MM1_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def relayout(src, out, rename):
    """A copy of the checkpoint at ``src`` with its tensor names changed by ``rename``."""
    shutil.copytree(src, out)
    w = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"), {rename(k): v for k, v in w.items()},
                        metadata={"format": "pt"})
    return out


def published(k):  # LLaVA as llava-hf publishes it (and mlx-vlm names it)
    return k.replace("vision_tower.", "vision_tower.vision_model.", 1)


def runtime_v5(k):  # transformers 5's module tree
    for old, new in (("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head.")):
        if k.startswith(old):
            return new + k[len(old):]
    return k


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """{variant: (dir, hf model, hf processor)} of tiny transformers LLaVA models."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, tower, text, strategy in (("clip", "clip", "llama", "default"),
                                        ("siglip", "siglip", "qwen2", "full"),
                                        ("siglip-default", "siglip", "llama", "default")):
        hf, proc = save_llava(root / name, tower, text, strategy)
        out[name] = (root / name, hf, proc)
    clip, hf, proc = out["clip"]
    out["published"] = (relayout(clip, root / "published", published), hf, proc)
    out["v5"] = (relayout(clip, root / "v5", runtime_v5), hf, proc)
    return out


def hf_inputs(proc):
    enc = proc(images=image(), text=PROMPT, return_tensors="pt")
    return enc["input_ids"], enc["pixel_values"]


def nhwc(px):
    return mx.array(px.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("variant", ["clip", "siglip", "siglip-default", "published", "v5"])
def test_transformers_checkpoint_parity(llava, variant, private_cache):
    path, hf, proc = llava[variant]
    model, processor = mm1_mlx.load(str(path), dtype="float32")
    ids, px = hf_inputs(proc)
    ref, ref_tokens = hf_greedy(hf, ids, pixel_values=px)
    ours, tokens = mlx_greedy(model, ids.numpy(), pixel_values=nhwc(px))
    assert np.abs(ours - ref).max() <= 1e-3
    assert tokens == ref_tokens
    assert processor.image_token_id == IMAGE_ID
    assert len(list(private_cache.iterdir())) == 1


def quantizable(key: str, value, vision: bool, table: bool) -> bool:
    """mlx-vlm's rule (2-D weights of size divisible by 64); ``table``: the position table too
    (at real sizes, 577 x 1024, it divides)."""
    if table and "position_embedding" in key:
        return True
    if not key.endswith(".weight") or value.ndim != 2 or value.size % 64:
        return False
    return key.startswith("language_model.") or (vision and key.startswith("vision_tower."))


def pad_vision_mlp(w: dict, extra: int) -> dict:
    """Zero rows in fc1 and zero columns in fc2: the same function at a wider width."""
    out = dict(w)
    for k, v in w.items():
        if ".mlp.fc1." in k:
            out[k] = mx.concatenate([v, mx.zeros((extra, *v.shape[1:]), v.dtype)])
        elif k.endswith(".mlp.fc2.weight"):
            out[k] = mx.concatenate([v, mx.zeros((v.shape[0], extra), v.dtype)], axis=1)
    return out


def write_mlx_vlm(src, out, bits=None, group_size=32, vision=False, pad=0, overrides=None,
                  table=False):
    """An mlx-community-layout copy of the transformers LLaVA at ``src``, from mlx-vlm's spec:
    published key names, channels-last patch embedding, ``weight``/``scales``/``biases`` per
    quantized module, ``quantization`` in config.json (older checkpoints: no per-module entries
    even for a quantized vision tower)."""
    shutil.copytree(src, out)
    w = {published(k): v for k, v in mx.load(str(src / "model.safetensors")).items()}
    patch = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    w[patch] = w[patch].transpose(0, 2, 3, 1)
    w = pad_vision_mlp(w, pad) if pad else w
    cfg = json.loads((out / "config.json").read_text())
    if bits:
        q = {"group_size": group_size, "bits": bits, "mode": "affine", **(overrides or {})}
        for k in [k for k, v in w.items() if quantizable(k, v, vision, table)]:
            own = q.get(k[: -len(".weight")], {})
            wq, scales, biases = mx.quantize(w[k], own.get("group_size", group_size),
                                             own.get("bits", bits))
            p = k[: -len(".weight")]
            w.update({k: wq, f"{p}.scales": scales, f"{p}.biases": biases})
        cfg["quantization"] = cfg["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(out / "model.safetensors"), w, metadata={"format": "mlx"})
    return out


@pytest.fixture(scope="module")
def mlx_vlm_dirs(llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_vlm")
    src = llava["clip"][0]
    return {
        "float": write_mlx_vlm(src, root / "float"),
        # the decoder at 4 bits, lm_head overridden to 8 as mlx-vlm's per-module entries do
        "q4": write_mlx_vlm(src, root / "q4", bits=4,
                            overrides={"language_model.lm_head": {"bits": 8, "group_size": 32}}),
        "q4-vision": write_mlx_vlm(src, root / "q4-vision", bits=4, vision=True),
        "q4-vision-padded": write_mlx_vlm(src, root / "q4-vision-padded", bits=4, vision=True,
                                          pad=32),
        "q4-vision-table": write_mlx_vlm(src, root / "q4-vision-table", bits=4, vision=True,
                                         table=True),
    }


def dequantized_copy(src, out):
    """The same mlx-vlm checkpoint with every quantized module stored as its dequantized float."""
    shutil.copytree(src, out)
    w = mx.load(str(src / "model.safetensors"))
    for p in [k[: -len(".scales")] for k in w if k.endswith(".scales")]:
        q = json.loads((src / "config.json").read_text())["quantization"]
        own = q.get(p, q)
        w[f"{p}.weight"] = mx.dequantize(w[f"{p}.weight"], w.pop(f"{p}.scales"),
                                         w.pop(f"{p}.biases"), own["group_size"], own["bits"])
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization"], cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(out / "model.safetensors"), w, metadata={"format": "mlx"})
    return out


def test_mlx_vlm_siglip_qwen2(llava, tmp_path):
    """SigLIP + Qwen2 in the mlx-community layout: float equals transformers; quantized equals
    its own weights dequantized."""
    src, hf, proc = llava["siglip"]
    ids, px = hf_inputs(proc)
    ref, ref_tokens = hf_greedy(hf, ids, pixel_values=px)
    _, (ours, tokens) = our_run(write_mlx_vlm(src, tmp_path / "float"), proc)
    assert np.abs(ours - ref).max() <= 1e-3 and tokens == ref_tokens
    q = write_mlx_vlm(src, tmp_path / "q8", bits=8, vision=True)
    qm, (qlogits, qtokens) = our_run(q, proc)
    assert any(k.startswith("vision_tower.") for k in qm.config.quantization["modules"])
    _, (dq, dq_tokens) = our_run(dequantized_copy(q, tmp_path / "dq"), proc)
    assert np.abs(qlogits - dq).max() <= 1e-4 and qtokens == dq_tokens
    assert np.abs(qlogits - ref).max() <= 0.05  # 8 bits stay close to the float model


def our_run(path, proc, **kw):
    model, _ = mm1_mlx.load(str(path), **kw)
    ids, px = hf_inputs(proc)
    return model, mlx_greedy(model, ids.numpy(), pixel_values=nhwc(px))


def test_mlx_vlm_float_matches_transformers(llava, mlx_vlm_dirs):
    _, hf, proc = llava["clip"]
    ids, px = hf_inputs(proc)
    ref, ref_tokens = hf_greedy(hf, ids, pixel_values=px)
    model, (ours, tokens) = our_run(mlx_vlm_dirs["float"], proc)
    assert not model.config.quantization
    assert np.abs(ours - ref).max() <= 1e-3 and tokens == ref_tokens


def test_mlx_vlm_quantized_modules_from_weights(llava, mlx_vlm_dirs):
    """Which modules are quantized (and how) comes from the .scales present and the overrides."""
    _, hf, proc = llava["clip"]
    q4, _ = mm1_mlx.load(str(mlx_vlm_dirs["q4"]))
    mods = q4.config.quantization["modules"]
    assert mods["language_model.lm_head"]["bits"] == 8
    assert mods["language_model.model.layers.0.mlp.up_proj"] == {
        "bits": 4, "group_size": 32, "mode": "affine"}
    assert not any(k.startswith("vision_tower.") for k in mods)
    qv, _ = mm1_mlx.load(str(mlx_vlm_dirs["q4-vision-table"]))
    vmods = [k for k in qv.config.quantization["modules"] if k.startswith("vision_tower.")]
    assert "vision_tower.encoder.layers.0.mlp.fc1" in vmods
    # the position table is read, never called: it comes in dequantized
    assert "vision_tower.embeddings.position_embedding" not in vmods
    assert qv.vision_tower.embeddings.position_embedding.weight.dtype == mx.float32
    # packed weights kept bit for bit
    src = mx.load(str(mlx_vlm_dirs["q4"] / "model.safetensors"))
    key = "language_model.model.layers.1.self_attn.q_proj"
    assert mx.array_equal(q4.language_model.layers[1].self_attn.q_proj.weight,
                          src[f"{key}.weight"]).item()


def test_mlx_vlm_padded_vision_mlp(llava, mlx_vlm_dirs):
    """A vision MLP stored at a padded width computes what the unpadded one does."""
    _, _, proc = llava["clip"]
    m, (padded, tokens) = our_run(mlx_vlm_dirs["q4-vision-padded"], proc)
    assert m.config.vision_config.intermediate_size == 96
    _, (plain, plain_tokens) = our_run(mlx_vlm_dirs["q4-vision"], proc)
    assert np.abs(padded - plain).max() <= 1e-4 and tokens == plain_tokens


def mlx_vlm_logits(path, ids, px, n=20):
    """Logits of the prompt and ``n`` greedy tokens from mlx-vlm's own LLaVA."""
    from mlx_vlm.utils import load_model

    model = load_model(path)
    ids, px = mx.array(ids.numpy()), mx.array(px.numpy())
    first = np.array(model(ids, px, mask=None).logits)
    tokens = []
    for _ in range(n):  # no cache: the whole sequence each step, like hf_greedy
        nxt = model(ids, px, mask=None).logits[:, -1].argmax(-1)
        tokens.append(nxt.item())
        ids = mx.concatenate([ids, nxt[:, None]], axis=1)
    return first, tokens


@pytest.mark.parametrize("variant", ["float", "q4", "q4-vision"])
def test_mlx_vlm_parity(llava, mlx_vlm_dirs, variant):
    pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed")
    _, _, proc = llava["clip"]
    ids, px = hf_inputs(proc)
    ref, ref_tokens = mlx_vlm_logits(mlx_vlm_dirs[variant], ids, px)
    _, (ours, tokens) = our_run(mlx_vlm_dirs[variant], proc)
    assert np.abs(ours - ref).max() <= 1e-3
    assert tokens == ref_tokens


def test_mlx_vlm_converter_output(llava, tmp_path):
    """What mlx-vlm's own converter writes (-q) loads and runs as mlx-vlm runs it."""
    pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed")
    from mlx_vlm.convert import convert as vlm_convert

    _, _, proc = llava["clip"]
    out = tmp_path / "vlm-q"
    vlm_convert(str(llava["published"][0]), str(out), quantize=True, q_group_size=32, q_bits=4)
    ids, px = hf_inputs(proc)
    ref, ref_tokens = mlx_vlm_logits(out, ids, px)
    model, (ours, tokens) = our_run(out, proc)
    assert model.config.quantization["source"] == "mlx-vlm"
    assert np.abs(ours - ref).max() <= 1e-3 and tokens == ref_tokens


def run_generate(argv, capsys):
    try:
        generate_main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_cli_converts_once(llava, tmp_path, capsys, private_cache):
    image().save(tmp_path / "x.png")
    argv = ["--model", str(llava["clip"][0]), "--image", str(tmp_path / "x.png"), "--prompt",
            "describe this picture", "--max-tokens", "4"]
    code, out, err = run_generate(argv, capsys)
    assert code == 0 and "converting" in err, err
    (entry,) = private_cache.iterdir()
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    code, out2, err2 = run_generate(argv, capsys)
    assert code == 0 and "converting" not in err2 and out2 == out
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp
    assert list(private_cache.iterdir()) == [entry]
    # other conversion options are another cache entry
    code, _, err3 = run_generate([*argv, "-q", "--q-bits", "8", "--q-group-size", "32"], capsys)
    assert code == 0 and "converting" in err3, err3
    assert len(list(private_cache.iterdir())) == 2


def test_quantize_tool_takes_a_transformers_dir(llava, tmp_path, capsys):
    """Every tool's --model goes through load/resolve: here the quantizer."""
    from mm1_mlx.quantize import main as quantize_main

    out = tmp_path / "q"
    quantize_main(["--model", str(llava["clip"][0]), "--out", str(out), "--no-eval",
                   "--group-size", "32"])
    model, _ = mm1_mlx.load(str(out))
    assert model.config.quantization["bits"] == 4
    assert llava["clip"][0].joinpath("config.json").exists()  # the source is untouched


def test_no_torch_needed_for_safetensors(llava, tmp_path):
    """The library converts a safetensors checkpoint with torch unimportable; a .bin source
    says in one line that it needs torch."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import mm1_mlx\n"
            f"m, p = mm1_mlx.load({str(llava['clip'][0])!r})\n"
            "print(m.config.num_image_tokens)\n")
    env = {**__import__("os").environ, "MM1_MLX_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "16", r.stderr[-2000:]
    from mm1_mlx.formats import sources

    bad = shutil.copytree(llava["clip"][0], tmp_path / "bin")
    (bad / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, bad / "pytorch_model.bin")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from pathlib import Path\nfrom mm1_mlx.formats import sources\n"
            f"sources.read_weights(Path({str(bad)!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and "needs PyTorch" in r.stderr
    assert sources.read_weights(bad)["x"].shape == (2,)  # with torch: read (weights_only)


def test_flags_on_our_own_checkpoint_refused(tiny_checkpoint, tmp_path, capsys):
    image().save(tmp_path / "x.png")
    code, _, err = run_generate(["--model", str(tiny_checkpoint), "--image", str(tmp_path / "x.png"),
                                 "--prompt", "hi", "-q"], capsys)
    assert code == 2 and "already an mm1-mlx checkpoint" in err


def test_unsupported_family_one_line(tmp_path, capsys):
    bad = tmp_path / "blip"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    image().save(tmp_path / "x.png")
    code, _, err = run_generate(["--model", str(bad), "--image", str(tmp_path / "x.png"),
                                 "--prompt", "hi"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "'blip-2'" in lines[0] and "llava" in lines[0] and "mm1-mlx" in lines[0]


def test_failed_conversion_leaves_no_entry(llava, tmp_path, private_cache, monkeypatch):
    """A conversion that dies half-way (here: while writing) leaves nothing that loads, and the
    next call converts afresh."""
    from mm1_mlx import checkpoint

    real = checkpoint.save_weights

    def dies(directory, weights, metadata=None):
        real(directory, weights, metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_weights", dies)
    with pytest.raises(KeyboardInterrupt):
        mm1_mlx.load(str(llava["clip"][0]))
    assert not private_cache.exists() or not list(private_cache.iterdir())
    monkeypatch.setattr(checkpoint, "save_weights", real)
    model, _ = mm1_mlx.load(str(llava["clip"][0]))
    assert len(list(private_cache.iterdir())) == 1


def test_truncated_source_is_one_line(llava, tmp_path, private_cache):
    bad = shutil.copytree(llava["clip"][0], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MM1Error, match="model.safetensors"):
        mm1_mlx.load(str(bad))
    assert not private_cache.exists() or not list(private_cache.iterdir())


def test_local_source_change_is_a_new_entry(llava, tmp_path, private_cache):
    src = shutil.copytree(llava["clip"][0], tmp_path / "src")
    a = cache.entry(str(src), src, None, None, 64)
    assert cache.entry(str(src), src, None, None, 64) == a
    (src / "generation_config.json").write_text("{}")
    assert cache.entry(str(src), src, None, None, 64) != a
    assert cache.entry(str(src), src, "float16", None, 64) != cache.entry(str(src), src, None,
                                                                          None, 64)


def test_hub_fetches_only_what_the_family_needs(tmp_path, monkeypatch):
    import huggingface_hub

    cfg = tmp_path / "config.json"
    calls = []

    def fake_download(repo, name):
        calls.append(("config", repo))
        cfg.write_text(json.dumps(fake_download.config))
        return str(cfg)

    def fake_snapshot(repo, allow_patterns):
        calls.append(("snapshot", allow_patterns))
        return str(tmp_path)

    class FakeApi:
        def list_repo_files(self, repo):
            return ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "offline", lambda: False)
    fake_download.config = {"model_type": "blip-2"}
    with pytest.raises(MM1Error, match="'blip-2' is not supported"):
        hub.fetch("org/blip")
    assert calls == [("config", "org/blip")]  # no weights fetched for an unsupported family
    fake_download.config = {"model_type": "llava"}
    calls.clear()
    assert hub.fetch("org/llava") == tmp_path
    patterns = calls[-1][1]
    assert "*.safetensors" in patterns and "*.bin" not in patterns and "*.pt" not in patterns


def test_hub_offline_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    image().save(tmp_path / "x.png")
    code, _, err = run_generate(["--model", "nobody/no-such-llava", "--image",
                                 str(tmp_path / "x.png"), "--prompt", "hi"], capsys)
    assert code == 2 and "nobody/no-such-llava" in err and "HF_HUB_OFFLINE" in err
