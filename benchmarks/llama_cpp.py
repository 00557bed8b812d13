"""llama.cpp (llama-cpp-python) as a peer of the generate suite: the text-only decoder on the same
weights, F32 / Q8_0 / Q4_0 beside our float32 / 8-bit / 4-bit, the same prompt token ids, greedy.

The GGUF files come from the benchmark checkpoint's decoder through the converter that ships in
llama-cpp-python's sdist (``vendor/llama.cpp/convert_hf_to_gguf.py``, with its ``gguf-py``); the
sdist of the installed version is fetched with pip (or ``MM1_BENCH_LLAMA_SDIST`` names one), once,
into the cache. Q4_0 is made from the F32 file by ``llama_model_quantize`` (the converter writes
F32/F16/BF16/Q8_0 only). What the harness has to work around is recorded in the results.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# llama.cpp keeps its KV cache in F16 by default; "F32 KV" is the F32 file with a float32 cache,
# as ours (and MLX's) is: run beside the float pair with --llama-f32-kv, for bytes read alike
F32_KV = "llama.cpp-F32-kvF32"
LLAMA = {"llama.cpp-F32": "f32", "llama.cpp-Q8_0": "q8_0", "llama.cpp-Q4_0": "q4_0", F32_KV: "f32"}
OURS = {"mm1-mlx-text": "mm1-mlx", "mm1-mlx-q8-text": "mm1-mlx-q8", "mm1-mlx-q4-text": "mm1-mlx-q4"}
PAIRS = [("mm1-mlx-text", "llama.cpp-F32"), ("mm1-mlx-q8-text", "llama.cpp-Q8_0"),
         ("mm1-mlx-q4-text", "llama.cpp-Q4_0")]
GGML_TYPE_F32 = 0
QUANTIZED = ("mm1-mlx-q8-text", "mm1-mlx-q4-text")  # rerun once on MLX's kernels: same tokens?
PROMPT_TOKENS = 632  # the measurement: image + question of the generate suite
LLAMA_FTYPE_MOSTLY_Q4_0 = 2
# The converter hashes the tokenizer's pre-tokenizer output against the models it knows; the
# benchmark's own BPE is none of them. Token ids are fed directly, so any label is equivalent.
WORKAROUND_PRE = ("benchmark BPE tokenizer unknown to convert_hf_to_gguf's pre-tokenizer table: "
                  "labelled 'default' (token ids are fed directly, text is never tokenized)")


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def prompt_ids(vocab: int, n: int = PROMPT_TOKENS) -> list[int]:
    import numpy as np

    return np.random.default_rng(632).integers(3, min(vocab, 32000), n).tolist()


def sdist_dir(cache: Path, log) -> Path:
    """The unpacked llama-cpp-python sdist of the installed version (its vendor/llama.cpp)."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    root = cache / f"llama-cpp-python-{ver}-sdist"
    if (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        return root
    src = os.environ.get("MM1_BENCH_LLAMA_SDIST")
    if not src:
        log(f"fetching the llama-cpp-python {ver} sdist (for its GGUF converter)")
        dl = cache / "llama-sdist-download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={ver}", "-d", str(dl)], check=True,
                       capture_output=True, text=True, timeout=600)
        src = sorted(glob.glob(str(dl / "llama_cpp_python-*.tar.gz")))[-1]
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(src) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")
                   and not m.issym() and not m.islnk()]
        tar.extractall(tmp, members=members, filter="data")
    os.replace(tmp / top, root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def text_checkpoint(hf_llava: Path, dst: Path) -> Path:
    """The LLaVA checkpoint's decoder as a Hugging Face LlamaForCausalLM directory."""
    from safetensors.numpy import load_file, save_file

    if (dst / "model.safetensors").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((hf_llava / "config.json").read_text())
    text = dict(config["text_config"], architectures=["LlamaForCausalLM"], model_type="llama")
    text.setdefault("rope_theta", text.get("rope_parameters", {}).get("rope_theta", 10000.0))
    (tmp / "config.json").write_text(json.dumps(text, indent=1))
    weights = {}
    for f in sorted(hf_llava.glob("*.safetensors")):
        for k, v in load_file(f).items():
            if k.startswith("language_model."):
                weights[k[len("language_model."):]] = v
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_llava / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


_CONVERT = """
import runpy, sys
sys.path[:0] = [{llama!r}, {gguf!r}]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def gguf_files(hf_llava: Path, cache: Path, timeout: float, log) -> tuple[dict, list, Path]:
    """({system: GGUF path or Exception}, the workarounds applied, the converter's directory)."""
    out, notes, llama = {}, [WORKAROUND_PRE], None
    try:
        llama = sdist_dir(cache, log) / "vendor" / "llama.cpp"
        text = text_checkpoint(hf_llava, cache / "llama-text")
    except Exception as e:  # no network for the sdist, etc.: the peer is reported as failed
        return {s: e for s in LLAMA}, notes, llama
    stamp = (hf_llava / "benchmark_model.json").read_text()
    for system, outtype in LLAMA.items():
        if system == F32_KV:  # the F32 file, with another cache
            continue
        path = cache / f"llama-text-{outtype}.gguf"
        marker = path.with_suffix(".source.json")
        if path.exists() and marker.exists() and marker.read_text() == stamp:
            out[system] = path
            continue
        try:
            if outtype == "q4_0":
                _quantize(out["llama.cpp-F32"], path)
            else:
                log(f"converting the decoder to GGUF {outtype}")
                code = _CONVERT.format(llama=str(llama), gguf=str(llama / "gguf-py"),
                                       script=str(llama / "convert_hf_to_gguf.py"),
                                       args=[str(text), "--outfile", str(path) + ".tmp",
                                             "--outtype", outtype])
                p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   timeout=timeout)
                if p.returncode != 0:
                    raise RuntimeError((p.stderr.strip().splitlines() or ["failed"])[-1])
                os.replace(str(path) + ".tmp", path)
            marker.write_text(stamp)
            out[system] = path
        except Exception as e:
            out[system] = e
    out[F32_KV] = out["llama.cpp-F32"]
    return out, notes, llama


def groups(f32_kv: bool = False) -> list:
    """Each of our decoders with its llama.cpp peers: ``PAIRS``, and the F32 file with a float32
    KV cache beside the float pair where asked (``--llama-f32-kv``)."""
    return [(*pair, F32_KV) if f32_kv and pair[1] == "llama.cpp-F32" else pair for pair in PAIRS]


def _quantize(f32: Path, dst: Path) -> None:
    if isinstance(f32, Exception):
        raise RuntimeError(f"no F32 GGUF: {f32}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 1
    tmp = str(dst) + ".tmp"
    if llama_cpp.llama_model_quantize(str(f32).encode(), tmp.encode(), params) != 0:
        raise RuntimeError("llama_model_quantize failed")
    os.replace(tmp, dst)


def run_llama(spec: dict) -> dict:
    """Worker: prefill the prompt ids, then greedy-decode ``max_tokens`` tokens."""
    import time

    import llama_cpp

    t = time.perf_counter()
    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if spec.get("kv") == "f32" else {}
    llm = llama_cpp.Llama(spec["gguf"], n_ctx=2048, n_batch=1024, n_ubatch=512,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          verbose=False, **kv)
    load_s = time.perf_counter() - t
    ids, times, tokens = spec["token_ids"], [], []
    t0 = time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            reset=True):
        times.append(time.perf_counter())
        tokens.append(int(tok))
        if len(tokens) >= spec["max_tokens"]:
            break
    return _text_figures(t0, times, tokens, len(ids), load_s)


def run_ours(spec: dict) -> dict:
    """Worker: our decoder (``mm1_mlx.load``) on the same ids, greedy, one token at a time."""
    import mm1_mlx  # noqa: I001  (first: binds OpenBLAS before mlx.core loads)
    import time

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mm1_mlx.cpu import step as cpu_step

    t = time.perf_counter()
    model, _ = mm1_mlx.load(spec["mlx_path"])
    load_s = time.perf_counter() - t
    lm = model.language_model
    cache = make_prompt_cache(lm)
    step = cpu_step.decode_step(lm)  # the numpy decode step where it applies, as generation does
    step = step if step is not None and step.accepts(cache) else None
    times, tokens = [], []
    t0 = time.perf_counter()
    logits = lm(lm.embed(mx.array([spec["token_ids"]])), cache, last_only=True)
    for _ in range(spec["max_tokens"]):
        tok = logits[:, -1].argmax(-1, keepdims=True)
        tokens.append(tok.item())
        times.append(time.perf_counter())
        if len(tokens) < spec["max_tokens"]:
            logits = step(step.embed(tokens[-1]), cache) if step else lm(lm.embed(tok), cache)
    out = _text_figures(t0, times, tokens, len(spec["token_ids"]), load_s)
    out["blas"] = mm1_mlx.backend_info()["blas"]
    return out


def _text_figures(t0, times, tokens, prompt_tokens, load_s) -> dict:
    ttft, n = times[0] - t0, len(times) - 1
    return {"load_s": load_s, "first": {
        "ttft_s": ttft, "prompt_tokens": prompt_tokens, "prefill_tps": prompt_tokens / ttft,
        "generated": len(tokens), "decode_tps": n / (times[-1] - times[0]) if n else None},
        "tokens": tokens}


def weight_bytes(gguf: Path, llama: Path) -> int:
    """Bytes of a GGUF's tensors one decoded token reads (all but the token embedding table)."""
    sys.path.insert(0, str(llama / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    return sum(int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors if t.name != "token_embd.weight")


def targets(summary: dict, same_as_mlx: dict | None = None, runs: dict | None = None) -> dict:
    """The issue's targets for the text-only decoders: each ratio of medians, and with ``runs``
    the ratio within each repetition (``reps``: a llama.cpp pair's two runs went back to back, so
    the VM's drift over minutes, 10-30% here, moves both sides); answers unchanged: every greedy
    token of each quantized decoder equal to the same model's on MLX's own kernels
    (``same_as_mlx_kernels``)."""
    def ratio(a, b):
        x, y = summary.get(a, {}).get("decode_tps"), summary.get(b, {}).get("decode_tps")
        return x / y if x and y else None

    out = {}
    for name, (a, b, least) in {
        "4-bit decode >= 0.7x llama.cpp Q4_0": ("mm1-mlx-q4-text", "llama.cpp-Q4_0", 0.7),
        "4-bit decode >= 2x our float decode": ("mm1-mlx-q4-text", "mm1-mlx-text", 2.0),
        "float decode >= 1.0x llama.cpp F32": ("mm1-mlx-text", "llama.cpp-F32", 1.0),
        "8-bit decode vs llama.cpp Q8_0 (no target)": ("mm1-mlx-q8-text", "llama.cpp-Q8_0", None),
        "float decode vs llama.cpp F32 with an F32 KV cache (no target)": (
            "mm1-mlx-text", F32_KV, None),
    }.items():
        if b == F32_KV and b not in summary:  # asked for with --llama-f32-kv only
            continue
        v = ratio(a, b)
        out[name] = {"value": v, "met": None if v is None or least is None else v >= least}
        if runs is not None:
            out[name]["reps"] = rep_ratios(runs.get(a, []), runs.get(b, []))
    if same_as_mlx:
        equal = [_fraction(v) for v in same_as_mlx.values()]
        out["answers unchanged (greedy tokens = MLX's own quantized kernels)"] = {
            "value": min(equal), "met": min(equal) == 1.0}
    return out


def rep_ratios(ours: list, theirs: list) -> list:
    """Each repetition's decode-rate ratio, ours / theirs (None where either run failed)."""
    def tps(r):
        return r.get("first", {}).get("decode_tps") if "error" not in r else None

    return [x / y if x and y else None for x, y in ((tps(a), tps(b)) for a, b in zip(ours, theirs))]


def _leading(a: list, b: list) -> str:
    """How many leading tokens two greedy runs share, of the shorter: ``"n/m"``."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{n}/{min(len(a), len(b))}"


def _fraction(text: str) -> float:
    n, m = text.split("/")
    return int(n) / int(m) if int(m) else 0.0


def _tokens(runs: list) -> list | None:
    return next((r["tokens"] for r in runs if "tokens" in r), None)


def same_tokens(runs: dict) -> dict:
    """Leading greedy tokens each of our decoders shares with its llama.cpp peers (first runs)."""
    out = {}
    for ours, *peers in groups(F32_KV in runs):
        for theirs in peers:
            a, b = _tokens(runs.get(ours, [])), _tokens(runs.get(theirs, []))
            if a and b:
                out[f"{ours} vs {theirs}"] = _leading(a, b)
    return out


def same_as_mlx_kernels(runs: dict, reference: dict) -> dict:
    """Leading greedy tokens each quantized decoder (every run) shares with the same model on
    MLX's own quantized kernels (``reference``: one run each): the fewest over the runs."""
    out = {}
    for name, ref in reference.items():
        want = ref.get("tokens")
        got = [r["tokens"] for r in runs.get(name, []) if "tokens" in r]
        if want and got:
            out[name] = min((_leading(g, want) for g in got), key=_fraction)
    return out
