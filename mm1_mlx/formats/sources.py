"""Reading a Hugging Face / OpenCLIP source: local directory or hub id, config and weight files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MM1Error
from ..io.validate import read_json as read_json_file

HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.pt", "*.jinja", "*.model", "*.txt",
                "*.tiktoken"]


def resolve(path_or_repo: str) -> Path:
    """A local directory (or weight file) or a Hugging Face hub id -> a local path."""
    local = Path(path_or_repo).expanduser()
    if local.exists():
        return local
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise MM1Error(f"{path_or_repo} is neither a local path nor a hub id of the form org/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise MM1Error(f"{path_or_repo} is not a local path and could not be fetched from the "
                       f"Hugging Face hub{offline}: {type(e).__name__}") from None


def read_json(path: Path, name: str) -> dict | None:
    f = path / name
    if not f.exists():
        return None
    return read_json_file(f)


def weight_files(path: Path) -> list[Path]:
    """The weight files of a source, preferring safetensors (an index names the shards)."""
    if path.is_file():
        return [path]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        idx = read_json(path, index)
        if idx is not None:
            names = sorted(set(idx.get("weight_map", {}).values()))
            missing = [n for n in names if not (path / n).exists()]
            if missing:
                raise MM1Error(f"{path / index} names missing shard(s): {', '.join(missing)}")
            return [path / n for n in names]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(p for p in path.glob(pattern) if not p.name.startswith("training_args"))
        if files:
            return files
    raise MM1Error(f"no weights (*.safetensors, *.bin, *.pt) in {path}")


def _read_safetensors(f: Path) -> dict:
    try:
        return mx.load(str(f))
    except Exception as e:
        raise MM1Error(f"cannot read {f} (truncated or corrupt safetensors?): "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _import_torch():
    """torch, needed only to read PyTorch pickles (.bin / .pt); safetensors need nothing."""
    try:
        import torch
    except ImportError:
        raise MM1Error("reading .bin/.pt weights needs PyTorch: pip install 'mm1-mlx[convert]' "
                       "(or use a safetensors checkpoint)") from None
    return torch


def _torch_to_mx(t) -> mx.array:
    torch = _import_torch()
    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(np.ascontiguousarray(t.numpy()))


def _is_pickle(f: Path) -> bool:
    """Whether ``f`` is a zip (torch's format) or parses as a pickle stream (random bytes do not):
    tells a refused pickle from a corrupt file."""
    import pickletools

    data = f.read_bytes()[:64 << 20]
    if data.startswith(b"PK"):
        return True
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception:
        return False
    return True


def _read_pickle(f: Path) -> dict:
    """A PyTorch pickle, loaded with weights_only=True: a file that would run code is refused."""
    torch = _import_torch()

    if not f.is_file():
        raise MM1Error(f"{f} is not a regular file")
    if f.stat().st_size == 0:
        raise MM1Error(f"{f} is empty (0 bytes), not a PyTorch weights file")
    try:
        obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError:
        if _is_pickle(f):
            raise MM1Error(f"refusing to load {f}: it is not a plain weights file and unpickling "
                           f"it could run code") from None
        raise MM1Error(f"{f} is not a PyTorch weights file (corrupt, truncated or not a "
                       "pickle)") from None
    except EOFError:
        raise MM1Error(f"{f} is truncated: not a complete PyTorch weights file") from None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MM1Error(f"cannot read {f} as PyTorch weights: {msg[:160]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MM1Error(f"{f} holds a {type(obj).__name__}, not a dict of tensors")
    return {k: _torch_to_mx(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_weights(path: Path) -> dict:
    """All tensors of a source as MLX arrays, keyed by their original names."""
    weights = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            weights.update(_read_safetensors(f))
        else:
            weights.update(_read_pickle(f))
    return weights
