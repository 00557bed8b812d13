"""Pure weight conversion: Hugging Face / OpenCLIP tensors -> our keys and layouts.

``convert_weights`` is idempotent (running it on its own output changes nothing) and names every
unmapped or missing tensor and every shape mismatch in a single one-line error.
"""

from __future__ import annotations

import dataclasses
import re

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import MM1Error
from ..models.config import ModelConfig, TextConfig
from ..models.model import Model

# whole-model prefixes, first match wins; covers LLaVA as published (vision_tower.vision_model.*,
# language_model.model.*), as transformers 5 holds it (model.vision_tower.*, model.language_model.*,
# lm_head.*) and our own output (vision_tower.*, connector.*, language_model.*)
PREFIXES = [
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "connector."),
    ("multi_modal_projector.", "connector."),
    ("connector.", "connector."),
    ("model.language_model.model.", "language_model.model."),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
]

# tensors a source may hold that our model deliberately does not use
VISION_UNUSED = re.compile(
    r"(embeddings\.position_ids|head\..*|text_model\..*|(visual|text)_projection\..*|logit_(scale|bias)"
    r"|visual\.(proj|ln_post\..*)|transformer\..*|token_embedding\..*|positional_embedding"
    r"|ln_final\..*|text_projection|text\..*)"
)
TEXT_UNUSED = re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")

