"""FastVLM (Apple) checkpoints -> our config and weight layout, in both published layouts.

* transformers' ``fast_vlm``: ``model.vision_tower.timm_model.*`` (timm's ``fastvit_mci3``),
  ``model.multi_modal_projector.linear_{1,2}``, ``model.language_model.*`` (Qwen2), ``lm_head``.
* Apple's original ``llava_qwen2`` (ml-fastvlm): ``model.vision_tower.vision_tower.model.*``
  (``mobileclip/mci.py``'s ``fastvithd``: a flat ``network`` list, MobileCLIP names),
  ``model.mm_projector.{0,2}``, the Qwen2 decoder under ``model.*``.

The encoder's shape (stages, widths, which stages attend) is read from the weights themselves, so
any FastViT of this family converts. Both layouts hold inference-mode (reparameterised) weights;
the ConvMlp's BatchNorm is fused into its depthwise conv here.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path

import mlx.core as mx

from ..errors import MM1Error
from ..models.config import ConnectorConfig, FastViTConfig, ModelConfig, TextConfig
from ..processor import ImageSettings
from . import configs, preprocess
from .honeybee import source_dtype
from .sources import read_json, read_weights

NATIVE_VISION = "model.vision_tower.timm_model."
APPLE_VISION = "model.vision_tower.vision_tower.model."
APPLE_NAMES = [("patch_embed.", "stem."), ("conv_exp.", "final_conv."), ("convffn.", "mlp."),
               ("se.reduce.", "se.fc1."), ("se.expand.", "se.fc2.")]
BN_EPS = 1e-5  # torch's BatchNorm2d default, in timm's ConvMlp and Apple's ConvFFN


def is_fastvlm(cfg: dict) -> bool:
    return cfg.get("model_type") in ("fast_vlm", "llava_qwen2")


def _apple_to_timm(weights: dict) -> dict:
    """mci.py's names (a flat ``network`` list) -> timm's (``stages.i.{downsample,pos_emb,blocks}``),
    as timm's own ``fastvit.checkpoint_filter_fn`` remaps MobileCLIP checkpoints."""
    if any(re.search(r"\.(rbr_conv|rbr_skip|lkb_origin)\.", k) for k in weights):
        raise MM1Error("this FastViT checkpoint is not reparameterised (training-mode branches); "
                       "FastVLM's released checkpoints are")
    ends = sorted({int(m[1]) for k in weights if (m := re.match(r"network\.(\d+)\.proj\.", k))})
    out = {}
    for k, v in weights.items():
        for old, new in APPLE_NAMES:
            k = k.replace(old, new)
        k = re.sub(r"layer_scale(_[12])?$", r"layer_scale\1.gamma", k)
        m = re.match(r"network\.(\d+)\.(.*)", k)
        if m:
            stage, rest = bisect.bisect_right(ends, int(m[1])), m[2]
            if rest.startswith("proj."):
                k = f"stages.{stage}.downsample.{rest}"
            elif rest.startswith(("reparam_conv.", "pe.")):
                k = f"stages.{stage}.pos_emb.reparam_conv.{rest.split('.')[-1]}"
            else:
                k = f"stages.{stage}.blocks.{rest}"
        out[k] = v
    return out


def _fuse_bn(weights: dict, prefix: str) -> tuple[mx.array, mx.array]:
    """conv (no bias) -> BatchNorm (eval) as one conv with a bias."""
    w = weights[prefix + "conv.weight"]
    g, b = weights[prefix + "bn.weight"], weights[prefix + "bn.bias"]
    mean, var = weights[prefix + "bn.running_mean"], weights[prefix + "bn.running_var"]
    t = g / mx.sqrt(var + BN_EPS)
    return w * t.reshape(-1, 1, 1, 1), b - mean * t


def _timm_to_ours(weights: dict) -> dict:
    """timm's fastvit tensors (torch layout) -> our FastViT's (channels-last convs)."""
    out = {}
    for k, v in weights.items():
        if k.startswith("head.") or ".bn." in k:
            continue  # the classifier; BatchNorms are fused below
        if k.endswith(".conv.conv.weight"):  # ConvMlp's conv + BatchNorm -> one conv
            prefix = k[:-len("conv.weight")]
            v, out[prefix + "bias"] = _fuse_bn(weights, prefix)
            k = prefix + "weight"
        if k.endswith(".gamma"):
            v = v.reshape(-1)
        out[k] = v.transpose(0, 2, 3, 1) if v.ndim == 4 else v
    return out


def _split(weights: dict) -> tuple[dict, dict]:
    """(vision tensors by timm name, everything else under our top-level prefixes)."""
    vision, rest = {}, {}
    for k, v in weights.items():
        if k.startswith(NATIVE_VISION):
            vision[k[len(NATIVE_VISION):]] = v
        elif k.startswith(APPLE_VISION):
            vision[k[len(APPLE_VISION):]] = v
        elif m := re.match(r"model\.(?:multi_modal_projector\.linear_(\d)|mm_projector\.(\d))\.(.*)",
                           k):
            layer = int(m[1]) - 1 if m[1] else int(m[2]) // 2  # Sequential(Linear, GELU, Linear)
            rest[f"connector.readout.layers.{layer}.{m[3]}"] = v
        elif k.startswith("model.language_model."):
            rest["language_model.model." + k[len("model.language_model."):]] = v
        elif k.startswith("model."):  # Apple's layout: the Qwen2 decoder itself
            rest["language_model.model." + k[len("model."):]] = v
        elif k.startswith("lm_head."):
            rest["language_model." + k] = v
        else:
            rest[k] = v  # already ours
    return vision, rest


