"""The conversion cache: a foreign checkpoint is converted once, on first use, into
``<user cache>/mm1-mlx/converted/<name>-<key>`` (``MM1_MLX_CACHE`` overrides the root).

The key covers the source's identity and revision (a hub snapshot's path holds its commit; a
local directory's files are fingerprinted by name, size and modification time: hashing gigabytes
on every load would cost more than the load) and the conversion options. An entry appears only
complete (``checkpoint.save`` writes through ``atomic_dir``): an interrupted conversion leaves
nothing that loads.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("MM1_MLX_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mm1-mlx")) / "converted"


def fingerprint(src: Path) -> str:
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        st = f.stat()  # hub snapshots hold symlinks: this is the blob's
        h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def entry(name: str, src: Path, dtype: str | None, q_bits: int | None, q_group_size: int) -> Path:
    """The cache directory for ``src`` converted with these options."""
    options = f"{dtype or 'auto'}-{f'q{q_bits}g{q_group_size}' if q_bits else 'float'}"
    key = hashlib.sha256(f"{fingerprint(src)}\0{options}".encode()).hexdigest()[:16]
    local = Path(name).expanduser()
    base = local.resolve().name if local.exists() else name  # a hub id keeps its org
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", base).strip("-.") or "model"
    return cache_root() / f"{slug[-80:]}-{key}"
