"""Every command line speaks mlx-lm / mlx-vlm's flag names (old spellings stay as aliases), says
``python -m ...`` in its usage line, and takes image URLs where it takes images."""

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)

import base64
import functools
import http.server
import importlib
import os
import subprocess
import sys
import threading

import pytest
from PIL import Image

# module -> what it does: reads an adapter, writes a checkpoint (flag), quantizes, samples, long work
CLIS = {
    "mm1_mlx.generate": dict(adapter=True, sampling=True),
    "mm1_mlx.eval": dict(adapter=True, long=True),
    "mm1_mlx.fuse": dict(adapter=True, writes="--save-path"),
    "mm1_mlx.quantize": dict(writes="--mlx-path", quantizes=True, long=True),
    "mm1_mlx.lora": dict(long=True),
    "mm1_mlx.train": dict(long=True),
    "convert.__main__": dict(writes="--mlx-path", quantizes=True, long=True),
    "convert.coreml": dict(),
    "app.__main__": dict(adapter=True, sampling=True),
    "mm1_mlx.server.__main__": dict(adapter=True, sampling=True),
}
PROGS = {"convert.__main__": "python -m convert", "app.__main__": "python -m app",
         "mm1_mlx.server.__main__": "python -m mm1_mlx.server"}
# old spelling -> mlx-lm's, per tool: both must reach the same setting
ALIASES = {
    "mm1_mlx.generate": {"--adapter": "--adapter-path", "--temp": "--temperature",
                         "--system": "--system-prompt", "--stats": "--verbose"},
    "mm1_mlx.eval": {"--adapter": "--adapter-path"},
    "mm1_mlx.fuse": {"--out": "--save-path", "--adapter": "--adapter-path"},
    "mm1_mlx.quantize": {"--out": "--mlx-path", "--bits": "--q-bits",
                         "--group-size": "--q-group-size"},
    "mm1_mlx.lora": {"--lora-layers": "--num-layers", "--max-length": "--max-seq-length",
                     "--grad-accumulation": "--grad-accumulation-steps", "--config": "-c"},
    "convert.__main__": {"--hf-path": "--model"},
    "app.__main__": {"--adapter": "--adapter-path", "--temp": "--temperature",
                     "--system": "--system-prompt"},
}


def parser(module: str):
    if module == "convert.coreml":
        pytest.importorskip("torch")  # the Core ML exporter's module imports it
    return importlib.import_module(module).setup_arg_parser()


def options(p) -> dict[str, str]:
    """Every option string -> its destination."""
    return {s: a.dest for a in p._actions for s in a.option_strings}


@pytest.mark.parametrize("module", sorted(CLIS))
def test_every_cli_takes_the_shared_names(module):
    p, kind = parser(module), CLIS[module]
    opts = options(p)
    assert p.prog == PROGS.get(module, f"python -m {module}")
    assert p.format_usage().startswith(f"usage: {p.prog} ")
    if module != "mm1_mlx.train":
        assert "--model" in opts
    if kind.get("adapter"):
        assert opts["--adapter-path"] == opts["--adapter"]
    if kind.get("writes"):
        assert kind["writes"] in opts
    if kind.get("quantizes"):
        assert {"-q", "--q-bits", "--q-group-size"} <= set(opts)
    if kind.get("sampling"):
        assert {"--temperature", "--temp", "--top-p", "--max-tokens", "--system-prompt"} <= set(opts)
    if kind.get("long"):
        assert "--quiet" in opts
    for old, new in ALIASES.get(module, {}).items():
        assert opts[old] == opts[new], (old, new)


def test_lora_takes_mlx_lm_spellings():
    from mm1_mlx.lora import args_from, setup_arg_parser

    new = setup_arg_parser().parse_args(
        ["--train", "--data", "d", "--num-layers", "2", "--max-seq-length", "64",
         "--grad-accumulation-steps", "2", "--adapter-path", "a"])
    old = setup_arg_parser().parse_args(
        ["--data", "d", "--lora-layers", "2", "--max-length", "64", "--grad-accumulation", "2",
         "--adapter-path", "a"])
    assert args_from(new) == args_from(old)
    assert (args_from(new).lora_layers, args_from(new).max_length) == (2, 64)


def test_generate_parses_images_verbose_and_sampling_names():
    from mm1_mlx.generate import setup_arg_parser

    p = setup_arg_parser()
    a = p.parse_args(["--image", "a.png", "b.png", "--image", "c.png", "-p", "x", "--temperature",
                      "0.5", "--system-prompt", "be brief", "--verbose", "--adapter-path", "ad"])
    assert a.image == ["a.png", "b.png", "c.png"]
    assert (a.temp, a.system, a.stats, a.adapter) == (0.5, "be brief", True, "ad")
    old = p.parse_args(["--image", "a.png", "--image", "b.png", "--prompt", "x", "--temp", "0.5",
                        "--system", "be brief", "--stats", "--adapter", "ad"])
    assert old.image == ["a.png", "b.png"] and (old.temp, old.system, old.stats) == (0.5,
                                                                                  "be brief", True)
    assert p.parse_args(["-p", "x", "--verbose", "False"]).stats is False
    assert p.parse_args(["-p", "x"]).stats is False and p.parse_args(["-p", "x"]).image == []


def run_generate(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mm1_mlx.generate", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def served(tmp_path):
    """An image file and the same bytes served over http on 127.0.0.1."""
    Image.new("RGB", (48, 40), (20, 40, 220)).save(tmp_path / "blue.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path / "blue.png", f"http://127.0.0.1:{server.server_address[1]}/blue.png"
    server.shutdown()


def test_generate_takes_image_urls_like_files(tiny_checkpoint, served):
    """One --image flag with a file, an http URL and a data: URL of the same picture: the answer
    equals the one about three copies of the file."""
    path, url = served
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    prompt = ["--prompt", "<image> <image> <image> what color is the square ?", "--max-tokens", 8]
    files = run_generate("--model", tiny_checkpoint, "--image", path, path, path, *prompt)
    urls = run_generate("--model", tiny_checkpoint, "--image", path, url, "--image", data_url,
                        *prompt, "--temperature", 0)
    assert files.returncode == 0 and urls.returncode == 0, urls.stderr
    assert urls.stdout == files.stdout and files.stdout.strip()
    missing = run_generate("--model", tiny_checkpoint, "--image", url + ".nope", *prompt)
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr
    assert "Traceback" not in missing.stderr
