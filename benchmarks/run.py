"""Side-by-side benchmark: ``python -m benchmarks.run [--suite generate,lora,quant] [--size tiny|small]
[--out DIR]``.

Builds a random-weight LLaVA-1.5-shaped checkpoint offline (``checkpoint.py``), converts it with our
converter, and runs the same image and prompt through transformers, mlx-vlm (as installed and with
our BLAS binding) and mm1-mlx, each in its own process (``worker.py``), repetitions alternating
between systems; medians are reported. The machine's bandwidth and matmul rate are measured in the
same run (``machine.py``) to express decode and prefill as fractions of their bounds; each worker
also reads memory right after its answers, the bandwidth its own decode rate is compared with.
Writes results.json, results.md and results.png into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import report
from .checkpoint import FOLLOW_UP, QUESTION, SIZES, ensure_llava, make_image
from .children import child

GENERATE = ["transformers", "mlx-vlm", "mlx-vlm+blas", "mm1-mlx"]
QUANT = ["mm1-mlx-q8", "mm1-mlx-q4"]
DEFAULTS = {  # reps, max new tokens, repetitions of mlx-vlm as installed (reference BLAS: slow)
    "small": dict(reps=3, max_tokens=32, reference_reps=1, lora_iters=3, probe_mb=512),
    "tiny": dict(reps=2, max_tokens=8, reference_reps=2, lora_iters=2, probe_mb=128),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def safetensors_bytes(path: Path, keep) -> int:
    """Bytes of the tensors whose key passes ``keep`` (read from the safetensors headers)."""
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__" and keep(k):
                total += v["data_offsets"][1] - v["data_offsets"][0]
    return total


def decode_bytes(path: Path) -> int:
    """Weights one decoded token reads: the decoder's layers, final norm and head (one embedding
    row is negligible)."""
    return safetensors_bytes(path, lambda k: k.startswith("language_model.")
                             and "embed_tokens" not in k)


def prefill_flops(size: str, prompt_tokens: int) -> float:
    """Matmul FLOPs of a first question: the vision tower, projector and decoder over the prompt."""
    v, t = SIZES[size]["vision"], SIZES[size]["text"]
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    dv, dt = v["hidden_size"], t["hidden_size"]
    vis_layer = 4 * dv * dv + 2 * dv * v["intermediate_size"]
    vis = 2 * patches * (v["num_hidden_layers"] * vis_layer + 3 * v["patch_size"] ** 2 * dv) \
        + v["num_hidden_layers"] * 4 * patches**2 * dv
    proj = 2 * (patches - 1) * (dv * dt + dt * dt)
    kv = dt * t["num_key_value_heads"] // t["num_attention_heads"]
    layer = 2 * dt * dt + 2 * dt * kv + 3 * dt * t["intermediate_size"]
    dec = 2 * prompt_tokens * t["num_hidden_layers"] * layer \
        + t["num_hidden_layers"] * 2 * prompt_tokens**2 * dt + 2 * dt * t["vocab_size"]
    return float(vis + proj + dec)


def median(runs: list[dict], *keys) -> float | None:
    vals = []
    for r in runs:
        for k in keys:
            r = r.get(k) if isinstance(r, dict) else None
        if isinstance(r, (int, float)):
            vals.append(r)
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"status": "failed", "error": runs[0]["error"] if runs else "not run",
                "runs": len(runs)}
    out = {"status": "ok", "runs": len(ok), "failed_runs": len(runs) - len(ok)}
    for name, keys in {
        "ttft_s": ("first", "ttft_s"), "prefill_tps": ("first", "prefill_tps"),
        "decode_tps": ("first", "decode_tps"), "second_ttft_s": ("second", "ttft_s"),
        "peak_rss_gb": ("peak_rss_gb",), "load_s": ("load_s",),
        "prompt_tokens": ("first", "prompt_tokens"), "generated": ("first", "generated"),
    }.items():
        out[name] = median(ok, *keys)
    for k in ("blas", "second_question_cache", "workaround"):
        if k in ok[0]:
            out[k] = ok[0][k]
    if out["ttft_s"] and out["second_ttft_s"]:
        out["second_over_first"] = out["second_ttft_s"] / out["ttft_s"]
    if len(ok) < len(runs):
        out["errors"] = sorted({r["error"] for r in runs if "error" in r})
    return out


def measure_machine(timeout: float, quick: bool = False) -> dict:
    log("measuring memory bandwidth and matmul rate")
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "platform": platform.platform(), "python": platform.python_version()}
    try:
        out["cpu_model"] = next(line.split(":", 1)[1].strip()
                                for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    q = ["--quick"] if quick else []
    out["numpy"] = child(["benchmarks.machine", "numpy", *q], timeout)
    out["mlx"] = child(["benchmarks.machine", "mlx"], timeout)
    out["mlx_reference"] = child(["benchmarks.machine", "mlx-reference"], timeout)
    out["bandwidth_gbps"] = out["numpy"].get("read_gbps")
    out["matmul_gflops"] = out["mlx"].get("mlx_matmul_gflops")
    return out


def prepare(size: str, cache: Path, quant: bool, timeout: float) -> dict:
    """HF checkpoint, the image, and our conversions (float32; 8/4-bit when ``quant``)."""
    t = time.perf_counter()
    hf = ensure_llava(cache, size)
    image = make_image(cache / "image.png")
    paths = {"hf": hf, "image": image, "mm1-mlx": cache / f"mm1-{size}"}
    if quant:
        paths.update({"mm1-mlx-q8": cache / f"mm1-{size}-q8", "mm1-mlx-q4": cache / f"mm1-{size}-q4"})
    stamp = json.loads((hf / "benchmark_model.json").read_text())
    for name, bits in (("mm1-mlx", None), ("mm1-mlx-q8", 8), ("mm1-mlx-q4", 4)):
        if name not in paths:
            continue
        dst = paths[name]
        marker = dst / "benchmark_source.json"
        if marker.exists() and json.loads(marker.read_text()) == stamp:
            continue
        log(f"converting to {dst.name}")
        args = ["convert", "--hf-path", str(hf), "--mlx-path", str(dst), "--dtype", "float32"]
        if bits:
            args += ["-q", "--q-bits", str(bits)]
        p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                           timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
        if p.returncode != 0:
            shutil.rmtree(dst, ignore_errors=True)
            paths[name] = RuntimeError((p.stderr.strip().splitlines() or ["convert failed"])[-1])
            continue
        marker.write_text(json.dumps(stamp))
    paths["prepare_s"] = time.perf_counter() - t
    return paths


def run_generate(systems: list[str], paths: dict, opts: dict, timeout: float) -> dict:
    """Alternate systems within each repetition; mlx-vlm as installed gets fewer repetitions."""
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in (QUESTION, FOLLOW_UP)]
    spec = {"hf_path": str(paths["hf"]), "image": str(paths["image"]), "prompts": prompts,
            "questions": [QUESTION, FOLLOW_UP], "max_tokens": opts["max_tokens"],
            "threads": os.cpu_count(), "probe_mb": opts["probe_mb"]}
    runs = {s: [] for s in systems}
    for rep in range(opts["reps"]):
        for s in systems:
            if s == "mlx-vlm" and rep >= opts["reference_reps"]:
                continue
            if s.startswith("mm1-mlx"):
                if isinstance(paths.get(s), Exception):
                    runs[s].append({"error": f"conversion failed: {paths[s]}"})
                    continue
                sspec = dict(spec, mlx_path=str(paths[s]))
            else:
                sspec = spec
            log(f"rep {rep + 1}/{opts['reps']}: {s}")
            r = child(["benchmarks.worker", s, json.dumps(sspec)], timeout)
            if "error" in r:
                log(f"  {s} failed: {r['error']}")
            else:
                log(f"  ttft {r['first']['ttft_s']:.2f} s, decode "
                    f"{r['first']['decode_tps'] or 0:.1f} tok/s, second ttft "
                    f"{r['second']['ttft_s']:.2f} s, rss {r['peak_rss_gb']:.2f} GB, "
                    f"read {r['read_gbps']:.1f} GB/s")
            runs[s].append(r)
    return runs


def rep_order(groups: list, rep: int) -> list:
    """The systems of repetition ``rep``: group by group (ours, then its peers), ours first in
    even repetitions and last in odd ones."""
    return [s for group in groups for s in (group if rep % 2 == 0 else group[::-1])]


def run_text(paths: dict, cache: Path, opts: dict, size: str, timeout: float) -> dict:
    """llama.cpp beside our decoder, text only, the same prompt ids (``llama_cpp.py``); the two of
    each pair run one after the other, and which goes first alternates by repetition (the VM's
    speed drifts within minutes: a fixed order would hand one side the drift)."""
    from . import llama_cpp

    ggufs, notes, llama = llama_cpp.gguf_files(paths["hf"], cache, timeout, log)
    spec = {"token_ids": llama_cpp.prompt_ids(SIZES[size]["text"]["vocab_size"]),
            "max_tokens": opts["max_tokens"], "threads": opts.get("threads") or os.cpu_count(),
            "probe_mb": opts["probe_mb"]}
    sources = {**{s: paths.get(m) for s, m in llama_cpp.OURS.items()}, **ggufs}
    groups = llama_cpp.groups(opts.get("llama_f32_kv", False))
    runs = {s: [] for group in groups for s in group}
    for rep in range(opts["reps"]):
        for s in rep_order(groups, rep):
            src = sources.get(s)
            if not isinstance(src, Path):
                runs[s].append({"error": f"no model: {src}"})
                continue
            key = "gguf" if s in llama_cpp.LLAMA else "mlx_path"
            log(f"rep {rep + 1}/{opts['reps']}: {s}")
            kv = {"kv": "f32"} if s == llama_cpp.F32_KV else {}
            r = child(["benchmarks.worker", s, json.dumps(dict(spec, **kv, **{key: str(src)}))],
                      timeout)
            log(f"  {s} failed: {r['error']}" if "error" in r else
                f"  prefill {r['first']['prefill_tps']:.0f} tok/s, decode "
                f"{r['first']['decode_tps'] or 0:.1f} tok/s, read {r['read_gbps']:.1f} GB/s")
            runs[s].append(r)
    reference = {}  # each quantized decoder once more on MLX's own kernels: the tokens to keep
    for s in llama_cpp.QUANTIZED:
        if isinstance(sources.get(s), Path):
            log(f"{s} on MLX's own quantized kernels (MM1_MLX_QUANT_KERNELS=mlx)")
            reference[s] = child(["benchmarks.worker", s, json.dumps(dict(
                spec, mlx_path=str(sources[s])))], timeout, env={"MM1_MLX_QUANT_KERNELS": "mlx"})
    summary = {s: summarize(r) for s, r in runs.items()}
    for s, r in summary.items():
        src = sources.get(s)
        if r.get("status") != "ok" or not isinstance(src, Path):
            continue
        r["decode_weight_bytes"] = (llama_cpp.weight_bytes(src, llama) if s in llama_cpp.LLAMA
                                    else decode_bytes(src))
        r["read_gbps"] = median([x for x in runs[s] if "error" not in x], "read_gbps")
        if r["read_gbps"] and r.get("decode_tps"):
            r["decode_bound_tps"] = r["read_gbps"] * 1e9 / r["decode_weight_bytes"]
            r["decode_fraction_of_bound"] = r["decode_tps"] / r["decode_bound_tps"]
    same_as_mlx = llama_cpp.same_as_mlx_kernels(runs, reference)
    return {"runs": runs, "summary": summary, "targets": llama_cpp.targets(summary, same_as_mlx, runs),
            "same_tokens": llama_cpp.same_tokens(runs), "same_as_mlx_kernels": same_as_mlx,
            "mlx_kernels_runs": reference, "workarounds": notes,
            "prompt_tokens": len(spec["token_ids"])}


def bounds(summary: dict, runs: dict, machine: dict, paths: dict, size: str) -> None:
    """Decode as a fraction of the bandwidth bound, prefill of the matmul bound (in place).

    Each run's decode rate is compared with the read bandwidth its own worker measured right after
    it (the VM drifts 10-30% over minutes); the median of those fractions is reported, and the
    fraction of the bound from the probe at the start of the run alongside."""
    bw, mm = machine.get("bandwidth_gbps"), machine.get("matmul_gflops")
    for s, r in summary.items():
        if r.get("status") != "ok":
            continue
        src = paths.get(s) if s.startswith("mm1-mlx") else paths["hf"]
        if isinstance(src, Path):
            size_b = r["decode_weight_bytes"] = decode_bytes(src)
            ok = [x for x in runs.get(s, []) if "error" not in x]
            fractions = [x["first"]["decode_tps"] * size_b / (x["read_gbps"] * 1e9)
                         for x in ok if x["first"].get("decode_tps") and x.get("read_gbps")]
            r["read_gbps"] = median(ok, "read_gbps")
            if fractions:
                r["decode_fraction_of_bound"] = statistics.median(fractions)
                r["decode_bound_tps"] = r["read_gbps"] * 1e9 / size_b
            if bw and r.get("decode_tps"):
                r["decode_fraction_of_start_probe"] = r["decode_tps"] * size_b / (bw * 1e9)
        if mm and r.get("prompt_tokens") and r.get("ttft_s"):
            flops = prefill_flops(size, int(r["prompt_tokens"]))
            r["prefill_gflop"] = flops / 1e9
            r["ttft_bound_s"] = flops / (mm * 1e9)
            r["prefill_fraction_of_bound"] = r["ttft_bound_s"] / r["ttft_s"]


def targets(summary: dict) -> dict:
    """The issue's targets, each with the measured ratio and whether it is met."""
    us, hf, vlm = (summary.get(k, {}) for k in ("mm1-mlx", "transformers", "mlx-vlm"))
    out = {}

    def check(name, value, ok):
        out[name] = {"value": value, "met": bool(ok) if value is not None else None}

    def ratio(a, b):
        return a / b if a and b else None

    d = ratio(us.get("decode_tps"), hf.get("decode_tps"))
    check("decode >= 1.0x transformers", d, d is not None and d >= 1.0)
    f = us.get("decode_fraction_of_bound")
    check("decode >= 90% of bandwidth bound", f, f is not None and f >= 0.9)
    t = ratio(us.get("ttft_s"), hf.get("ttft_s"))
    check("first TTFT <= 1.0x transformers", t, t is not None and t <= 1.0)
    v = ratio(vlm.get("ttft_s"), us.get("ttft_s"))
    check("TTFT >= 2x faster than mlx-vlm as installed", v, v is not None and v >= 2.0)
    s = us.get("second_over_first")
    check("second TTFT <= 0.2x first", s, s is not None and s <= 0.2)
    m = ratio(us.get("peak_rss_gb"), hf.get("peak_rss_gb"))
    check("peak RSS <= transformers", m, m is not None and m <= 1.0)
    return out


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="generate,lora,quant",
                   help="comma-separated: generate, lora, quant (default all)")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--cache", default=None,
                   help="where built checkpoints are kept (default: the user cache dir)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per system")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens decoded per question")
    p.add_argument("--systems", default=None,
                   help="restrict the generate suite to these systems (comma-separated)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the llama.cpp peer and of every child's BLAS / numba / OpenMP "
                        "(default: all cores; 1 on a shared machine, where threads wait their turn)")
    p.add_argument("--llama-cpp", choices=["auto", "on", "off"], default="auto",
                   help="llama.cpp text-decoder peer in the generate suite (auto: if installed)")
    p.add_argument("--llama-f32-kv", action="store_true",
                   help="also run llama.cpp's F32 file with a float32 KV cache (its default is "
                        "F16; ours, like MLX's, is float32) beside our float decoder")
    p.add_argument("--cpu", choices=["native", "avx2"], default="native",
                   help="avx2: our children compile and pick kernels as on a CPU without AVX-512 "
                        "(numba: Haswell's features; OpenBLAS: its Haswell kernels); build the "
                        "llama.cpp peer without AVX-512 to match")
    return p


