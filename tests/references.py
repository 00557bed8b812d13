"""PyTorch reference models for the family parity tests, built in a subprocess.

``python tests/references.py KIND OUT SPEC_JSON`` builds a small random model the way its own
project builds it (timm, open_clip, transformers), writes its checkpoint into OUT in that
project's layout, and writes ``io.npz``: the inputs it was run on and what it computed. Exit code
3 with one line on stderr: a reference library is not installed (the test skips with that line).

Why a subprocess: PyPI's torchvision 0.28 (the one for torch 2.13) is a CUDA build whose compiled
ops do not load beside torch's CPU build, and importing it then fails, which breaks transformers'
image processors too. timm and open_clip import torchvision at import time, but only for things
these references never call (FrozenBatchNorm2d, data transforms), so where torchvision is absent
a stand-in module answers those imports, here, in a process of its own, never in the test run.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

MISSING = 3


# ---- the test side ------------------------------------------------------------------------

def run_reference(kind: str, out: Path, **spec) -> dict:
    """Build reference ``kind`` into ``out``; returns io.npz's arrays. Skips when a library is absent."""
    import numpy as np
    import pytest

    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, __file__, kind, str(out), json.dumps(spec)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode == MISSING:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    if r.returncode:
        raise AssertionError(f"reference {kind} failed:\n{r.stderr[-3000:]}")
    with np.load(out / "io.npz") as f:
        return dict(f)


# ---- the reference side -------------------------------------------------------------------

class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not installed (a stand-in answered the import)")


class _AnyAttribute(type):
    def __getattr__(cls, name):  # InterpolationMode.BICUBIC and the like, read at import time
        return name


def _standin(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__path__ = []

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _AnyAttribute(attr, (_Unavailable,), {})

    module.__getattr__ = getattr_
    return module


def torchvision_standin() -> None:
    """Answer timm's and open_clip's import-time torchvision imports where torchvision is absent."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    import torch

    names = ["torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
             "torchvision.transforms.functional", "torchvision.transforms.v2",
             "torchvision.utils", "torchvision.datasets", "torchvision.models",
             "torchvision.models.feature_extraction"]
    for name in names:
        sys.modules[name] = _standin(name)
    for name in names[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type(
        "FrozenBatchNorm2d", (torch.nn.Module,), {})


def randomize(module, std: float = 0.2) -> None:
    """Random values everywhere (norm weights around 1), so no parameter can be silently ignored."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            one = p.ndim == 1 and name.endswith("weight") and "norm" in name.lower() or \
                name.endswith((".bn.weight", "gamma"))
            p.copy_(torch.randn_like(p) * std + (1.0 if one else 0.0))


def save_state(module, path: Path, prefix: str = "") -> None:
    from safetensors.torch import save_file

    save_file({prefix + k: v.detach().contiguous() for k, v in module.state_dict().items()},
              str(path))


# Honeybee: honeybee/projectors/projectors.py (Projector + CAbstractor), as their code builds it
def honeybee_abstractor(p: dict, num_input_tokens: int, enc: int, out_dims: int):
    import torch
    from timm.layers import LayerNorm, LayerNorm2d
    from timm.models.regnet import RegStage
    from torch import nn

    class CAbstractor(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, enc)) \
                if p["pos_emb"] else None
            self.prenorm = LayerNorm(enc) if p.get("prenorm") else None
            RegBlock = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU,
                               norm_layer=LayerNorm2d)
            hw = int(p["num_query_tokens"] ** 0.5)
            depth, hidden = p["depth"], p["hidden_size"]
            self.net = nn.Sequential(RegBlock(depth, enc, hidden), nn.AdaptiveAvgPool2d((hw, hw)),
                                     RegBlock(depth, hidden, hidden))
            layers = [nn.Linear(hidden, out_dims)]
            for _ in range(1, p["mlp_depth"]):
                layers += [nn.SiLU(), nn.Linear(out_dims, out_dims)]
            self.readout = nn.Sequential(*layers)

        def forward(self, x):
            if self.prenorm is not None:
                x = self.prenorm(x)
            if self.pos_emb is not None:
                x = x + self.pos_emb
            B, L, D = x.shape
            hw = int(L ** 0.5)
            x = x.transpose(1, 2).reshape(B, D, hw, hw)  # "b (h w) d -> b d h w"
            x = self.net(x)
            return self.readout(x.flatten(2).transpose(1, 2))  # "b d h w -> b (h w) d"

    return CAbstractor()


