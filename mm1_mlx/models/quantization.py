"""Quantizing MM1 checkpoints: 4/8-bit decoder (dense and MoE experts), optional encoder/connector.

The recorded format (``config.json`` ``quantization``) lists every quantized module with its own
settings, so loading rebuilds exactly what was saved::

    {"bits": 4, "group_size": 64, "mode": "affine", "recipe": null, "vision_bits": 16,
     "connector_bits": 16,
     "modules": {"language_model.model.layers.0.self_attn.q_proj":
                 {"bits": 4, "group_size": 64, "mode": "affine"}, ...},
     "skipped": {"<path>": "input dim 100 not divisible by group size 64", ...}}

Only ``modules`` drives the rebuild; the other keys document how the checkpoint was made. Linear,
Embedding and mlx-lm's SwitchLinear (expert stacks, gather_qmm) quantize; convolutions never do.

The command line that quantizes a checkpoint and reports its quality is ``mm1_mlx/quantize.py``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from ..cpu.ops import Linear
from ..errors import MM1Error

RECIPES = ["mixed_4_8"]
MODES = {"affine": ({2, 3, 4, 5, 6, 8}, {32, 64, 128}), "mxfp4": ({4}, {32})}
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
DECODER, VISION, CONNECTOR = "language_model.", "vision_tower.", "connector."
ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")  # MoE routers keep 8 bits, as in mlx-lm's MoEs


def is_quantized(model: nn.Module) -> bool:
    if getattr(getattr(model, "config", None), "quantization", None):
        return True
    return any(isinstance(m, QUANTIZED) for _, m in model.named_modules())


def check_settings(bits: int, group_size: int, mode: str, vision_bits: int, connector_bits: int,
                    recipe: str | None) -> None:
    if mode not in MODES:
        raise MM1Error(f"unknown quantization mode {mode!r}; choose from {sorted(MODES)}")
    ok_bits, ok_groups = MODES[mode]
    if bits not in ok_bits or group_size not in ok_groups:
        raise MM1Error(f"{mode} quantization takes bits {sorted(ok_bits)} and group size "
                       f"{sorted(ok_groups)}, got bits {bits} and group size {group_size}")
    if vision_bits not in (16, 8, 4):
        raise MM1Error(f"vision bits must be 16, 8 or 4, got {vision_bits}")
    if connector_bits not in (16, 8):
        raise MM1Error(f"connector bits must be 16 or 8, got {connector_bits}")
    if recipe is not None and recipe not in RECIPES:
        raise MM1Error(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    if recipe is not None and mode != "affine":
        raise MM1Error(f"recipe {recipe} needs affine mode, got {mode}")


def _layer_index(path: str) -> int | None:
    parts = path.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        if i < len(parts) and parts[i].isdigit():
            return int(parts[i])
    return None


def mixed_4_8_bits(path: str, num_layers: int, tied: bool) -> int:
    """8 bits where quantization hurts most (as mlx-lm's mixed recipes, llama.cpp Q4_K_M)."""
    if path.endswith("lm_head") or (tied and path.endswith("embed_tokens")):
        return 8
    i = _layer_index(path)
    if i is None or not path.endswith(("v_proj", "down_proj")):
        return 4
    n8 = num_layers // 8
    more = i < n8 or i >= 7 * num_layers // 8 or (i - n8) % 3 == 2
    return 8 if more else 4


def plan(model: nn.Module, bits: int = 4, group_size: int = 64, mode: str = "affine",
         vision_bits: int = 16, connector_bits: int = 16, recipe: str | None = None
         ) -> tuple[dict, dict]:
    """(modules to quantize -> settings, skipped modules -> reason) for a float model."""

    def spec(b: int) -> dict:  # 8-bit side modules under mxfp4 use affine: mxfp4 is 4-bit only
        return {"bits": b, "group_size": group_size, "mode": mode if b == bits else "affine"}

    args = model.config.text_config
    modules, skipped = {}, {}
    for path, m in model.named_modules():
        if path.startswith(DECODER) and isinstance(m, (nn.Linear, nn.Embedding, SwitchLinear)):
            if path.endswith(ROUTERS):
                b = 8
            elif recipe == "mixed_4_8":
                b = mixed_4_8_bits(path, args.num_hidden_layers, args.tie_word_embeddings)
            else:
                b = bits
        elif path.startswith(VISION) and isinstance(m, nn.Linear) and vision_bits < 16:
            b = vision_bits  # Linear only: the position table is read directly, not called
        elif path.startswith(CONNECTOR) and isinstance(m, nn.Linear) and connector_bits < 16:
            b = connector_bits
        else:
            continue
        s = spec(b)
        dim = m.weight.shape[-1]
        if dim % s["group_size"]:
            skipped[path] = f"input dim {dim} not divisible by group size {s['group_size']}"
        else:
            modules[path] = s
    return dict(sorted(modules.items())), dict(sorted(skipped.items()))


def apply_quantization(model: nn.Module, quantization: dict) -> None:
    """Replace exactly the modules listed in ``quantization["modules"]`` by quantized ones."""
    modules = quantization.get("modules")
    if not isinstance(modules, dict):
        raise MM1Error("config.json quantization has no per-module 'modules' record")
    seen = set()

    def predicate(path: str, m: nn.Module):
        if path not in modules:
            return False
        if not hasattr(m, "to_quantized"):
            raise MM1Error(f"quantization lists {path}, a {type(m).__name__}: not quantizable")
        seen.add(path)
        return dict(modules[path])

    nn.quantize(model, class_predicate=predicate)
    missing = sorted(set(modules) - seen)
    if missing:
        raise MM1Error(f"quantization lists {len(missing)} modules the model does not have: "
                       f"{', '.join(missing[:3])}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, mode: str = "affine",
                   vision_bits: int = 16, connector_bits: int = 16, recipe: str | None = None
                   ) -> dict:
    """Quantize ``model`` in place (float weights -> float16 first, so scales are float16).

    Returns the recorded quantization dict, also set as ``model.config.quantization``.
    """
    if is_quantized(model):
        raise MM1Error("the model is already quantized; dequantize it first (--dequantize)")
    check_settings(bits, group_size, mode, vision_bits, connector_bits, recipe)
    modules, skipped = plan(model, bits, group_size, mode, vision_bits, connector_bits, recipe)
    if not modules:
        raise MM1Error(f"no layer can be quantized with group size {group_size}")
    model.set_dtype(mx.float16)
    quantization = {"bits": bits, "group_size": group_size, "mode": mode, "recipe": recipe,
                    "vision_bits": vision_bits, "connector_bits": connector_bits,
                    "modules": modules, "skipped": skipped}
    apply_quantization(model, quantization)
    model.config.quantization = quantization
    return quantization


def dequantize_model(model: nn.Module, dtype: mx.Dtype | None = None) -> nn.Module:
    """Quantized layers -> float layers holding ``mx.dequantize`` of their weights (in place).

    The weights come out in the scales' dtype (float16); ``dtype`` casts every float parameter
    (float32 for MoE models on Linux CPU, whose gather_mm takes only float32).
    """
    if not is_quantized(model):
        raise MM1Error("the model is not quantized")
    layers = []
    for path, m in model.named_modules():
        if not isinstance(m, QUANTIZED):
            continue
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
        has_bias = "bias" in m
        if isinstance(m, nn.QuantizedEmbedding):
            f = nn.Embedding(*w.shape)
        elif isinstance(m, QuantizedSwitchLinear):
            f = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias=has_bias)
        else:
            f = Linear(w.shape[1], w.shape[0], bias=has_bias)
        f.weight = w
        if has_bias:
            f.bias = m.bias
        layers.append((path, f))
    model.update_modules(tree_unflatten(layers))
    if dtype is not None:
        model.set_dtype(dtype)
    model.config.quantization = None
    return model


# ---- measuring ----

def weight_stats(model: nn.Module, prefix: str = "") -> tuple[int, int]:
    """(bytes held, number of logical weights) of the parameters under ``prefix``."""
    nbytes = nweights = 0
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not path.startswith(prefix):
            continue
        params = tree_flatten(m.parameters())
        nbytes += sum(v.nbytes for _, v in params)
        if isinstance(m, QUANTIZED):
            nweights += m.weight.size * 32 // m.bits + (m.bias.size if "bias" in m else 0)
        else:
            nweights += sum(v.size for _, v in params)
    return nbytes, nweights


def bits_per_weight(model: nn.Module, prefix: str = "") -> float:
    nbytes, n = weight_stats(model, prefix)
    return 8 * nbytes / n if n else 0.0