# what numba compiles for with --cpu avx2: Haswell's features only (NUMBA_CPU_NAME alone keeps the
# host's features, AVX-512 included)
HASWELL = {"NUMBA_CPU_NAME": "haswell", "OPENBLAS_CORETYPE": "Haswell", "NUMBA_CPU_FEATURES": (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,"
    "+popcnt,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")}


def main(argv=None) -> dict:
    args = setup_arg_parser().parse_args(argv)
    t0 = time.perf_counter()
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = set(suites) - {"generate", "lora", "quant"}
    if unknown:
        setup_arg_parser().error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    opts = dict(DEFAULTS[args.size])
    if args.reps:
        opts.update(reps=args.reps, reference_reps=min(args.reps, opts["reference_reps"]))
    if args.max_tokens:
        opts["max_tokens"] = args.max_tokens
    if args.threads:
        opts["threads"] = args.threads
        for var in ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # the children's
    opts["cpu"], opts["llama_f32_kv"] = args.cpu, args.llama_f32_kv
    if args.cpu == "avx2":
        os.environ.update(HASWELL)  # the children's
    if args.cache:
        cache = Path(args.cache)
    else:
        import platformdirs

        cache = Path(platformdirs.user_cache_dir("mm1_mlx")) / "bench"
    out_dir = Path(args.out)

    results = {"size": args.size, "suites": suites, "options": opts,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "model": {"vision": SIZES[args.size]["vision"], "text": SIZES[args.size]["text"]}}
    results["machine"] = measure_machine(args.timeout, quick=args.size == "tiny")
    log(f"building the {args.size} checkpoint in {cache}")
    from .llama_cpp import available

    llama = "generate" in suites and (args.llama_cpp == "on"
                                      or (args.llama_cpp == "auto" and available()))
    paths = prepare(args.size, cache, "quant" in suites or llama, args.timeout)
    results["prepare_s"] = paths.pop("prepare_s")
    results["versions"] = report.versions()

    systems = []
    if "generate" in suites:
        systems += [s for s in GENERATE if not args.systems or s in args.systems.split(",")]
    if "quant" in suites:
        systems += QUANT
    if systems:
        runs = run_generate(systems, paths, opts, args.timeout)
        results["runs"] = runs
        results["summary"] = {s: summarize(r) for s, r in runs.items()}
        bounds(results["summary"], runs, results["machine"], paths, args.size)
        if "generate" in suites:
            results["targets"] = targets(results["summary"])
    if llama:
        results["llama_cpp"] = run_text(paths, cache, opts, args.size, args.timeout)
    if "lora" in suites:
        from .lora_bench import run_lora

        results["lora"] = run_lora(paths, cache, opts["lora_iters"], args.timeout, log)
    results["total_s"] = time.perf_counter() - t0
    report.write(results, out_dir)
    log(f"done in {results['total_s']:.0f} s: {out_dir}/results.{{json,md,png}}")
    return results


if __name__ == "__main__":
    main()
