"""The conversion pipeline: sources -> config + converted weights -> model and processor (which
``python -m convert`` and ``load``'s cache then save)."""

from __future__ import annotations

import copy
import dataclasses
import glob
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from ..errors import MM1Error
from ..io.materialize import materialize
from ..io.validate import check_dtypes
from ..models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from ..models.model import Model
from . import aimv2, configs, fastvlm, honeybee, preprocess
from .sources import read_json, read_weights, resolve, weight_files
from .weights import convert_weights, upcycle_experts

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclasses.dataclass
class Source:
    """What one input contributes: config, raw tensors (under our top-level prefix), tokenizer."""

    weights: dict
    vision: VisionConfig | None = None
    text: TextConfig | None = None
    model: ModelConfig | None = None
    tokenizer: object = None
    image_settings: object = None
    dtype: str | None = None


def source_dtype(cfg: dict) -> str | None:
    for c in (cfg, cfg.get("text_config") or {}):
        d = c.get("dtype") or c.get("torch_dtype")
        if d in DTYPES:
            return d
    return None


def model_config_json(path: Path) -> dict:
    cfg = read_json(path, "config.json")
    if cfg is None:
        raise MM1Error(f"{path} has no config.json")
    if not isinstance(cfg, dict):
        raise MM1Error(f"{path / 'config.json'} holds a {type(cfg).__name__}, not an object")
    return cfg


def parsed(fn, path: Path, *args):
    """``fn(*args)`` on a source's config dicts; a missing or mistyped field -> one line."""
    try:
        return fn(*args)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:160]
        raise MM1Error(f"bad config.json in {path}: {what}") from None


def llava_source(path: Path) -> Source:
    cfg = model_config_json(path)
    if cfg.get("model_type") != "llava":
        raise MM1Error(f"--hf-path expects a LLaVA model (model_type 'llava'), {path} is "
                       f"{cfg.get('model_type')!r}; build other models with --vision and --text")
    parsed(configs.llava_config, path, cfg, 0).check(str(path / "config.json"))  # before the tokenizer
    tok = preprocess.load_tokenizer(path)
    tok_id = preprocess.image_token_id(tok)
    cfg_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    if cfg_id is not None and cfg_id != tok_id:
        raise MM1Error(f"the model's image_token_index {cfg_id} is not the tokenizer's <image> "
                       f"id {tok_id}")
    config = parsed(configs.llava_config, path, cfg, tok_id)
    settings = preprocess.image_settings(path, config.vision_config)
    return Source(read_weights(path), model=config, tokenizer=tok, image_settings=settings,
                  dtype=source_dtype(cfg))


def hf_source(path: Path) -> Source:
    """A whole model: Honeybee's or FastVLM's layout, else LLaVA's."""
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise MM1Error(f"{path} is an archive (as Honeybee's checkpoints ship): extract it "
                       f"(tar xzf {path.name}) and give the directory")
    cfg = model_config_json(path)
    if honeybee.is_honeybee(cfg):
        return Source(**honeybee.honeybee_source(path, cfg))
    if fastvlm.is_fastvlm(cfg):
        return Source(**fastvlm.fastvlm_source(path, cfg))
    return llava_source(path)


def vision_source(path: Path, feature_layer: int) -> Source:
    oc = read_json(path, "open_clip_config.json") if path.is_dir() else None
    if oc is not None:
        vc = parsed(configs.openclip_vision_config, path, oc)
        files = sorted(glob.glob(str(path / "open_clip*.safetensors"))) or sorted(
            glob.glob(str(path / "open_clip*.bin")))
        raw = {}
        for f in files or weight_files(path):
            raw.update(read_weights(Path(f)))
        dtype = None
    elif aimv2.is_aimv2(cfg := model_config_json(path)):
        vc = aimv2.aimv2_vision_config(cfg)
        raw, dtype = aimv2.aimv2_weights(read_weights(path)), source_dtype(cfg)
    else:
        vc = parsed(configs.hf_vision_config, path, cfg)
        raw, dtype = read_weights(path), source_dtype(cfg)
    vc.feature_layer = feature_layer
    return Source({"vision_tower." + k: v for k, v in raw.items()}, vision=vc,
                  image_settings=preprocess.image_settings(path, vc), dtype=dtype)


def text_source(path: Path) -> Source:
    cfg = model_config_json(path)
    text = parsed(configs.text_config, path, cfg)
    text.check(str(path / "config.json"), "")
    raw = read_weights(path)
    # a bare decoder (LlamaModel) has no "model." prefix
    prefix = "language_model." if any(k.startswith("model.") for k in raw) else \
        "language_model.model."
    return Source({prefix + k: v for k, v in raw.items()}, text=text,
                  tokenizer=preprocess.load_tokenizer(path), dtype=source_dtype(cfg))


def pad_vocab(weights: dict, size: int) -> dict:
    """Grow embed_tokens / lm_head with zero rows so an added token (``<image>``) has an id."""
    out = dict(weights)
    for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if k in out and out[k].shape[0] < size:
            w = out[k]
            out[k] = mx.concatenate([w, mx.zeros((size - w.shape[0], w.shape[1]), w.dtype)])
    return out


