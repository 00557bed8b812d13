"""Server throughput and time to first token: ``python -m benchmarks.serve [--size small]``.

Starts ``python -m mm1_mlx.server`` on 127.0.0.1 with the benchmark model (``checkpoint.py``,
converted by ``run.prepare``) and sends the same mixed set of streaming requests (every fourth one
with its own image, the rest text questions of varied length) from 1, 4 and 16 concurrent clients:
once to the batching server (``--max-concurrency``) and once to the same server limited to one
request at a time (``--max-concurrency 1``: requests queue, nothing decodes together). The prompt
cache is off (``--prompt-cache-bytes 0``) so no request reuses another's work. Reports total
output tokens/s and p50/p95 TTFT (request sent -> first content token) per setting, and writes
``serve.json`` and ``serve.md`` into ``--out``. mlx-vlm's server is run too when mlx-vlm is
installed and its ``mlx_vlm.server`` starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .checkpoint import SIZES, WORDS, make_image

CLIENTS = (1, 4, 16)


def log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def workload(n: int, image_dir: Path, image_every: int = 4) -> list[dict]:
    """``n`` chat requests: every ``image_every``-th with its own image, the others 10-70-word
    questions."""
    import base64

    reqs = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(10 + 15 * (i % 5)))
        text = f"Question {i}: {words}?"
        if i % image_every == 0:
            path = make_image(image_dir / f"image{i}.png", seed=100 + i)
            url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            content = [{"type": "image_url", "image_url": {"url": url}},
                       {"type": "text", "text": text}]
        else:
            content = text
        reqs.append({"messages": [{"role": "user", "content": content}]})
    return reqs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((proc.stderr.read().strip().splitlines() or ["exited"])[-1])
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def stream_one(base: str, model: str, req: dict, max_tokens: int) -> dict:
    import httpx

    body = dict(req, model=model, stream=True, max_tokens=max_tokens, temperature=0.0,
                stream_options={"include_usage": True})
    t0, ttft, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
    return {"ttft_s": ttft, "tokens": tokens, "total_s": time.perf_counter() - t0}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def drive(base: str, model: str, reqs: list[dict], clients: int, max_tokens: int) -> dict:
    """Send every request from ``clients`` concurrent clients; aggregate figures."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda r: stream_one(base, model, r, max_tokens), reqs))
    wall = time.perf_counter() - t0
    ttfts = [r["ttft_s"] for r in runs if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in runs)
    return {"clients": clients, "requests": len(reqs), "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p95_s": percentile(ttfts, 0.95)}


def peak_rss_gb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) / 1e6 for ln in f if ln.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def run_mm1(model: Path, label: str, concurrency: int, levels, reqs, max_tokens: int,
            timeout: float, save):
    port = free_port()
    cmd = [sys.executable, "-m", "mm1_mlx.server", "--model", str(model), "--port", str(port),
           "--max-concurrency", str(concurrency), "--prompt-cache-bytes", "0",
           "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    log(f"{label}: starting {' '.join(cmd[1:])}")
    proc = start(cmd, f"{base}/health", timeout)
    try:
        name = str(model)
        stream_one(base, name, reqs[1], 4)  # warm-up: first calls build tables
        out = []
        for clients in levels:
            r = drive(base, name, reqs, clients, max_tokens)
            log(f"{label} x{clients}: {r['tokens_per_s']:.1f} tok/s, TTFT p50 "
                f"{r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s ({r['wall_s']:.0f} s)")
            out.append(dict(r, system=label, peak_rss_gb=peak_rss_gb(proc.pid),
                            load_average=os.getloadavg()[0]))
            save(out)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_mlx_vlm(hf: Path, reqs, max_tokens: int, timeout: float) -> list[dict] | str:
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        return "mlx-vlm is not installed here"
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_vlm.server", "--model", str(hf), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    try:
        proc = start(cmd, f"{base}/health", timeout)
    except RuntimeError as e:
        return f"mlx-vlm's server did not start: {e}"
    try:
        return [dict(drive(base, str(hf), reqs, c, max_tokens), system="mlx-vlm server")
                for c in CLIENTS]
    except Exception as e:  # a peer that fails is reported, not fatal
        return f"mlx-vlm's server failed: {type(e).__name__}: {e}"
    finally:
        proc.terminate()


def table(rows: list[dict]) -> str:
    lines = ["| server | clients | output tok/s | TTFT p50 (s) | TTFT p95 (s) | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['clients']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--model", default=None,
                   help="serve this checkpoint instead of the benchmark model (e.g. mm1-tiny)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--image-every", type=int, default=4, help="every N-th request has an image")
    p.add_argument("--serial-clients", default="4,16",
                   help="client counts for the one-at-a-time server (comma-separated)")
    p.add_argument("--max-concurrency", type=int, default=8, help="the batching server's limit")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--cache", default=None, help="where built checkpoints are kept")
    p.add_argument("--timeout", type=float, default=900)
    return p


def main(argv=None) -> dict:
    args = setup_arg_parser().parse_args(argv)
    import platformdirs

    cache = Path(args.cache) if args.cache else Path(platformdirs.user_cache_dir("mm1_mlx")) / "bench"
    hf = None
    if args.model:
        model = args.model
    else:
        from .run import prepare

        paths = prepare(args.size, cache, False, args.timeout)
        if isinstance(paths["mm1-mlx"], Exception):
            raise SystemExit(f"error: converting the benchmark model failed: {paths['mm1-mlx']}")
        model, hf = paths["mm1-mlx"], paths["hf"]
    image_dir = cache / "serve-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    reqs = workload(args.requests, image_dir, args.image_every)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(model),
               "requests": args.requests, "max_tokens": args.max_tokens,
               "image_every": args.image_every, "load_average_at_start": os.getloadavg(),
               "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save(new: list[dict]) -> None:  # after every setting: a long run keeps what it measured
        results["rows"] = rows + new
        (out / "serve.json").write_text(json.dumps(results, indent=2))
        (out / "serve.md").write_text(table(results["rows"]) + "\n")

    rows += run_mm1(model, f"mm1-mlx batched (--max-concurrency {args.max_concurrency})",
                    args.max_concurrency, CLIENTS, reqs, args.max_tokens, args.timeout, save)
    # one client is one request at a time for both servers: measured once, above
    serial = [int(c) for c in args.serial_clients.split(",") if c.strip()]
    rows += run_mm1(model, "mm1-mlx one at a time (--max-concurrency 1)", 1, serial, reqs,
                    args.max_tokens, args.timeout, save)
    peer = run_mlx_vlm(hf, reqs, args.max_tokens, args.timeout) if hf else "no HF checkpoint"
    if isinstance(peer, list):
        rows += peer
    else:
        results["mlx_vlm"] = peer
        log(peer)
    save([])
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
