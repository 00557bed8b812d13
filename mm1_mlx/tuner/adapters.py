"""LoRA adapters on the decoder and a ViT image encoder (mlx-lm's LoRA layers), saved and loaded as
a small directory.

An adapter directory holds ``adapters.safetensors`` (the LoRA matrices, plus the whole connector when
it was trained) and ``adapter_config.json``, which records the LoRA settings, the image size it was
trained at (the model then runs at that size with it) and the base model's identity: its name and a
hash of its architecture (every config field except the name and the quantization, so an adapter
trained on a 4-bit base also loads on its float original and back).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..cpu.ops import as_fast
from ..errors import MM1Error
from ..io import atomic

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
# decoder-layer modules that get LoRA: attention, dense MLP, MoE expert stacks, shared expert
# (not the MoE router `mlp.gate`: a low-rank change there reshuffles experts for little gain)
LORA_KEYS = [f"self_attn.{p}_proj" for p in "qkvo"] + [
    f"mlp.{pre}{p}_proj" for pre in ("", "switch_mlp.", "shared_expert.") for p in ("gate", "up",
                                                                                  "down")]
LORA_TYPES = (LoRALinear, LoRASwitchLinear)
# image-encoder (ViT) layer modules that get LoRA when ``vision_layers`` is not 0
VISION_LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "mlp.fc1", "mlp.fc2", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# the ViT's input side, trained whole with ``train_vision_embeddings``: patch, position and class
# embeddings and the norm after them (what turns pixels into tokens: LoRA never reaches it)
VISION_EMBEDDINGS = ("vision_tower.embeddings.", "vision_tower.pre_layrnorm.")
# names an adapter file may hold besides LoRA matrices: whole trained parts of the model
WHOLE_PARTS = ("connector.",) + VISION_EMBEDDINGS
# connectors whose number of image tokens does not depend on the encoder's patch grid
FIXED_TOKEN_CONNECTORS = ("c-abstractor", "avg-pool", "attention-pool")


def base_identity(config) -> dict:
    """The base model's name and a hash of its architecture (quantization excluded)."""
    arch = {k: v for k, v in config.to_dict().items() if k not in ("name", "quantization")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": config.name, "config_hash": digest}


def lora_config(rank: int, alpha: float, dropout: float, num_layers: int, keys: list[str],
                vision_layers: int = 0) -> dict:
    """mlx-lm's ``lora_parameters``; ``scale`` = alpha / rank as in the LoRA paper;
    ``vision_layers``: LoRA on the last N image-encoder layers too (-1 = all, 0 = none)."""
    return {"rank": rank, "alpha": alpha, "scale": alpha / rank, "dropout": dropout,
            "keys": keys, "num_layers": num_layers, "vision_layers": vision_layers}


def apply_lora(model: nn.Module, params: dict) -> list[str]:
    """Wrap the listed projections of the last ``num_layers`` decoder layers (-1 = all).

    Returns the wrapped modules' paths. Quantized bases (QuantizedLinear / QuantizedSwitchLinear)
    are wrapped as they are: QLoRA.
    """
    if any(isinstance(m, LORA_TYPES) for _, m in model.named_modules()):
        raise MM1Error("the model already has LoRA layers (an adapter is loaded)")
    layers = model.language_model.layers
    n = params["num_layers"]
    n = len(layers) if n < 0 else n
    if not 0 < n <= len(layers):
        raise MM1Error(f"--lora-layers must be -1 or 1..{len(layers)}, got {params['num_layers']}")
    present = {k for layer in layers for k, _ in layer.named_modules()}
    keys = [k for k in params["keys"] if k in present]
    if not keys:
        raise MM1Error(f"none of the LoRA target modules {params['keys']} is in the decoder")
    linear_to_lora_layers(model, n, dict(params, keys=keys))
    if params.get("vision_layers", 0):
        apply_vision_lora(model, params)
    return [p for p, m in model.named_modules() if isinstance(m, LORA_TYPES)]


def vision_layers(model: nn.Module) -> list:
    """The image encoder's transformer layers ([] for an encoder without them, e.g. FastViT)."""
    encoder = model.vision_tower.get("encoder")
    return list(getattr(encoder, "layers", []))


def lora_vision_layers(model: nn.Module) -> int:
    """How many image-encoder layers hold LoRA layers."""
    return sum(any(isinstance(m, LORA_TYPES) for _, m in layer.named_modules())
               for layer in vision_layers(model))


def apply_vision_lora(model: nn.Module, params: dict) -> None:
    """LoRA (same rank and scale) on the attention and MLP of the last ``vision_layers`` ViT
    layers: an encoder never trained on a new shape or colour may not tell it apart."""
    layers, n = vision_layers(model), params["vision_layers"]
    if not layers:
        raise MM1Error("LoRA on the image encoder needs a ViT encoder (this one has no layers)")
    n = len(layers) if n < 0 else n
    if not 0 < n <= len(layers):
        raise MM1Error(f"vision_layers must be -1 or 1..{len(layers)}, got {params['vision_layers']}")
    present = {k for layer in layers for k, _ in layer.named_modules()}
    keys = [k for k in VISION_LORA_KEYS if k in present]
    linear_to_lora_layers(model.vision_tower.encoder, n, dict(params, keys=keys))


def unfreeze_vision_embeddings(model: nn.Module) -> None:
    """Train the ViT's embeddings and pre-norm whole (float ones only: a quantized position
    embedding cannot be trained)."""
    from ..models.quantization import QUANTIZED

    vt = model.vision_tower
    parts = [vt.embeddings] + ([vt.pre_layrnorm] if "pre_layrnorm" in vt else [])
    if any(isinstance(m, QUANTIZED) for part in parts for _, m in part.named_modules()):
        raise MM1Error("--train-vision-embeddings needs float image-encoder embeddings; these "
                       "are quantized (--no-train-vision-embeddings)")
    for part in parts:
        part.unfreeze()


def is_lora(name: str) -> bool:
    """Whether a parameter path names a LoRA matrix (else a whole trained weight)."""
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def trainable_weights(model: nn.Module) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def write_adapters(directory: Path, model: nn.Module, config: dict) -> None:
    """adapters.safetensors (trainable parameters) + adapter_config.json into ``directory``."""
    mx.save_safetensors(str(directory / ADAPTERS_FILE), trainable_weights(model),
                        metadata={"format": "mlx"})
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)


