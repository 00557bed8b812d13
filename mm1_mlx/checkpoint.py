"""Checkpoints: a directory with config.json, model*.safetensors, tokenizer and image settings.

Load order (as mlx-lm): config -> model -> quantize by recorded predicate -> load_weights(strict).
Saves are atomic: everything is written to a temporary sibling directory that is then renamed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import MM1Error
from .model import Model
from .processor import Processor

DEFAULT_MODEL = "mm1-tiny"
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHARD_BYTES = 5 << 30


def bundled_models() -> list[str]:
    return sorted(p.parent.name for p in WEIGHTS_DIR.glob("*/config.json"))


def resolve(path_or_repo: str | None = None) -> Path:
    """A local directory, a bundled model name, or a Hugging Face hub id -> local directory."""
    name = path_or_repo or DEFAULT_MODEL
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise MM1Error(f"{name} is not a model checkpoint (no config.json)")
        return local
    if (WEIGHTS_DIR / name / "config.json").exists():
        return WEIGHTS_DIR / name
    if local.exists():
        raise MM1Error(f"{name} is a file, not a model directory")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise MM1Error(f"model not found: {name} (not a directory, a bundled model "
                       f"({', '.join(bundled_models()) or 'none'}) or a hub id org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise MM1Error(f"model {name} is not a local directory and could not be fetched from the "
                       f"Hugging Face hub{offline}: {type(e).__name__}") from None


def read_config(path: Path) -> ModelConfig:
    try:
        with open(path / "config.json") as f:
            return ModelConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise MM1Error(f"bad config.json in {path}: {e}") from None


def read_weights(path: Path) -> dict:
    files = sorted(glob.glob(str(path / "model*.safetensors")))
    if not files:
        raise MM1Error(f"no model*.safetensors in {path}")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except Exception as e:
            raise MM1Error(f"cannot read {f}: {e}".splitlines()[0]) from None
    return weights


def quantize_model(model: nn.Module, quantization: dict) -> None:
    """Quantize the modules listed in ``quantization`` (see quantize.py for the format)."""
    from .quantize import apply_quantization

    apply_quantization(model, quantization)


def build(config: ModelConfig, weights: dict | None = None) -> Model:
    model = Model(config)
    if config.quantization:
        quantize_model(model, config.quantization)
    if weights is not None:
        weights = model.sanitize(weights)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise MM1Error(f"weights do not fit the config: {e}".replace("\n", " ")) from None
    return model


def available_memory() -> int | None:
    """Bytes the system can still hand out (Linux ``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fits_float32(model: nn.Module) -> bool:
    """Whether ``model`` holds half-precision parameters and a float32 copy of it would take at
    most half the available memory."""
    params = [p for _, p in tree_flatten(model.parameters())]
    if not any(p.dtype in (mx.float16, mx.bfloat16) for p in params):
        return False
    size = sum(p.size * (4 if mx.issubdtype(p.dtype, mx.floating) else p.itemsize) for p in params)
    free = available_memory()
    return free is not None and size <= free // 2


def load(path_or_repo: str | None = None, adapter_path: str | None = None,
         lazy: bool = False, compute_dtype: str | None = "auto") -> tuple[Model, Processor]:
    """Open a checkpoint (default: the bundled mm1-tiny). Returns (model in eval mode, processor).

    ``compute_dtype="auto"``: on the CPU, a quantized model's float parts (norms, biases, scales,
    the patch embedding) become float32, the CPU's fast type (half-precision convolutions and
    element-wise ops run several times slower there); they are a few percent of its size. A
    half-precision model becomes float32 too when that copy takes at most half the available
    memory (``fits_float32``): its products would convert every weight on every call, and decode
    could not use BLAS ``sgemv`` (the benchmark model: 2.7 tok/s in float16, 24 in float32; first
    token 6.0 s vs 2.3-2.8 s). ``None`` keeps the stored types (tools that write the model back,
    like fuse). On the CPU, loading also lets glibc keep freed memory for reuse
    (``backend.retain_freed_memory``) and, unless ``lazy``, packs each decoder layer's weights
    into one buffer (``cpu_step.pack_layers``); a quantized model gets ``cpu_quant``'s kernels
    ready."""
    from .backend import retain_freed_memory
    from .cpu import on_cpu
    from .cpu_step import pack_layers

    cpu = on_cpu()
    if cpu:
        retain_freed_memory()
    path = resolve(path_or_repo)
    config = read_config(path)
    model = build(config, read_weights(path))
    if compute_dtype == "auto" and cpu and (config.quantization or fits_float32(model)):
        model.set_dtype(mx.float32)
    if adapter_path is not None:
        from .adapters import load_adapters

        load_adapters(model, adapter_path)
    if cpu and config.quantization:
        from .cpu_quant import warm_up

        warm_up(model)  # compiled (first run on a machine) or read from the cache now, not at token 1
    if not lazy:
        if cpu:
            pack_layers(model.language_model)
        mx.eval(model.parameters())
    model.eval()
    return model, Processor.from_pretrained(str(path))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary dir
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_weights(directory: Path, weights: dict, metadata: dict | None = None) -> None:
    """model.safetensors, or shards of at most 5 GB with model.safetensors.index.json."""
    shards, cur, size = [], {}, 0
    for k, v in weights.items():
        if cur and size + v.nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    meta = {"format": "mlx", **(metadata or {})}
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], metadata=meta)
        return
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {}}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata=meta)
        index["weight_map"].update(dict.fromkeys(shard, name))
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)


def save(model: Model, processor: Processor, path: str | os.PathLike,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint directory atomically; ``extra_files`` maps names to existing files."""
    weights = dict(tree_flatten(model.parameters()))
    with atomic_dir(path) as tmp:
        save_weights(tmp, weights)
        with open(tmp / "config.json", "w") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        processor.save_pretrained(str(tmp))
        for name, src in (extra_files or {}).items():
            shutil.copy(src, tmp / name)
    return Path(path)
