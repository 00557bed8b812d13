"""mlx-vlm checkpoints (what mlx-community publishes) of LLaVA: float or quantized -> ours.

Their layout: the Hugging Face config.json plus ``"quantization": {"group_size", "bits", "mode",
<module path>: {...} | false}``, keys ``vision_tower.vision_model.*``,
``multi_modal_projector.linear_{1,2}.*``, ``language_model.model.*``, the patch embedding already
channels-last, and every quantized module stored as ``weight`` (packed uint32) + ``scales`` (+
``biases``). Which modules are quantized is read from the ``.scales`` present, not from the config
alone: older checkpoints quantized the vision tower without saying so per module, some with its
MLP width padded so the groups divide it.
"""

from __future__ import annotations

import mlx.core as mx
from tqdm import tqdm

from ..errors import MM1Error
from ..models.model import Model
from .assemble import DTYPES, llava_source, pad_vocab
from .preprocess import build_processor
from .sources import read_json
from .weights import convert_weights

PARTS = ("weight", "scales", "biases")
# modules our model reads as tables, never calls: a quantized copy is dequantized on the way in
READ_AS_TABLE = ("vision_tower.embeddings.position_embedding",)


def packed_modules(raw: dict) -> dict[str, dict]:
    """{module path: {"weight", "scales"[, "biases"]}} of every module stored quantized."""
    paths = [k[: -len(".scales")] for k in raw if k.endswith(".scales")]
    return {p: {n: raw[f"{p}.{n}"] for n in PARTS if f"{p}.{n}" in raw} for p in paths}


def module_spec(quantization: dict, path: str, packed: dict) -> dict:
    """bits / group size / mode of one module: its own entry in the config, else the defaults."""
    own = quantization.get(path)
    if not isinstance(own, dict):
        own = quantization.get(path.removeprefix("language_model."))
    spec = {k: v for k, v in quantization.items() if k in ("bits", "group_size", "mode")}
    spec.update({k: v for k, v in (own if isinstance(own, dict) else {}).items()
                 if k in ("bits", "group_size", "mode")})
    spec.setdefault("mode", "affine" if "biases" in packed else "mxfp4")
    if "bits" not in spec or "group_size" not in spec:
        raise MM1Error(f"{path} is stored quantized but config.json's quantization gives no "
                       f"bits / group_size for it")
    return spec


def stand_in(packed: dict, spec: dict) -> mx.array:
    """The module's float weight, lazily: only its shape is used, nothing is computed."""
    return mx.dequantize(packed["weight"], packed["scales"], packed.get("biases"),
                         group_size=spec["group_size"], bits=spec["bits"], mode=spec["mode"])


def fit_vision_width(config, raw: dict, packed: dict) -> None:
    """Older checkpoints padded the vision MLP width to a multiple of the group size (zero rows
    in fc1, zero columns in fc2: the same function); build the tower at the stored width."""
    for prefix in ("vision_tower.vision_model.", "vision_tower."):
        key = f"{prefix}encoder.layers.0.mlp.fc1"
        if key in packed:
            width = packed[key]["scales"].shape[0]
        elif f"{key}.weight" in raw:
            width = raw[f"{key}.weight"].shape[0]
        else:
            continue
        vc = config.vision_config
        vc.intermediate_size = max(vc.intermediate_size, width)
        return


def our_weights(raw: dict, config, quantization: dict) -> tuple[dict, dict]:
    """(weights under our names, {our module path: quantization spec}) of an mlx-vlm model."""
    packed = packed_modules(raw)
    specs = {p: module_spec(quantization, p, packed[p]) for p in packed}
    floats = {k: v for k, v in raw.items()
              if not any(k.startswith(f"{p}.") and k[len(p) + 1:] in PARTS for p in packed)}
    stand_ins = {p: stand_in(packed[p], specs[p]) for p in packed}
    # map the names (and check every shape) with the float converter, then put the packed
    # tensors back where each stand-in landed
    out = convert_weights({**floats, **{f"{p}.weight": w for p, w in stand_ins.items()}}, config)
    origin = {id(w): p for p, w in stand_ins.items()}
    modules = {}
    for key in [k for k, v in out.items() if id(v) in origin]:
        p, ours = origin[id(out[key])], key[: -len(".weight")]
        if ours in READ_AS_TABLE:
            continue  # keeps the dequantized stand-in
        modules[ours] = specs[p]
        out.update({f"{ours}.{n}": v for n, v in packed[p].items()})
    return out, dict(sorted(modules.items()))


def convert_mlx_vlm(path, dtype: str | None = None, q_bits: int | None = None,
                    q_group_size: int = 64):
    """An mlx-vlm LLaVA directory -> (our model, processor): quantized modules kept bit for bit;
    ``dtype`` casts the float parameters, ``q_bits`` quantizes a float model."""
    src = llava_source(path)
    config, raw = src.model, src.weights
    quantization = (read_json(path, "config.json") or {}).get("quantization") or {}
    fit_vision_width(config, raw, packed_modules(raw))
    weights, modules = our_weights(raw, config, quantization)
    del raw
    if modules and q_bits:
        raise MM1Error(f"{path} is already quantized; -q needs a float checkpoint")
    if config.image_token_id >= config.text_config.vocab_size:
        if modules:
            raise MM1Error(f"the tokenizer's <image> id {config.image_token_id} is outside the "
                           f"quantized vocabulary ({config.text_config.vocab_size})")
        config.text_config.vocab_size = config.image_token_id + 1
        weights = pad_vocab(weights, config.text_config.vocab_size)
    config.quantization = _record(quantization, modules) if modules else None
    model = Model(config)
    if modules:
        from ..models.quantization import apply_quantization

        apply_quantization(model, config.quantization)
    target = DTYPES[dtype] if dtype else None
    for k in tqdm(list(weights), desc="converting", unit="tensor", leave=False):
        v = weights[k]
        if target is not None and mx.issubdtype(v.dtype, mx.floating):
            weights[k] = v.astype(target)
        mx.eval(weights[k])
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MM1Error(f"{path}: weights do not fit the config: {e}".replace("\n", " ")) from None
    del weights
    if q_bits:
        from ..models.quantization import quantize_model

        quantize_model(model, bits=q_bits, group_size=q_group_size)
    model.eval()
    return model, build_processor(src.tokenizer, src.image_settings, config.num_image_tokens)


def _record(source: dict, modules: dict) -> dict:
    """Our per-module quantization record (quantize.py's format) for the modules kept packed."""
    first = next(iter(modules.values()))
    return {"bits": source.get("bits", first["bits"]),
            "group_size": source.get("group_size", first["group_size"]),
            "mode": source.get("mode", first["mode"]), "recipe": None, "source": "mlx-vlm",
            "modules": modules, "skipped": {}}