def adapter_config(model: nn.Module, params: dict, train_connector: bool,
                   train_vision_embeddings: bool = False, image_size: int | None = None) -> dict:
    config = {"fine_tune_type": "lora", "num_layers": params["num_layers"],
              "lora_parameters": params, "train_connector": train_connector,
              "train_vision_embeddings": train_vision_embeddings,
              "base_model": base_identity(model.config)}
    if image_size is not None:
        config["image_size"] = image_size
    return config


def finetune_image_size(processor) -> int:
    """The size adapters train at by default: the model's ``finetune_image_size`` (a checkpoint
    whose native size is too coarse for new details can name a larger one), else its own."""
    return processor.image.finetune_image_size or processor.image.image_size


def set_image_size(model: nn.Module, processor, size: int, what: str = "--image-size") -> None:
    """Run the image encoder at ``size`` px from now on (the processor's size). Another size than
    the model's own needs a ViT (its position embeddings are interpolated to the new patch grid)
    and a connector with a fixed number of image tokens (C-Abstractor, average or attention
    pooling): with one token per patch the prompt's image tokens would change. ``size`` comes
    checked (1-8192) from ``TrainingArgs.check`` or ``check_config``."""
    vc, own = model.config.vision_config, processor.image.image_size
    patch = vc.patch_size
    if size == own:
        return
    if not vision_layers(model) or not isinstance(patch, int):
        raise MM1Error(f"{what} {size}: this model's image encoder runs only at {own} px")
    if model.config.connector_config.type not in FIXED_TOKEN_CONNECTORS:
        raise MM1Error(f"{what} {size}: the {model.config.connector_config.type} connector makes "
                       f"one image token per patch; this model runs only at {own} px")
    if size % patch:
        raise MM1Error(f"{what} must be a multiple of the encoder's patch size {patch}, got {size}")
    processor.image.image_size = size


