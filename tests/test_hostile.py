"""A corpus of hostile inputs, generated here and driven through the CLIs in subprocesses.

Every refused case must exit with status 2 and print exactly one line (``error: ...``), never a
traceback; the data-loss cases also check that every byte the user had is still there (a hash of
the whole tree before and after). Cases are grouped: one subprocess runs many CLI ``main``s in
turn (``RUNNER``), so the corpus costs a few model loads, not one interpreter per case.
Documented successes: a ``--force`` over a checkpoint, LoRA YAML ``learning_rate: 1e-3`` (read
as a number), a data file with bad records among good ones (skipped, counted, reasons listed).
"""

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm1_mlx.io import atomic
from mm1_mlx.checkpoint import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RUNNER = r"""
import mm1_mlx
import contextlib, importlib, io, json, os, sys, traceback
cases, results = json.load(open(sys.argv[1])), []
home = os.getcwd()
for c in cases:
    err, out = io.StringIO(), io.StringIO()
    os.chdir(c.get("cwd") or home)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            importlib.import_module(c["module"]).main(c["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        code = "traceback"
        err.write(traceback.format_exc())
    results.append({"name": c["name"], "code": code, "err": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""


def run_cases(tmp_path: Path, cases: list[dict], timeout: int = 600) -> dict:
    """name -> {code, err} for each case, all run by one subprocess."""
    spec, result = tmp_path / "cases.json", tmp_path / "results.json"
    spec.write_text(json.dumps(cases))
    p = subprocess.run([sys.executable, "-c", RUNNER, str(spec), str(result)], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0 and result.exists(), p.stderr[-3000:]
    return {r["name"]: r for r in json.loads(result.read_text())}


def assert_refused(results: dict, *needles_by_case) -> None:
    """Each case: exit 2, one line starting with 'error:', no traceback."""
    bad = []
    for name, r in results.items():
        lines = r["err"].strip().splitlines()
        if r["code"] != 2 or len(lines) != 1 or not lines[0].startswith("error:"):
            bad.append(f"{name}: code {r['code']}, stderr {r['err'][-600:]!r}")
    assert not bad, "\n".join(bad)


def tree_hash(root: Path) -> dict:
    """Every file's bytes and every directory under ``root`` (the user's data)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def case(name, module, *argv, cwd=None) -> dict:
    return {"name": name, "module": module, "argv": [str(a) for a in argv],
            "cwd": str(cwd) if cwd else None}


def model_copy(dst: Path, config=None, pre=None, template=None, raw_config: bytes | None = None
               ) -> Path:
    """A copy of the bundled mm1-tiny (weights hard-linked) with edited files."""
    src = WEIGHTS_DIR / "mm1-tiny"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy(f, dst / f.name)
    for name, value in (("config.json", config), ("preprocessor_config.json", pre)):
        if value is not None:
            (dst / name).unlink()
            (dst / name).write_text(value if isinstance(value, str) else json.dumps(value))
    if raw_config is not None:
        (dst / "config.json").unlink()
        (dst / "config.json").write_bytes(raw_config)
    if template is not None:
        (dst / "chat_template.jinja").unlink()
        (dst / "chat_template.jinja").write_text(template)
    return dst


def base_config() -> dict:
    return json.loads((WEIGHTS_DIR / "mm1-tiny" / "config.json").read_text())


def edited(**changes) -> dict:
    """The bundled config with ``part__field=value`` changes (``part`` one of the sub-configs)."""
    cfg = base_config()
    for key, value in changes.items():
        part, _, name = key.partition("__")
        if name:
            cfg[part][name] = value
        else:
            cfg[part] = value
    return cfg


def pre_config(**changes) -> dict:
    cfg = json.loads((WEIGHTS_DIR / "mm1-tiny" / "preprocessor_config.json").read_text())
    return {**cfg, **changes}