def fastvlm_weights(weights: dict) -> dict:
    """Either layout -> our keys and layouts (idempotent: our own keys pass through)."""
    vision, rest = _split(weights)
    if any(k.startswith("stem.0.reparam_conv") for k in vision):
        timm = vision
    else:
        timm = _apple_to_timm(vision)
    return {**rest, **{"vision_tower." + k: v for k, v in _timm_to_ours(timm).items()}}


def fastvit_config(weights: dict, image_size: int) -> FastViTConfig:
    """The encoder's shape, read from our converted ``vision_tower.*`` tensors."""
    w = {k[len("vision_tower."):]: v for k, v in weights.items() if k.startswith("vision_tower.")}
    n = 1 + max(int(m[1]) for k in w if (m := re.match(r"stages\.(\d+)\.", k)))
    stage = [{k.split(".", 2)[2]: v for k, v in w.items() if k.startswith(f"stages.{i}.")}
             for i in range(n)]
    dims = [s["blocks.0.mlp.fc1.weight"].shape[-1] for s in stage]
    hidden = [s["blocks.0.mlp.fc1.weight"].shape[0] for s in stage]
    mixer = next(s["blocks.0.token_mixer.reparam_conv.weight"] for s in stage
                 if "blocks.0.token_mixer.reparam_conv.weight" in s)
    down = next(s["downsample.proj.0.reparam_conv.weight"] for s in stage
                if "downsample.proj.0.reparam_conv.weight" in s)
    pos = [s.get("pos_emb.reparam_conv.weight") for s in stage]
    return FastViTConfig(
        layers=[1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks.")) for s in stage],
        embed_dims=dims, mlp_ratios=[h / d for h, d in zip(hidden, dims)],
        downsamples=["downsample.proj.0.reparam_conv.weight" in s for s in stage],
        token_mixers=["attention" if "blocks.0.token_mixer.qkv.weight" in s else "repmixer"
                      for s in stage],
        pos_embs=[p is not None for p in pos],
        pos_emb_kernel=next((p.shape[1] for p in pos if p is not None), 7),
        repmixer_kernel_size=mixer.shape[1], down_patch_size=down.shape[1],
        cls_ratio=w["final_conv.reparam_conv.weight"].shape[0] / dims[-1], image_size=image_size)


def fastvlm_config(cfg: dict, weights: dict, text: TextConfig, image_token_id: int,
                   image_size: int) -> ModelConfig:
    """config.json (either layout) + converted weights + the decoder's config -> ModelConfig."""
    vision = fastvit_config(weights, image_size)
    act = cfg.get("projector_hidden_act", "gelu")
    kind = cfg.get("mm_projector_type", "mlp2x_gelu")
    if kind != "mlp2x_gelu":
        raise MM1Error(f"FastVLM projector {kind!r} is not supported (only mlp2x_gelu)")
    connector = ConnectorConfig(type="mlp", mlp_depth=2, hidden_act=act,
                                bias=cfg.get("multimodal_projector_bias", True))
    return ModelConfig(vision_config=vision, connector_config=connector, text_config=text,
                       image_token_id=image_token_id, name=cfg.get("_name_or_path") or "fastvlm")


def apple_image_size(cfg: dict) -> int:
    """``mm_vision_tower`` is ``mobileclip_l_<size>`` in Apple's layout."""
    tower = cfg.get("mm_vision_tower", "mobileclip_l_1024")
    try:
        return int(tower.split("_")[-1])
    except ValueError:
        raise MM1Error(f"cannot read the image size from mm_vision_tower {tower!r}") from None


def _side(size) -> int | None:
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return size


def fastvlm_source(path: Path, cfg: dict) -> dict:
    """A FastVLM directory, transformers' ``fast_vlm`` or Apple's ``llava_qwen2`` -> Source fields."""
    apple = cfg["model_type"] == "llava_qwen2"
    tok = preprocess.load_tokenizer(path)
    text = configs.text_config(dict(cfg, model_type="qwen2") if apple else cfg["text_config"])
    pre = read_json(path, "preprocessor_config.json") or \
        (read_json(path, "processor_config.json") or {}).get("image_processor")
    if pre is not None:
        size = _side(pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size"))
    else:
        size = apple_image_size(cfg) if apple else 1024
    weights = fastvlm_weights(read_weights(path))
    config = fastvlm_config(cfg, weights, text, preprocess.image_token_id(tok), size)
    if pre is not None:
        settings = preprocess.hf_image_settings(pre, config.vision_config)
    else:  # ml-fastvlm's CLIPImageProcessor: mean 0, std 1; LLaVA pads to a square first
        settings = ImageSettings(image_size=size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                                 resize_mode="pad" if cfg.get("image_aspect_ratio") == "pad"
                                 else "crop")
    if apple and pre is not None and cfg.get("image_aspect_ratio") == "pad":
        settings.resize_mode = "pad"
    return dict(weights=weights, model=config, tokenizer=tok, image_settings=settings,
                dtype=source_dtype(cfg))