def read_config(path: Path) -> dict:
    """adapter_config.json, checked field by field (type and range)."""
    f = path / CONFIG_FILE
    try:
        with open(f, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise MM1Error(f"{path} is not an adapter directory (no {CONFIG_FILE})") from None
    except (ValueError, RecursionError) as e:  # bad JSON, not UTF-8
        raise MM1Error(f"bad {CONFIG_FILE} in {path}: {str(e)[:200]}") from None
    check_config(config, f)
    return config


def check_config(config, f: Path) -> None:
    """The fields ``load_adapters`` uses: lora_parameters (rank, scale, dropout, keys,
    num_layers), train_connector, base_model."""
    from ..io.validate import check_fields, need

    need(isinstance(config, dict), f, "", config, "a JSON object")
    params = config.get("lora_parameters")
    need(isinstance(params, dict), f, "lora_parameters", params, "an object")
    check_fields(params, f, "lora_parameters", {
        "rank": (int, 1, 4096), "scale": (float, -1e6, 1e6), "dropout": (float, 0.0, 0.999),
        "num_layers": (int, -1, 10**6), "keys": (list, None, None)})
    if "vision_layers" in params:
        check_fields(params, f, "lora_parameters", {"vision_layers": (int, -1, 10**6)})
    need(all(isinstance(k, str) for k in params["keys"]) and params["keys"], f,
         "lora_parameters.keys", params["keys"], "a non-empty list of module names")
    need(params["num_layers"] != 0, f, "lora_parameters.num_layers", 0, "-1 (all) or >= 1")
    for key in ("train_connector", "train_vision_embeddings"):
        need(isinstance(config.get(key, False), bool), f, key, config.get(key), "true or false")
    if "image_size" in config:
        check_fields(config, f, "", {"image_size": (int, 1, 8192)})
    need(isinstance(config.get("base_model") or {}, dict), f, "base_model",
         config.get("base_model"), "an object")


def check_base(model: nn.Module, config: dict, path: Path) -> None:
    want, have = config.get("base_model") or {}, base_identity(model.config)
    if want != have:
        raise MM1Error(f"adapter {path} was trained on {want.get('name')} "
                       f"(config {want.get('config_hash')}), not on this model {have['name']} "
                       f"(config {have['config_hash']})")


def load_adapters(model: nn.Module, adapter_path: str | os.PathLike, processor=None) -> nn.Module:
    """Add the adapter's LoRA layers to ``model`` (unfused) and load its weights; ``processor``
    then prepares images at the size the adapter was trained at."""
    path = Path(adapter_path).expanduser()
    if not path.is_dir():
        raise MM1Error(f"adapter directory not found: {path}")
    config = read_config(path)
    check_base(model, config, path)
    if not (path / ADAPTERS_FILE).exists():
        raise MM1Error(f"{path} has no {ADAPTERS_FILE}")
    try:
        weights = mx.load(str(path / ADAPTERS_FILE))
    except Exception as e:
        raise MM1Error(f"cannot read {path / ADAPTERS_FILE}: {e}".splitlines()[0]) from None
    apply_lora(model, config["lora_parameters"])
    params = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        ok = is_lora(name) or name.startswith(WHOLE_PARTS)
        if not ok or name not in params:
            raise MM1Error(f"adapter {path} holds {name}, which this model does not have")
        if w.shape != params[name].shape:
            raise MM1Error(f"adapter {path}: {name} has shape {tuple(w.shape)}, the model "
                           f"{tuple(params[name].shape)}")
    model.load_weights(list(weights.items()), strict=False)
    if processor is not None and "image_size" in config:
        set_image_size(model, processor, config["image_size"], f"{path / CONFIG_FILE} image_size")
    return model


def fuse_lora(model: nn.Module, dequantize: bool = False) -> int:
    """Merge every LoRA layer into its base (re-quantized with the base's settings unless
    ``dequantize``), as our layer classes (the CPU decode step reads them). Returns the number of
    layers fused."""
    fused = [(p, as_fast(m.fuse(dequantize=dequantize))) for p, m in model.named_modules()
             if isinstance(m, LORA_TYPES)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def recover(path: str | os.PathLike) -> bool:
    """Restore the last complete save after a kill between the renames of a fallback swap
    (see ``atomic.recover``); takes the output lock."""
    with atomic.output_lock(path):
        return atomic.recover(path)


def save_dir(path: str | os.PathLike, inputs=(), force: bool = False):
    """``atomic_dir`` for an adapter directory: a new path, an empty directory, or (with
    ``force``) an adapter directory; never one of ``inputs``."""
    return atomic.atomic_dir(path, "adapter", inputs, force, flag="--adapter-path")
