"""Checkpoints: a directory with config.json, model*.safetensors, tokenizer and image settings.

``load`` / ``resolve`` also take Hugging Face transformers and mlx-community checkpoints (local or
hub ids): ``formats/`` converts them once into a cache and they load from there.

Load order (as mlx-lm): config -> model -> quantize by recorded predicate -> load_weights(strict).
Saves are atomic and never replace what the user has: see ``atomic.py`` (``atomic_dir`` lives
there and is re-exported here).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MM1Error
from .io.atomic import atomic_dir, recover_if_interrupted
from .io.materialize import materialize
from .io.validate import check_dtypes, read_json
from .models.config import ModelConfig, VisionConfig
from .models.model import Model
from .models.quantization import apply_quantization
from .processor import Processor

DEFAULT_MODEL = "mm1-tiny"
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHARD_BYTES = 5 << 30


def bundled_models() -> list[str]:
    return sorted(p.parent.name for p in WEIGHTS_DIR.glob("*/config.json"))


def resolve(path_or_repo: str | None = None, dtype: str | None = None, q_bits: int | None = None,
            q_group_size: int = 64) -> Path:
    """A local directory, a bundled model name, or a Hugging Face hub id -> local mm1-mlx checkpoint.

    A Hugging Face transformers or mlx-vlm (mlx-community) checkpoint is converted on first use
    into the cache (``formats/cache.py``) with ``dtype`` / ``q_bits`` as ``python -m convert``
    takes them, and later calls return the cached conversion."""
    name = path_or_repo or DEFAULT_MODEL
    local = Path(name).expanduser()
    recover_if_interrupted(local)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise MM1Error(f"{name} is not a model checkpoint (no config.json)")
        src = local
    elif (WEIGHTS_DIR / name / "config.json").exists():
        src = WEIGHTS_DIR / name
    elif local.exists():
        raise MM1Error(f"{name} is a file, not a model directory")
    elif name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise MM1Error(f"model not found: {name} (not a directory, a bundled model "
                       f"({', '.join(bundled_models()) or 'none'}) or a hub id org/name)")
    else:
        from .formats.hub import fetch

        src = fetch(name)
    from .formats.families import NATIVE, check_supported
    from .formats.sources import read_json

    if check_supported(read_json(src, "config.json") or {}, name) != NATIVE:
        return converted(name, src, dtype, q_bits, q_group_size)
    if dtype or q_bits:
        raise MM1Error(f"{name} is already an mm1-mlx checkpoint: --dtype / -q apply when "
                       f"converting one (use python -m mm1_mlx.quantize to quantize it)")
    return src


def converted(name: str, src: Path, dtype: str | None = None, q_bits: int | None = None,
              q_group_size: int = 64) -> Path:
    """The cached conversion of the foreign checkpoint ``src`` (``name`` as the user gave it),
    converted and saved (atomically) first if the cache has no complete entry."""
    from .formats.cache import entry
    from .formats.families import convert_checkpoint

    out = entry(name, src, dtype, q_bits, q_group_size)
    if (out / "config.json").exists():
        return out
    print(f"converting {name} for mm1-mlx into {out} (first use only)", file=sys.stderr)
    model, processor = convert_checkpoint(src, dtype, q_bits, q_group_size)
    return save(model, processor, out)


def read_config(path: Path) -> ModelConfig:
    """config.json, every field checked by type and range before anything is built."""
    return ModelConfig.from_dict(read_json(path / "config.json"), str(path / "config.json"))


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


def check_size(config: ModelConfig, path: Path) -> None:
    """Refuse a config that describes a model far larger than its weight files, before the
    (lazy) model and its Python objects are built."""
    tc, vc = config.text_config, config.vision_config
    moe_layers = tc.num_hidden_layers // tc.moe_every if tc.num_experts else 0
    attn = tc.hidden_size * tc.head_dim * (tc.num_attention_heads + 2 * tc.num_key_value_heads)
    n = tc.num_hidden_layers * 2 * attn + 3 * tc.hidden_size * (
        (tc.num_hidden_layers - moe_layers) * tc.intermediate_size
        + moe_layers * tc.num_experts * tc.moe_intermediate_size)
    if isinstance(vc, VisionConfig):  # a ViT (other encoders: only the decoder is estimated)
        n += vc.num_hidden_layers * (4 * vc.hidden_size ** 2 + 2 * vc.hidden_size *
                                     vc.intermediate_size)
    on_disk = sum(os.path.getsize(f) for f in glob.glob(str(path / "model*.safetensors")))
    if n > 16 * on_disk + (1 << 24):
        raise MM1Error(f"{path / 'config.json'} describes a model of ~{n / 1e9:.3g} billion "
                       f"weights but its weight files hold {on_disk / 1e6:.1f} MB; the config "
                       "does not belong to these weights")


def build(config: ModelConfig, weights: dict | None = None) -> Model:
    model = Model(config)
    if config.quantization:
        apply_quantization(model, config.quantization)  # the recorded modules, as saved
    if weights is not None:
        weights = model.sanitize(weights)
        check_dtypes(model, weights)
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
         lazy: bool = False, compute_dtype: str | None = "auto", dtype: str | None = None,
         q_bits: int | None = None, q_group_size: int = 64, progress: bool = False
         ) -> tuple[Model, Processor]:
    """Open a checkpoint (default: the bundled mm1-tiny). Returns (model in eval mode, processor).

    ``path_or_repo`` is anything ``resolve`` takes: our checkpoints, and Hugging Face
    transformers or mlx-community checkpoints (local or hub ids), converted once into a cache
    (``dtype``, ``q_bits``, ``q_group_size``: the conversion's, as ``python -m convert``'s).

    ``compute_dtype="auto"``: on the CPU, a quantized model's float parts (norms, biases, scales,
    the patch embedding) become float32, the CPU's fast type (half-precision convolutions and
    element-wise ops run several times slower there); they are a few percent of its size. A
    half-precision model becomes float32 too when that copy takes at most half the available
    memory (``fits_float32``): its products would convert every weight on every call, and decode
    could not use BLAS ``sgemv`` (the benchmark model: 2.7 tok/s in float16, 24 in float32; first
    token 6.0 s vs 2.3-2.8 s). ``None`` keeps the stored types (tools that write the model back,
    like fuse). On the CPU, loading also lets glibc keep freed memory for reuse
    (``backend.retain_freed_memory``) and, unless ``lazy``, packs each decoder layer's weights
    into one buffer (``cpu.step.pack_layer``) and prepares the decode step
    (``cpu.step.decode_step``); a quantized model gets ``cpu.quant``'s kernels ready.
    ``progress``: a bar on stderr while a checkpoint of a gigabyte or more is read."""
    from .cpu.blas import retain_freed_memory
    from .cpu.ops import on_cpu

    cpu = on_cpu()
    if cpu:
        retain_freed_memory()
    path = resolve(path_or_repo, dtype, q_bits, q_group_size)
    config = read_config(path)
    check_size(config, path)
    processor = Processor.from_pretrained(str(path))
    check_processor(config, processor, path)
    model = build(config, read_weights(path))
    if compute_dtype == "auto" and cpu and (config.quantization or fits_float32(model)):
        model.set_dtype(mx.float32)
    if adapter_path is not None:
        from .tuner.adapters import load_adapters

        load_adapters(model, adapter_path, processor)  # the processor: the adapter's image size
    if cpu:
        from .cpu.quant import warm_up

        warm_up(model)  # compiled (first run on a machine) or read from the cache now, not at token 1
    if not lazy:
        nbytes = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
        materialize(model, cpu, progress, nbytes)
    model.eval()
    if cpu and not lazy:
        from .cpu.step import decode_step

        decode_step(model.language_model)  # prepared now (again only if the layers change)
    return model, processor


def check_processor(config: ModelConfig, processor: Processor, path: Path) -> None:
    """The image settings must fit the model: its image tokens, whole patches, its <image> id."""
    where = path / "preprocessor_config.json"
    if processor.num_image_tokens != config.num_image_tokens:
        raise MM1Error(f"{where}: num_image_tokens = {processor.num_image_tokens}: must be the "
                       f"model's {config.num_image_tokens}")
    if processor.image.image_size % config.vision_config.patch_size:
        raise MM1Error(f"{where}: image_size = {processor.image.image_size}: must be a multiple "
                       f"of the encoder's patch size {config.vision_config.patch_size}")
    if processor.image_token_id != config.image_token_id:
        raise MM1Error(f"the tokenizer's {processor.image_token} id {processor.image_token_id} "
                       f"is not config.json's image_token_id {config.image_token_id}")


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
         extra_files: dict[str, str] | None = None, inputs=(), force: bool = False,
         flag: str = "--out", allow_package: bool = False) -> Path:
    """Write a checkpoint directory atomically; ``extra_files`` maps names to existing files.
    ``path`` must be new or empty, or (with ``force``) a checkpoint; never one of ``inputs``."""
    weights = dict(tree_flatten(model.parameters()))
    with atomic_dir(path, "checkpoint", inputs, force, flag, allow_package) as tmp:
        save_weights(tmp, weights)
        with open(tmp / "config.json", "w") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        processor.save_pretrained(str(tmp))
        for name, src in (extra_files or {}).items():
            shutil.copy(src, tmp / name)
    return Path(path)