def honeybee(out: Path, spec: dict) -> dict:
    """A Honeybee directory (their config.json and key layout) and the model's outputs."""
    import numpy as np
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(**spec["vision"])
    vision = CLIPVisionModel(vcfg).eval()
    tcfg = LlamaConfig(**spec["text"])
    lm = LlamaForCausalLM(tcfg).eval()
    proj = dict(spec["projector"], projector_type="c-abs", num_eos_tokens=0,
                encoder_hidden_size=vcfg.hidden_size, output_hidden_size=tcfg.hidden_size)
    P = (vcfg.image_size // vcfg.patch_size) ** 2
    abstractor = honeybee_abstractor(proj, P, vcfg.hidden_size, tcfg.hidden_size).eval()
    randomize(abstractor)

    feats = torch.randn(2, P, vcfg.hidden_size)
    px = torch.randn(1, 3, vcfg.image_size, vcfg.image_size)
    ids = torch.tensor([spec["input_ids"]])
    with torch.no_grad():
        alone = abstractor(feats)
        hidden = vision(pixel_values=px, output_hidden_states=True).hidden_states
        image = abstractor(hidden[proj["feature_layer_index"]][:, 1:])
        embeds = lm.get_input_embeddings()(ids)
        embeds[ids == spec["image_token_id"]] = image.reshape(-1, image.shape[-1])
        logits = lm(inputs_embeds=embeds).logits
        tokens = []
        for _ in range(20):
            nxt = lm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            tokens.append(int(nxt))
            embeds = torch.cat([embeds, lm.get_input_embeddings()(nxt)[:, None]], dim=1)

    # transformers 4 (Honeybee's) keeps CLIPVisionModel's own vision_model. prefix, 5 drops it
    clip = {k if k.startswith("vision_model.") else "vision_model." + k: v
            for k, v in vision.state_dict().items()}
    state = {**{"vision_model." + k: v for k, v in clip.items()},
             **{"abstractor." + k: v for k, v in abstractor.state_dict().items()},
             **{"language_model." + k: v for k, v in lm.state_dict().items()}}
    if spec.get("cls_pos_emb"):  # an old checkpoint: their loader drops this first row
        state["abstractor.pos_emb"] = torch.cat([torch.randn(1, 1, vcfg.hidden_size),
                                                 state["abstractor.pos_emb"]], dim=1)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    vdict = dict(vcfg.to_dict(), encoder_type="openai.clip", image_mean=[0.5, 0.5, 0.5],
                 image_std=[0.25, 0.25, 0.25])
    cfg = {"architectures": ["HoneybeeForConditionalGeneration"], "vision_config": vdict,
           "projector_config": proj, "lm_config": {"pretrained_lm_name_or_path": "llama"},
           "text_config": tcfg.to_dict(), "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg))
    return dict(features=feats.numpy(), abstractor_out=alone.numpy(),
                pixel_values=px.permute(0, 2, 3, 1).numpy(), input_ids=ids.numpy(),
                logits=logits.numpy(), tokens=np.array(tokens))


def capture_blocks(blocks) -> list:
    """Forward hooks collecting each block's output, batch first."""
    outs = []
    for block in blocks:
        block.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
    return outs


def openclip(out: Path, spec: dict) -> dict:
    """An OpenCLIP checkpoint as the hub holds DFN5B-CLIP-ViT-H-14-378 (open_clip_config.json,
    open_clip_model.safetensors); run at ``run_image_size``, its position grid resized by
    open_clip's own ``resize_pos_embed`` when that differs from the checkpoint's."""
    import numpy as np
    import torch
    from open_clip.model import CLIP, resize_pos_embed

    torch.manual_seed(0)
    vision = dict(spec["vision"])
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    randomize(model.visual, std=0.05)
    state = model.state_dict()
    save_state(model, out / "open_clip_model.safetensors")
    model_cfg = {"embed_dim": 16, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
           "resize_mode": "squash"}
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))

    size = spec.get("run_image_size", vision["image_size"])
    if size != vision["image_size"]:
        model = CLIP(embed_dim=16, vision_cfg=dict(vision, image_size=size), text_cfg=text,
                     quick_gelu=True).eval()
        resize_pos_embed(state, model)  # bicubic, antialias=True
        model.load_state_dict(state)
    hidden = capture_blocks(model.visual.transformer.resblocks)
    px = torch.randn(2, 3, size, size)
    with torch.no_grad():
        model.encode_image(px)
    return dict(pixel_values=px.permute(0, 2, 3, 1).numpy(),
                hidden=np.stack([h.numpy() for h in hidden]))


# Apple's ml-fastvlm names (mobileclip/mci.py's fastvithd) for timm's: the inverse of timm's
# fastvit.checkpoint_filter_fn, applied to a llava_qwen2 checkpoint's vision tower
TIMM_TO_APPLE = [("stem.", "patch_embed."), ("final_conv.", "conv_exp."), (".mlp.", ".convffn."),
                 ("se.fc1.", "se.reduce."), ("se.fc2.", "se.expand.")]


