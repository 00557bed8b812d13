"""Each measured system runs in its own process: its imports, threads and peak memory stay its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``python -m ARGS`` and return its ``RESULT`` JSON, or ``{"error": ...}``."""
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, **(env or {})},
                           cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = time.perf_counter() - t
            return out
    lines = [x for x in (p.stderr or p.stdout).strip().splitlines() if x.strip()]
    return {"error": lines[-1] if lines else f"exit code {p.returncode}"}