OPENCLIP = [  # OpenCLIP visual tower -> HF CLIP names
    (r"visual\.conv1\.", "embeddings.patch_embedding."),
    (r"visual\.class_embedding", "embeddings.class_embedding"),
    (r"visual\.positional_embedding", "embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\.", "pre_layrnorm."),
    (r"visual\.ln_post\.", "post_layernorm."),
    (r"visual\.transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"visual\.transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.",
     r"encoder.layers.\1.self_attn.out_proj."),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
]
IN_PROJ = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
EXPERT = re.compile(
    r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.(weight|bias)")
FUSED_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(?:\.weight)?")
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
                 "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Parameter shapes of the model the config builds (parameters are lazy: nothing computed)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Model(config).parameters())}


def _top(key: str) -> str | None:
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _vision(key: str, value: mx.array, config: ModelConfig, out: dict) -> None:
    """Map one vision-tower tensor (prefix removed) into ``out``."""
    vc = config.vision_config
    m = IN_PROJ.fullmatch(key)
    if m:  # OpenCLIP's packed q/k/v
        for name, part in zip("qkv", mx.split(value, 3, axis=0)):
            out[f"vision_tower.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        return
    for pattern, repl in OPENCLIP:
        if re.match(pattern, key):
            key = re.sub(pattern, repl, key, count=1)
            break
    if key == "embeddings.patch_embedding.weight" and value.ndim == 4:
        C = vc.num_channels
        # torch (O, I, kh, kw) -> MLX (O, kh, kw, I)
        if value.shape[1] == C and value.shape[3] != C:
            value = value.transpose(0, 2, 3, 1)
    out["vision_tower." + key] = value


def _text(key: str, value: mx.array, out: dict, experts: dict) -> None:
    m = EXPERT.fullmatch(key)
    if m and m[3] in MIXTRAL_NAMES:
        experts.setdefault((int(m[1]), MIXTRAL_NAMES[m[3]], m[4]), {})[int(m[2])] = value
        return
    m = FUSED_EXPERTS.fullmatch(key)
    if m:
        experts.setdefault((int(m[1]), m[2], "fused"), {})[None] = value
        return
    key = re.sub(r"^layers\.(\d+)\.block_sparse_moe\.gate\.", r"layers.\1.mlp.gate.", key)
    out["language_model.model." + key] = value


def _stack_experts(experts: dict, tc: TextConfig, out: dict, missing: list) -> None:
    E, D, I = tc.num_experts, tc.hidden_size, tc.moe_intermediate_size
    for (layer, name, kind), parts in sorted(experts.items()):
        base = f"language_model.model.layers.{layer}.mlp.switch_mlp"
        if kind == "fused":  # transformers-5 fused experts: gate_up (E, 2I, D), down (E, D, I)
            v = parts[None]
            if name == "gate_up_proj":
                v = v if v.shape[1] == 2 * I else v.swapaxes(1, 2)
                gate, up = mx.split(v, 2, axis=1)
                out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"] = gate, up
            else:
                out[f"{base}.down_proj.weight"] = v if v.shape[1] == D else v.swapaxes(1, 2)
            continue
        absent = [j for j in range(max(E, max(parts) + 1)) if j not in parts]
        if absent:
            missing += [f"language_model.model.layers.{layer}.mlp.experts.{j}.{name}.{kind}"
                        for j in absent]
            continue
        out[f"{base}.{name}.{kind}"] = mx.stack([parts[j] for j in range(len(parts))])


def convert_weights(hf_weights: dict, config: ModelConfig,
                    allow_missing: tuple[str, ...] = ()) -> dict:
    """Map a source's tensors to our keys, check them against ``config``, return the new dict.

    Keys may be LLaVA's (either layout), a decoder's under ``language_model.``, a vision tower's
    under ``vision_tower.`` (HF CLIP/SigLIP or OpenCLIP ``visual.*``), or already ours. Keys under
    ``allow_missing`` prefixes may be absent (e.g. a freshly initialised connector).
    """
    out, experts, unmapped, missing = {}, {}, [], []
    for key, value in hf_weights.items():
        top = _top(key)
        if top is None:
            unmapped.append(key)
        elif top.startswith("vision_tower."):
            sub = top[len("vision_tower."):]
            if not VISION_UNUSED.fullmatch(sub):
                _vision(sub, value, config, out)
        elif top.startswith("connector."):
            sub = re.sub(r"^linear_(\d)\.", lambda m: f"readout.layers.{int(m[1]) - 1}.",
                         top[len("connector."):])
            out["connector." + sub] = value
        elif top.startswith("language_model.model."):
            sub = top[len("language_model.model."):]
            if not TEXT_UNUSED.fullmatch(sub):
                _text(sub, value, out, experts)
        else:
            out[top] = value
    _stack_experts(experts, config.text_config, out, missing)
    return _check(out, config, allow_missing, unmapped, missing)


def _unused(key: str, config: ModelConfig, n_vision_layers: int) -> bool:
    """Tensors that map but that this config does not build (layers past the feature layer...)."""
    m = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", key)
    if m:
        return int(m[1]) >= n_vision_layers
    if key.startswith("vision_tower.post_layernorm."):
        return not config.vision_config.post_layernorm
    return key == "language_model.lm_head.weight" and config.text_config.tie_word_embeddings


def _check(out: dict, config: ModelConfig, allow_missing: tuple, unmapped: list,
           missing: list) -> dict:
    shapes = expected_shapes(config)
    n_layers = sum(1 for k in shapes if re.fullmatch(
        r"vision_tower\.encoder\.layers\.\d+\.layer_norm1\.weight", k))
    result, mismatched = {}, []
    for k, v in out.items():
        if k in shapes:
            if tuple(v.shape) != shapes[k]:
                mismatched.append(f"{k} {tuple(v.shape)} != {shapes[k]}")
            result[k] = v
        elif not _unused(k, config, n_layers):
            unmapped.append(k)
    missing += [k for k in shapes if k not in result and not k.startswith(allow_missing)]
    problems = []
    if unmapped:
        problems.append(f"unmapped tensors: {', '.join(sorted(unmapped))}")
    if missing:
        problems.append(f"missing tensors: {', '.join(sorted(missing))}")
    if mismatched:
        problems.append(f"shape mismatches (weights vs config): {', '.join(mismatched)}")
    if problems:
        raise MM1Error("; ".join(problems))
    return result


def upcycle_experts(weights: dict, text: TextConfig, num_experts: int, moe_every: int = 1,
                    top_k: int = 2, seed: int = 0) -> tuple[dict, TextConfig]:
    """Sparse upcycling: every ``moe_every``-th dense FFN becomes ``num_experts`` identical copies
    behind a small random router, so the MoE model starts out computing the dense one."""
    if text.num_experts:
        raise MM1Error("--upcycle-experts needs a dense decoder, this one is already MoE")
    if not 1 <= top_k <= num_experts:
        raise MM1Error(f"--top-k must be between 1 and {num_experts}, got {top_k}")
    new = dataclasses.replace(text, num_experts=num_experts, moe_every=moe_every,
                              num_experts_per_tok=top_k, norm_topk_prob=True,
                              moe_intermediate_size=text.intermediate_size)
    out = dict(weights)
    key = mx.random.key(seed)
    for i in range(text.num_hidden_layers):
        if not new.is_moe_layer(i):
            continue
        p = f"language_model.model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj", "down_proj"):
            for kind in ("weight", "bias"):
                if p + f"{name}.{kind}" in out:
                    w = out.pop(p + f"{name}.{kind}")
                    out[p + f"switch_mlp.{name}.{kind}"] = mx.repeat(w[None], num_experts, axis=0)
        dtype = out[p + "switch_mlp.gate_proj.weight"].dtype
        key, sub = mx.random.split(key)
        # small router: near-uniform routing; renormalised top-k weights sum to 1
        out[p + "gate.weight"] = (1e-3 * mx.random.normal((num_experts, text.hidden_size),
                                                          key=sub)).astype(dtype)
    return out, new