def apple_fastvit_names(state: dict, stages: int) -> dict:
    import re

    net, index = 0, {}  # network list: [stage blocks, PatchEmbed, (RepCPE), stage blocks, ...]
    for i in range(stages):
        if any(k.startswith(f"stages.{i}.downsample.") for k in state):
            index[(i, "downsample")], net = net, net + 1
        if any(k.startswith(f"stages.{i}.pos_emb.") for k in state):
            index[(i, "pos_emb")], net = net, net + 1
        index[(i, "blocks")], net = net, net + 1
    out = {}
    for k, v in state.items():
        m = re.match(r"stages\.(\d+)\.(downsample|pos_emb|blocks)\.(.*)", k)
        if m:
            rest = m[3].replace("reparam_conv.", "reparam_conv.") if m[2] != "downsample" else m[3]
            k = f"network.{index[(int(m[1]), m[2])]}.{rest}"
        for old, new in TIMM_TO_APPLE:
            k = k.replace(old, new)
        k = re.sub(r"(layer_scale(_[12])?)\.gamma$", r"\1", k)
        out[k] = v
    return out


def fastvlm(out: Path, spec: dict) -> dict:
    """transformers' FastVlmForConditionalGeneration (timm fastvit_mci3 + Qwen2), saved in its
    native layout (OUT/native) and in Apple's llava_qwen2 layout (OUT/apple)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config
    from transformers.models.timm_wrapper import TimmWrapperConfig

    # transformers decided at import that timm is unusable without torchvision; ask again now
    # that the stand-in answers (the model needs timm alone)
    from transformers.utils import import_utils

    for check in ("is_torchvision_available", "is_timm_available"):
        getattr(getattr(import_utils, check), "cache_clear", lambda: None)()
    torch.manual_seed(0)
    args = dict(spec["model_args"], inference_mode=True)
    hidden = int(args["embed_dims"][-1] * 2)
    vision = TimmWrapperConfig(architecture="fastvit_mci3", model_args=args, hidden_size=hidden,
                               do_pooling=False)
    text = Qwen2Config(**spec["text"])
    config = FastVlmConfig(vision_config=vision, text_config=text,
                           image_token_index=spec["image_token_id"],
                           image_seq_length=spec["image_tokens"])
    model = FastVlmForConditionalGeneration(config).eval()
    randomize(model.model.vision_tower, std=0.2)
    randomize(model.model.multi_modal_projector, std=0.2)
    with torch.no_grad():  # BatchNorm statistics matter once fused
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    model.save_pretrained(out / "native")

    size = spec["image_size"]
    px = torch.randn(1, 3, size, size)
    ids = torch.tensor([spec["input_ids"]])
    with torch.no_grad():
        feats = model.model.vision_tower(px).last_hidden_state
        logits = model(input_ids=ids, pixel_values=px).logits
        tokens = []
        for _ in range(20):
            nxt = model(input_ids=ids, pixel_values=px).logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            ids = torch.cat([ids, nxt], dim=1)

    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    apple = {}
    tower = {k[len("model.vision_tower.timm_model."):]: v for k, v in state.items()
             if k.startswith("model.vision_tower.timm_model.")}
    for k, v in apple_fastvit_names(tower, len(args["layers"])).items():
        apple["model.vision_tower.vision_tower.model." + k] = v
    for k, v in state.items():
        if k.startswith("model.multi_modal_projector.linear_"):
            n = int(k.split("linear_")[1][0])
            apple[f"model.mm_projector.{2 * (n - 1)}." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.language_model."):
            apple["model." + k[len("model.language_model."):]] = v
        elif k.startswith("lm_head."):
            apple[k] = v
    (out / "apple").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in apple.items()}, str(out / "apple/model.safetensors"))
    cfg = dict(text.to_dict(), model_type="llava_qwen2", architectures=["LlavaQwen2ForCausalLM"],
               mm_vision_tower=f"mobileclip_l_{size}", mm_projector_type="mlp2x_gelu",
               mm_hidden_size=hidden, image_aspect_ratio="pad", torch_dtype="float32")
    (out / "apple/config.json").write_text(json.dumps(cfg))
    return dict(pixel_values=px.permute(0, 2, 3, 1).numpy(), input_ids=ids[:, :-20].numpy(),
                logits=logits.numpy(), tokens=np.array(tokens),
                features=feats.flatten(2).transpose(1, 2).numpy())


REFERENCES = {"honeybee": honeybee, "openclip": openclip, "fastvlm": fastvlm}


def main(argv: list[str]) -> int:
    kind, out = argv[0], Path(argv[1])
    spec = json.loads(argv[2]) if len(argv) > 2 else {}
    import numpy as np
    import transformers  # before the stand-in: its torchvision check must see the real state

    transformers.logging.set_verbosity_error()
    torchvision_standin()
    try:
        result = REFERENCES[kind](out, spec)
    except ModuleNotFoundError as e:
        if e.name in ("timm", "open_clip", "ftfy", "torch", "transformers"):
            print(f"reference library {e.name} is not installed "
                  f"(pip install --no-deps timm open_clip_torch ftfy)", file=sys.stderr)
            return MISSING
        raise
    np.savez(out / "io.npz", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