# ---- checkpoint files, flags and images through generate ----
def test_bad_checkpoints_flags_and_images(tmp_path):
    m = tmp_path / "models"
    configs = {
        "config_list": "[1, 2]", "config_null": "null", "config_string": '"mm1"',
        "config_truncated": '{"vision_config": {',
        "vision_is_list": edited(vision_config=[1]), "text_is_string": edited(text_config="x"),
        "zero_heads": edited(text_config__num_attention_heads=0),
        "zero_patch": edited(vision_config__patch_size=0),
        "negative_width": edited(text_config__hidden_size=-5),
        "layers_1e6_float": edited(text_config__num_hidden_layers=1e6),
        "layers_1e6_int": edited(text_config__num_hidden_layers=1000000),
        "layers_absurd_fits_caps": edited(text_config__num_hidden_layers=1000,
                                          text_config__intermediate_size=200000),
        "unknown_connector": edited(connector_config__type="q-former"),
        "unknown_activation": edited(vision_config__hidden_act="swish9"),
        "unknown_rope": edited(text_config__rope_scaling={"rope_type": "warp", "factor": 2}),
        "feature_layer_99": edited(vision_config__feature_layer=99),
        "feature_layer_str": edited(vision_config__feature_layer="-2"),
        "quantization_str": edited(quantization="4bit"),
        "quantization_bits": edited(quantization={"modules": {"language_model.lm_head":
                                                              {"bits": 3.5, "group_size": 64}}}),
        "bool_as_size": edited(text_config__vocab_size=True),
        "image_token_out_of_vocab": edited(image_token_id=10**6),
        "image_tokens_not_square": edited(connector_config__num_image_tokens=15),
    }
    cases = []
    for name, cfg in configs.items():
        model_copy(m / name, config=cfg if isinstance(cfg, str) else json.dumps(cfg))
        cases.append(case(name, "mm1_mlx.generate", "--model", m / name, "--prompt", "hi"))
    model_copy(m / "config_latin1", raw_config=b'{"name": "caf\xe9"}')
    cases.append(case("config_latin1", "mm1_mlx.generate", "--model", m / "config_latin1",
                      "--prompt", "hi"))
    pres = {"pre_list": "[]", "pre_mean_text": pre_config(image_mean=["a", "b", "c"]),
            "pre_std_zero": pre_config(image_std=[0, 0, 0]),
            "pre_mode": pre_config(resize_mode="stretch"),
            "pre_no_tokens": {k: v for k, v in pre_config().items() if k != "num_image_tokens"},
            "pre_tokens_differ": pre_config(num_image_tokens=9),
            "pre_size_zero": pre_config(image_size=0),
            "pre_tiles_huge": pre_config(max_image_tiles=10**6)}
    for name, pre in pres.items():
        model_copy(m / name, pre=pre if isinstance(pre, str) else json.dumps(pre))
        cases.append(case(name, "mm1_mlx.generate", "--model", m / name, "--prompt", "hi"))
    model_copy(m / "bad_template", template="{% for m in messages %}{{ m['content'] }")
    cases.append(case("bad_template", "mm1_mlx.generate", "--model", m / "bad_template",
                      "--prompt", "hi"))
    model_copy(m / "raising_template", template="{{ raise_exception('no') }}")
    cases.append(case("raising_template", "mm1_mlx.generate", "--model",
                      m / "raising_template", "--prompt", "hi"))
    # int weights where floats belong (a converter bug or a hand-made file)
    import mlx.core as mx

    w = mx.load(str(WEIGHTS_DIR / "mm1-tiny" / "model.safetensors"))
    key = next(k for k in w if k.endswith("embed_tokens.weight"))
    w[key] = w[key].astype(mx.int32)
    model_copy(m / "int_weights")
    (m / "int_weights" / "model.safetensors").unlink()
    mx.save_safetensors(str(m / "int_weights" / "model.safetensors"), w)
    cases.append(case("int_weights", "mm1_mlx.generate", "--model", m / "int_weights",
                      "--prompt", "hi"))
    for name, flags in {"min_p_5": ["--min-p", "5"], "top_k_huge": ["--top-k", "1000000"],
                        "rep_penalty_neg": ["--repetition-penalty", "-1"],
                        "seed_neg": ["--seed", "-1"], "temp_neg": ["--temp", "-1"],
                        "temp_nan": ["--temp", "nan"], "max_tokens_neg": ["--max-tokens", "-5"],
                        "tiles_zero": ["--max-image-tiles", "0"],
                        "top_p_2": ["--top-p", "2"], "unknown_flag": ["--frobnicate"]}.items():
        cases.append(case(name, "mm1_mlx.generate", "--prompt", "hi", *flags))
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (1, 40000), (255, 0, 0)).save(img / "thin.png")
    Image.new("L", (2_000_000, 1)).save(img / "wide.png")
    Image.new("L", (30000, 100)).save(img / "narrow.png")
    (img / "empty.png").write_bytes(b"")
    (img / "random.png").write_bytes(os.urandom(5000))
    (img / "text.jpg").write_text("not an image")
    os.mkfifo(img / "fifo.png")
    (img / "dir.png").mkdir()
    for name in ("thin.png", "wide.png", "narrow.png", "empty.png", "random.png", "text.jpg", "fifo.png",
                 "dir.png", "missing.png"):
        cases.append(case(f"image_{name}", "mm1_mlx.generate", "--image", img / name,
                          "--prompt", "hi", "--max-tokens", "2"))
    cases.append(case("image_thin_api_crop", "mm1_mlx.generate", "--image", img / "thin.png",
                      "--model", m / "pre_mode", "--prompt", "hi"))  # config error comes first
    results = run_cases(tmp_path, cases)
    assert_refused(results)
    err = {k: v["err"] for k, v in results.items()}
    assert "num_attention_heads = 0" in err["zero_heads"]
    assert "config.json" in err["zero_heads"] and "config.json" in err["config_latin1"]
    assert "feature_layer = 99" in err["feature_layer_99"]
    assert "int32" in err["int_weights"]
    assert "1x40000" in err["image_thin.png"] and "aspect" in err["image_narrow.png"]
    assert "regular file" in err["image_fifo.png"]
    assert "chat template" in err["bad_template"]


