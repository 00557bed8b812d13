"""results.json, a Markdown table (results.md) and charts (results.png; decode_bandwidth.png with the
llama.cpp peer) from one benchmark run."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

PACKAGES = ["mm1-mlx", "mlx", "mlx-lm", "mlx-vlm", "torch", "transformers", "numpy", "numba",
            "llama-cpp-python"]


def versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def generate_table(summary: dict) -> list[str]:
    rows = ["| system | TTFT (s) | prefill tok/s | decode tok/s | 2nd-question TTFT (s) | 2nd / 1st "
            "| peak RSS (GB) | decode / bandwidth bound | prefill / matmul bound |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        if r.get("status") != "ok":
            rows.append(f"| {name} | failed: {r.get('error', '?').replace('|', '/')[:160]} "
                        "| | | | | | | |")
            continue
        rows.append(
            f"| {name} | {_f(r.get('ttft_s'))} | {_f(r.get('prefill_tps'), '{:.0f}')} "
            f"| {_f(r.get('decode_tps'), '{:.1f}')} | {_f(r.get('second_ttft_s'))} "
            f"| {_f(r.get('second_over_first'))} | {_f(r.get('peak_rss_gb'))} "
            f"| {_pct(r.get('decode_fraction_of_bound'))} "
            f"| {_pct(r.get('prefill_fraction_of_bound'))} |")
    return rows


def llama_table(text: dict) -> list[str]:
    """llama.cpp beside our decoder (text only, the same prompt ids and weights)."""
    rows = [f"Text-only decoder, the same {text.get('prompt_tokens')} prompt token ids, greedy, "
            "llama.cpp through llama-cpp-python:", "",
            "| system | prefill tok/s | decode tok/s | weights read per token (GB) "
            "| decode / bandwidth bound | peak RSS (GB) |", "|---|---|---|---|---|---|"]
    for name, r in text["summary"].items():
        if r.get("status") != "ok":
            rows.append(f"| {name} | failed: {str(r.get('error', '?')).replace('|', '/')[:160]} "
                        "| | | | |")
            continue
        gb = r.get("decode_weight_bytes")
        rows.append(f"| {name} | {_f(r.get('prefill_tps'), '{:.0f}')} "
                    f"| {_f(r.get('decode_tps'), '{:.1f}')} | {_f(gb and gb / 1e9, '{:.3f}')} "
                    f"| {_pct(r.get('decode_fraction_of_bound'))} | {_f(r.get('peak_rss_gb'))} |")
    rows += ["", "| target | measured | met |", "|---|---|---|"]
    for k, t in text.get("targets", {}).items():
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        reps = ", ".join(_f(r) for r in t.get("reps", []))
        rows.append(f"| {k} | {_f(t['value'])}{f' (each rep: {reps})' if reps else ''} | {met} |")
    rows.append("")
    rows += [f"- same leading greedy tokens: {k}: {v}" for k, v in text.get("same_tokens", {}).items()]
    rows += [f"- same leading greedy tokens as on MLX's own quantized kernels: {k}: {v}"
             for k, v in text.get("same_as_mlx_kernels", {}).items()]
    rows += [f"- harness workaround: {w}" for w in text.get("workarounds", [])]
    return rows + [""]


def bandwidth_chart(text: dict, path: Path) -> None:
    """Decode rate against the weight bytes read per token, with the read-bandwidth bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in text["summary"].items()
          if v.get("status") == "ok" and v.get("decode_tps") and v.get("decode_weight_bytes")}
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, r in ok.items():
        gb = r["decode_weight_bytes"] / 1e9
        ax.scatter(gb, r["decode_tps"], color="tab:orange" if name.startswith("mm1") else "tab:gray")
        ax.annotate(name, (gb, r["decode_tps"]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    reads = sorted(r["read_gbps"] for r in ok.values() if r.get("read_gbps"))
    if reads:
        bw = reads[len(reads) // 2]
        xs = [min(r["decode_weight_bytes"] for r in ok.values()) / 1e9 * 0.8,
              max(r["decode_weight_bytes"] for r in ok.values()) / 1e9 * 1.25]
        ax.plot(xs, [bw / x for x in xs], "--", color="tab:blue",
                label=f"bandwidth bound ({bw:.0f} GB/s read)")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights read per token (GB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode vs memory bandwidth (medians)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _worker_reads(res: dict) -> str:
    reads = [x["read_gbps"] for runs in res.get("runs", {}).values() for x in runs
             if x.get("read_gbps")]
    if not reads:
        return ""
    return (f", {min(reads):.1f}-{max(reads):.1f} GB/s in the workers right after their answers "
            "(each run's decode is compared with its own)")


def markdown(res: dict) -> str:
    m = res.get("machine", {})
    lines = [f"# Benchmark: {res['size']} ({res.get('started', '')})", "",
             f"Machine: {m.get('cpu_model', m.get('cpu'))}, {m.get('cores')} cores, "
             f"{m.get('platform')}; versions: "
             + ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items() if v), "",
             f"Measured in this run: memory read bandwidth {_f(m.get('bandwidth_gbps'), '{:.1f}')} "
             f"GB/s (numpy) at the start{_worker_reads(res)}, fp32 2048^3 matmul: MLX with our BLAS "
             f"{_f(m.get('matmul_gflops'), '{:.0f}')} GFLOP/s, MLX as installed (reference BLAS) "
             f"{_f(m.get('mlx_reference', {}).get('mlx_matmul_gflops'), '{:.1f}')} GFLOP/s, numpy "
             f"{_f(m.get('numpy', {}).get('numpy_matmul_gflops'), '{:.0f}')} GFLOP/s.", ""]
    if "summary" in res:
        o = res["options"]
        lines += [f"Medians of {o['reps']} runs per system ({o['reference_reps']} for mlx-vlm as "
                  f"installed), alternating, each in its own process; ~{o['max_tokens']} decoded "
                  "tokens per question.", ""]
        lines += generate_table(res["summary"]) + [""]
        notes = []
        for name, r in res["summary"].items():
            extra = [f"{k}: {r[k]}" for k in ("second_question_cache", "blas", "workaround")
                     if r.get(k)]
            if extra:
                notes.append(f"- {name}: " + "; ".join(extra))
        lines += notes + [""]
    if "targets" in res:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for k, t in res["targets"].items():
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {k} | {_f(t['value'])} | {met} |")
        lines.append("")
    if "llama_cpp" in res:
        lines += llama_table(res["llama_cpp"])
    if "lora" in res:
        lines += ["| LoRA | step time (s) | peak memory (GB) | notes |", "|---|---|---|---|"]
        for k, r in res["lora"].items():
            if r.get("status") != "ok":
                lines.append(f"| {k} | failed: {str(r.get('error', '?')).replace('|', '/')[:160]} "
                             "| | |")
            else:
                lines.append(f"| {k} | {_f(r.get('step_s'))} | {_f(r.get('peak_gb'))} "
                             f"| {r.get('note', '')} |")
        lines.append("")
    lines.append(f"Total run time {res.get('total_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in res.get("summary", {}).items() if v.get("status") == "ok"}
    panels = [("ttft_s", "first TTFT (s)"), ("second_ttft_s", "2nd-question TTFT (s)"),
              ("decode_tps", "decode tokens/s"), ("peak_rss_gb", "peak RSS (GB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    names = list(ok)
    for ax, (key, title) in zip(axes, panels):
        vals = [ok[n].get(key) or 0 for n in names]
        ax.barh(names, vals, color=["tab:orange" if n.startswith("mm1") else "tab:gray"
                                    for n in names])
        ax.set_title(title)
        ax.invert_yaxis()
        if key == "ttft_s" and vals and max(vals) > 20 * (min(v for v in vals if v) or 1):
            ax.set_xscale("log")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"mm1-mlx benchmark, {res['size']} (medians)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.json", json.dumps(res, indent=2, default=str).encode())
    _atomic_write(out / "results.md", markdown(res).encode())
    chart(res, out / "results.png")
    if "llama_cpp" in res:
        bandwidth_chart(res["llama_cpp"], out / "decode_bandwidth.png")