def connector_config(kind: str, image_tokens: int, vision: VisionConfig,
                     hidden: int | None) -> ConnectorConfig:
    # a fresh c-abstractor is Honeybee's (MM1's): depthwise 3x3, LayerNorm2d eps 1e-5, pos_emb
    honeybee_blocks = dict(group_size=1, layer_norm_eps=1e-5, pos_emb=True) \
        if kind == "c-abstractor" else {}
    return ConnectorConfig(type=kind, num_image_tokens=image_tokens,
                           hidden_size=hidden or vision.hidden_size,
                           num_heads=vision.num_attention_heads,
                           hidden_act="gelu" if kind == "mlp" else "silu", **honeybee_blocks)


def check_config(config: ModelConfig) -> None:
    """Types, ranges, consistency, before any model is built from it (the vocabulary as it will
    be, with ``<image>`` added)."""
    grown = copy.deepcopy(config)
    grown.text_config.vocab_size = max(config.text_config.vocab_size, config.image_token_id + 1)
    grown.check("the converted config")


def assemble(hf_path: str | None = None, vision: str | None = None,
             text: str | None = None, connector: str = "c-abstractor", image_tokens: int = 144,
             connector_hidden: int | None = None, feature_layer: int = -2,
             dtype: str | None = None, q_bits: int | None = None, q_group_size: int = 64,
             upcycle: int = 0, moe_every: int = 1, top_k: int = 2, seed: int = 0,
             progress: bool = True) -> tuple:
    """A LLaVA model (``hf_path``) converted, or one assembled from ``vision`` + ``text`` parts:
    (model in eval mode, processor); ``progress``: bars on stderr while tensors are converted and
    quantized."""
    if hf_path:
        src, fresh = hf_source(resolve(hf_path)), ()
    else:  # a new connector: its parameters start untrained
        src = assembled(vision, text, connector, image_tokens, connector_hidden, feature_layer)
        fresh = ("connector.",)
    dtype = dtype or src.dtype or "float16"
    if dtype not in DTYPES:
        raise MM1Error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    config = src.model
    if upcycle and config.text_config.num_experts:
        raise MM1Error("--upcycle-experts needs a dense decoder, this one is already MoE")
    check_config(config)
    weights = converted(src, fresh, upcycle, moe_every, top_k, seed)
    config.check("the converted config")
    mx.random.seed(seed)
    try:
        model = Model(config)
    except ValueError as e:
        raise MM1Error(str(e)) from None
    nbytes = load_converted(model, weights, fresh, DTYPES[dtype], progress)
    if q_bits:  # the decoder; records config.quantization (per-module) for loading
        from ..models.quantization import quantize_model

        quantize_model(model, bits=q_bits, group_size=q_group_size)
        materialize(model, False, progress, nbytes, desc="quantizing")
    model.eval()
    return model, preprocess.build_processor(src.tokenizer, src.image_settings,
                                             config.num_image_tokens)


def assembled(vision: str | None, text: str | None, connector: str, image_tokens: int,
              connector_hidden: int | None, feature_layer: int) -> Source:
    """A vision encoder and a language model joined by a new (untrained) connector."""
    if not (vision and text):
        raise MM1Error("give --hf-path (a LLaVA model) or both --vision and --text")
    vs, ts = vision_source(resolve(vision), feature_layer), text_source(resolve(text))
    config = ModelConfig(
        vision_config=vs.vision, text_config=ts.text,
        image_token_id=preprocess.image_token_id(ts.tokenizer),
        connector_config=connector_config(connector, image_tokens, vs.vision, connector_hidden),
        name=f"{Path(vision).name}+{Path(text).name}")
    return Source({**vs.weights, **ts.weights}, model=config, tokenizer=ts.tokenizer,
                  image_settings=vs.image_settings, dtype=ts.dtype)


def converted(src: Source, fresh: tuple, upcycle: int, moe_every: int, top_k: int, seed: int
              ) -> dict:
    """The source tensors under our keys and layouts; the vocabulary grown for ``<image>``, the
    decoder's FFNs upcycled into experts when asked (``src.model`` follows)."""
    config = src.model
    weights = convert_weights(src.weights, config, allow_missing=fresh)
    src.weights = None  # the converted tensors replace them
    if config.image_token_id >= config.text_config.vocab_size:
        config.text_config.vocab_size = config.image_token_id + 1
        weights = pad_vocab(weights, config.text_config.vocab_size)
    if upcycle:
        weights, config.text_config = upcycle_experts(weights, config.text_config, upcycle,
                                                      moe_every, top_k, seed)
    return convert_weights(weights, config, allow_missing=fresh)  # idempotent: re-checks


def load_converted(model: Model, weights: dict, fresh: tuple, target, progress: bool) -> int:
    """Cast the tensors to ``target`` (untrained parts keep the model's initial values) and
    load them; their size in bytes."""
    if fresh:
        weights = {**{k: v for k, v in tree_flatten(model.parameters()) if k.startswith(fresh)},
                   **weights}
    nbytes = sum(v.nbytes for v in weights.values())
    for k in tqdm(list(weights), desc="converting", unit="tensor", leave=False,
                  disable=not progress):
        v = weights[k]
        weights[k] = v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
        mx.eval(weights[k])
    check_dtypes(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    return nbytes