def test_thin_image_needs_no_big_canvas():
    """The pad-to-square canvas and the crop resize stay bounded for images within the limits."""
    from conftest import make_tokenizer

    from mm1_mlx.processor import ImageSettings, Processor

    for mode in ("pad", "crop", "squash"):
        proc = Processor(make_tokenizer(), ImageSettings(image_size=32, resize_mode=mode), 4)
        img = Image.new("RGB", (30000, 150), (200, 10, 10))  # aspect 200: the limit
        px = proc.prepare_image(img).pixels
        assert px.shape == (1, 32, 32, 3) and np.isfinite(px).all()
        red = (200 / 255 - 0.481) / 0.269
        if mode == "pad":  # a thin strip in the middle of the mean-coloured padding
            assert abs(float(px[0, 0, 16, 0])) < 0.05 and float(px[0, :, 16, 0].max()) > 0.05
        else:
            assert abs(float(px[0, 16, 16, 0]) - red) < 0.05


# ---- data loss: outputs that hold, equal, contain or lie inside something of the user's ----
def test_outputs_never_destroy_user_data(tmp_path):
    proj = tmp_path / "proj"
    model_copy(proj / "mymodel")
    (proj / "notes.txt").write_text("siblings of the model")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.txt").write_text("four years of work")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapters.safetensors").write_bytes(b"x")
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi", "response": "yes"}\n')
    (tmp_path / "ckpt").mkdir()  # a checkpoint of ours: replaced only with --force
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "ckpt" / f).write_text("old")
    (tmp_path / "afile").write_text("a file, not a directory")
    os.symlink(tmp_path / "d", tmp_path / "link")
    q = "mm1_mlx.quantize"
    cases = [
        case("quantize_into_user_dir", q, "--model", "mm1-tiny", "--out", tmp_path / "d"),
        case("quantize_over_source_parent", q, "--model", proj / "mymodel", "--out", proj),
        case("quantize_over_source", q, "--model", proj / "mymodel", "--out", proj / "mymodel"),
        case("quantize_inside_source", q, "--model", proj / "mymodel", "--out",
             proj / "mymodel" / "q"),
        case("quantize_cwd", q, "--model", "mm1-tiny", "--out", ".", cwd=proj),
        case("quantize_package_weights", q, "--model", proj / "mymodel", "--out", WEIGHTS_DIR),
        case("quantize_into_package", q, "--model", proj / "mymodel", "--out",
             WEIGHTS_DIR / "new"),
        case("quantize_checkpoint_no_force", q, "--model", "mm1-tiny", "--out",
             tmp_path / "ckpt"),
        case("quantize_file", q, "--model", "mm1-tiny", "--out", tmp_path / "afile"),
        case("quantize_symlink", q, "--model", "mm1-tiny", "--out", tmp_path / "link"),
        case("quantize_root", q, "--model", "mm1-tiny", "--out", "/"),
        case("quantize_eval_prompts_0", q, "--model", "mm1-tiny", "--out", tmp_path / "n1",
             "--eval-prompts", "0"),
        case("quantize_eval_n_0", q, "--model", "mm1-tiny", "--out", tmp_path / "n2",
             "--eval-n", "0"),
        case("fuse_over_adapter", "mm1_mlx.fuse", "--adapter-path", adapter, "--out", adapter),
        case("fuse_into_user_dir", "mm1_mlx.fuse", "--adapter-path", adapter, "--out",
             tmp_path / "d"),
        case("convert_over_source", "convert.__main__", "--hf-path", proj / "mymodel", "--mlx-path",
             proj / "mymodel"),
        case("convert_over_source_parent", "convert.__main__", "--hf-path", proj / "mymodel",
             "--mlx-path", proj),
        case("convert_moe_every_0", "convert.__main__", "--vision", "a", "--text", "b", "--mlx-path",
             tmp_path / "n3", "--moe-every", "0"),
        case("convert_image_tokens_neg", "convert.__main__", "--vision", "a", "--text", "b",
             "--mlx-path", tmp_path / "n3", "--image-tokens", "-4"),
        case("convert_connector_hidden_neg", "convert.__main__", "--vision", "a", "--text", "b",
             "--mlx-path", tmp_path / "n3", "--connector-hidden", "-5"),
        case("convert_connector_hidden_0", "convert.__main__", "--vision", "a", "--text", "b",
             "--mlx-path", tmp_path / "n3", "--connector-hidden", "0"),
        case("lora_adapter_path_is_data", "mm1_mlx.lora", "--data", data, "--adapter-path", data),
        case("lora_into_user_dir", "mm1_mlx.lora", "--data", data, "--adapter-path",
             tmp_path / "d"),
        case("lora_over_trained_adapter", "mm1_mlx.lora", "--data", data, "--adapter-path",
             adapter),
        case("eval_n_0", "mm1_mlx.eval", "--n", "0"),
        case("train_run_dir_user", "mm1_mlx.train", "--run-dir", tmp_path / "d"),
        case("coreml_into_user_dir", "convert.coreml", "--out", tmp_path / "d" / "x.mlpackage",
             "--model", proj / "mymodel", "--no-check"),
    ]
    (tmp_path / "d" / "x.mlpackage").mkdir()
    (tmp_path / "d" / "x.mlpackage" / "mine.txt").write_text("not a package of ours")
    before = tree_hash(tmp_path)
    pkg_before = tree_hash(WEIGHTS_DIR)
    results = run_cases(tmp_path, cases)
    results.pop("coreml_into_user_dir") if "coremltools" in results.get(
        "coreml_into_user_dir", {}).get("err", "") else None
    assert_refused(results)
    after = tree_hash(tmp_path)
    for name in ("cases.json", "results.json"):
        before.pop(name, None), after.pop(name, None)
    assert after == before
    assert tree_hash(WEIGHTS_DIR) == pkg_before
    err = {k: v["err"] for k, v in results.items()}
    assert "--force" in err["quantize_checkpoint_no_force"]
    assert "input" in err["quantize_over_source_parent"] and "package" in err[
        "quantize_package_weights"]
    assert "--resume" in err["lora_over_trained_adapter"]


def test_force_replaces_only_a_checkpoint_and_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "q"
    cases = [case("first", "mm1_mlx.quantize", "--model", "mm1-tiny", "--out", out, "--no-eval"),
             case("again", "mm1_mlx.quantize", "--model", "mm1-tiny", "--out", out, "--no-eval"),
             case("forced", "mm1_mlx.quantize", "--model", "mm1-tiny", "--out", out, "--no-eval",
                  "--force")]
    results = run_cases(tmp_path, cases)
    assert results["first"]["code"] == 0 and results["forced"]["code"] == 0, results
    assert_refused({"again": results["again"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.json", "q", "results.json"]
    with atomic.output_lock(out):  # another writer holds the path
        held = run_cases(tmp_path, [case("locked", "mm1_mlx.quantize", "--model", "mm1-tiny",
                                         "--out", out, "--no-eval", "--force")])
    assert_refused(held)
    assert "another process" in held["locked"]["err"]


# ---- LoRA: YAML, data, resume ----
def write_images_data(d: Path) -> Path:
    d.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(d / "red.png")
    return d


def test_lora_hostile_yaml_data_and_resume(tmp_path):
    d = write_images_data(tmp_path / "data")
    good = json.dumps({"image": "red.png", "prompt": "what color is it ?", "response": "red ."})
    bad_lines = [
        json.dumps({"messages": [{"role": "assistant", "content": "first"},
                                 {"role": "user", "content": "then"},
                                 {"role": "assistant", "content": "me"}]}),
        "[" * 200_000 + "]" * 200_000,
        '{"prompt": "caf\xe9"',
    ]
    (d / "bad.jsonl").write_bytes("\n".join(bad_lines).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    (d / "mixed.jsonl").write_bytes((d / "bad.jsonl").read_bytes() + (good + "\n").encode() * 4)
    (d / "good.jsonl").write_text((good + "\n") * 4)
    (d / "deep.json").write_text("[" + "[" * 200_000 + "]" * 200_000 + "]")
    (d / "latin1.json").write_bytes(b'[{"prompt": "caf\xe9", "response": "x"}]')
    ad = tmp_path / "ad"
    yamls = {"rank_abc": "rank: abc\n", "model_list": "model: [a, b]\n", "top_list": "- 1\n",
             "unknown_key": "frobnicate: 1\n", "lr_neg": "learning_rate: -1e-3\n",
             "iters_float": "iters: 2.5\n", "bad_yaml": "a: [\n"}
    cases = []
    for name, text in yamls.items():
        (d / f"{name}.yaml").write_text(text)
        cases.append(case(f"yaml_{name}", "mm1_mlx.lora", "--config", d / f"{name}.yaml",
                          "--data", d / "mixed.jsonl", "--adapter-path", tmp_path / "n"))
    (d / "latin1.yaml").write_bytes(b"model: caf\xe9\n")
    cases.append(case("yaml_latin1", "mm1_mlx.lora", "--config", d / "latin1.yaml",
                      "--data", d / "mixed.jsonl"))
    for name in ("bad.jsonl", "deep.json", "latin1.json"):
        cases.append(case(f"data_{name}", "mm1_mlx.lora", "--data", d / name, "--adapter-path",
                          tmp_path / "n", "--quiet"))
    cases.append(case("data_fail_mode", "mm1_mlx.lora", "--data", d / "mixed.jsonl",
                      "--adapter-path", tmp_path / "n", "--on-bad-data", "fail", "--quiet"))
    for flags in (["--iters", "0"], ["--learning-rate", "nan"], ["--dropout", "1.5"],
                  ["--seed", "-3"], ["--rank", "0"], ["--lora-layers", "0"],
                  ["--whole-lr-scale", "0"]):
        cases.append(case(f"flag{'_'.join(flags)}", "mm1_mlx.lora", "--data", d / "mixed.jsonl",
                          "--adapter-path", tmp_path / "n", *flags))
    # documented success: YAML 1.1 reads 1e-3 as a string; the bad records are skipped
    (d / "ok.yaml").write_text(f"learning_rate: 1e-3\niters: 2\nbatch_size: 2\nsave_every: 1\n"
                               f"data: {d / 'mixed.jsonl'}\nadapter_path: {ad}\n")
    ok = [case("trained", "mm1_mlx.lora", "--config", d / "ok.yaml")]
    results = run_cases(tmp_path, cases + ok)
    trained = results.pop("trained")
    assert_refused(results)
    assert trained["code"] == 0, trained["err"][-2000:]
    assert "skipped 4 bad record(s)" in trained["err"]
    assert "first turn is the assistant's" in trained["err"]
    assert "nested too deeply" in trained["err"] and "not UTF-8" in trained["err"]
    assert json.loads((ad / "training_log.json").read_text())["args"]["learning_rate"] == 1e-3
    assert not (tmp_path / "n").exists()

    # --resume with each saved file damaged: one line, the damaged save kept as it was
    cases = []
    for name, f, content in (("log", "training_log.json", b"{not json"),
                             ("log_types", "training_log.json", b'{"step": "3"}'),
                             ("state", "training_state.safetensors", b"\x00" * 64),
                             ("adapters", "adapters.safetensors", os.urandom(256)),
                             ("config", "adapter_config.json", b'{"lora_parameters": 3}'),
                             ("config_latin1", "adapter_config.json", b'{"x": "\xe9"}')):
        copy = tmp_path / f"resume_{name}"
        shutil.copytree(ad, copy)
        (copy / f).write_bytes(content)
        cases.append(case(f"resume_{name}", "mm1_mlx.lora", "--config", d / "ok.yaml",
                          "--adapter-path", copy, "--resume", "--iters", "3", "--quiet",
                          "--data", d / "good.jsonl"))
    before = tree_hash(tmp_path)
    results = run_cases(tmp_path, cases)
    assert_refused(results)
    after = tree_hash(tmp_path)
    assert {k: v for k, v in after.items() if "resume_" in k} == \
        {k: v for k, v in before.items() if "resume_" in k}


def test_non_utf8_argv_and_stdin(tmp_path):
    def run(args, stdin=b""):
        return subprocess.run([sys.executable, "-m", "mm1_mlx.generate", *args], input=stdin,
                              env=ENV, cwd=tmp_path, capture_output=True, timeout=300)

    for p in (run(["--prompt", "-"], stdin=b"caf\xe9 \xff"),
              run([b"--prompt", b"caf\xe9"]), run(["--prompt", "hi", "--system", b"\xff"])):
        lines = p.stderr.decode(errors="replace").strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "UTF-8" in lines[0], p.stderr


def test_sigterm_during_a_long_mlx_call_exits_promptly(tmp_path):
    code = """
import mm1_mlx, sys, time
import mlx.core as mx
from mm1_mlx.cli.signals import sigterm_interrupts
a = mx.random.normal((1500, 1500))
mx.eval(a)
with sigterm_interrupts(grace_s=1.0):
    b = a
    for _ in range(400):
        b = (b @ a) * 1e-3
    print("computing", flush=True)
    mx.eval(b)
"""
    p = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "computing"
    time.sleep(0.5)
    t = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert p.returncode == 143 and time.perf_counter() - t < 10, p.stderr.read()


# ---- the swap, the lock, recovery (in-process) ----
def test_swap_recovers_an_interrupted_fallback_and_cleans_temporaries(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("1")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # the two-rename fallback
    real = os.replace
    calls = []

    def killed(src, dst):  # the kill comes between the two renames
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("2")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not out.exists() and list(tmp_path.glob(".ck.old.*"))
    (tmp_path / ".ck.abc123.tmp").mkdir()  # a stale temporary of a killed writer
    atomic.recover_if_interrupted(out)  # a reader's next use
    assert (out / "config.json").read_text() == "1"
    with atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("3")
    assert (out / "config.json").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_exchange_is_atomic_where_available(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic.exchange(a, b):
        pytest.skip("no renameat2/renamex_np on this system or file system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_lock_refuses_a_second_writer_and_is_reentrant(tmp_path):
    out = tmp_path / "ck"
    code = ("import sys; from mm1_mlx.io import atomic\n"
            "try:\n    with atomic.output_lock(sys.argv[1]): pass\n"
            "except atomic.OutputError as e: print(e); sys.exit(3)\n")
    with atomic.output_lock(out), atomic.output_lock(out):  # re-entrant in one process
        p = subprocess.run([sys.executable, "-c", code, str(out)], env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 3 and "another process" in p.stdout
    assert not list(tmp_path.iterdir())  # the lock file goes with the lock
    p = subprocess.run([sys.executable, "-c", code, str(out)], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0


# ---- the app's store ----
def test_store_tells_locked_from_damaged(tmp_path, monkeypatch):
    from app import store

    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.2)
    s = store.Store(tmp_path)
    cid = s.new_conversation("x").id
    s.close()
    other = sqlite3.connect(tmp_path / store.DB_NAME, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another writer holds it
    with pytest.raises(store.StoreError, match="locked"):
        store.Store(tmp_path)
    other.execute("ROLLBACK")
    other.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.DB_NAME, "images"]
    s = store.Store(tmp_path)
    assert s.recovered is None and [c.id for c in s.conversations()] == [cid]
    s.db.execute("UPDATE conversations SET title = CAST(X'636166E9' AS TEXT)")
    s.db.execute("INSERT OR REPLACE INTO settings VALUES ('settings', '{not json')")
    s.db.execute("INSERT OR REPLACE INTO settings VALUES ('recent_models', '5')")
    assert s.conversations()[0].title.startswith("caf")
    assert s.get_setting("settings") is None and s.get_strings("recent_models") == []
    from app.engine import Settings

    assert Settings.from_dict({"temperature": "hot", "top_p": float("nan"), "max_tokens": -1,
                               "system_prompt": 3}) == Settings()
    s.close()
    (tmp_path / store.DB_NAME).write_bytes(b"garbage" * 100)  # really damaged: moved aside
    s = store.Store(tmp_path)
    assert s.recovered is not None and s.recovered.exists()
    s.close()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(store.StoreError, match="cannot create"):
        store.Store(blocker / "sub")


def test_app_cli_uncreatable_data_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    p = subprocess.run([sys.executable, "-m", "app", "--data-dir", str(tmp_path / "file" / "d")],
                       env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
