"""Deterministic, offline random-weight LLaVA-1.5-shaped checkpoint in Hugging Face format.

``small`` is the real LLaVA-1.5 layout at a reduced size (CLIP ViT-B/14 at 336 px, MLP projector,
a 1024-wide 16-layer Llama, vocab 32064); ``tiny`` is the same shape family for CI. The tokenizer is
a BPE trained on a generated corpus and padded to the vocabulary size; the processor is
CLIPImageProcessor + LlavaProcessor with a LLaVA-1.5 chat template.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

BUILDER_VERSION = 2

SIZES = {
    "small": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=336, patch_size=14),
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, vocab_size=32064,
                  max_position_embeddings=4096),
        bpe_vocab=32000),
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=56, patch_size=14),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=1088,
                  max_position_embeddings=1024),
        bpe_vocab=1024),
}

# LLaVA-1.5's conversation format; string or list-of-parts content (as transformers' processors send)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% else %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

WORDS = ("the a an of in on at to with and or is are was what where which how many color shape "
         "image picture photo describe left right top bottom center red green blue yellow black "
         "white circle square triangle star line small large big tiny near far above below next "
         "there here this that these those one two three four five six seven eight nine ten "
         "cat dog bird car tree house sky road river mountain person people sitting standing "
         "looking holding wearing behind front between inside outside bright dark light shadow "
         "please tell me about scene object objects background foreground detail details").split()

QUESTION = ("Describe this picture in detail: what objects are there, which color is each "
            "object, where is the red circle relative to the blue square, how many small shapes "
            "are near the top left corner, and is the background bright or dark?")
FOLLOW_UP = ("Now tell me about the shapes near the bottom right corner: how many are there, "
             "which colors do they have, and are they large or small?")


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "."
            for _ in range(n)] + [QUESTION, FOLLOW_UP]


def build_tokenizer(vocab_size: int):
    """Llama-style (metaspace) BPE trained on the corpus, padded with unused tokens to ``vocab_size``,
    then ``<image>`` and ``<pad>`` appended (as llava-hf does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=min(vocab_size, 900), special_tokens=specials, show_progress=False))
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    for i in range(len(vocab), vocab_size):  # unreachable filler pieces up to the full vocabulary
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(state))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_tokens(["<image>"], special_tokens=True)
    fast.add_special_tokens({"pad_token": "<pad>"})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_image(path: Path, size=(640, 480), seed: int = 0) -> Path:
    """A smooth deterministic picture with a few shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    for _ in range(6):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(15, 60)
        rgb[(x * w - cx) ** 2 + (y * h - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def published_layout(path: Path) -> None:
    """Rename the tower's keys to the layout llava-hf publishes (``vision_tower.vision_model.*``),
    which is what users download and what mlx-vlm expects; transformers 5 saves it flatter."""
    from safetensors.numpy import load_file, save_file

    for f in sorted(path.glob("*.safetensors")):
        w = load_file(f)
        w = {("vision_tower.vision_model." + k[len("vision_tower."):]
              if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
              else k): v for k, v in w.items()}
        save_file(w, f, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {("vision_tower.vision_model." + k[len("vision_tower."):]
                              if k.startswith("vision_tower.") else k): v
                             for k, v in idx["weight_map"].items()}
        index.write_text(json.dumps(idx, indent=2))


def build_llava(path: Path, size: str, seed: int = 0) -> Path:
    """Write the HF checkpoint (float32 safetensors, tokenizer, processor) to ``path`` atomically."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = SIZES[size]
    tok = build_tokenizer(spec["bpe_vocab"])
    image_id = tok.convert_tokens_to_ids("<image>")
    vs = spec["vision"]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vs, projection_dim=vs["hidden_size"]),
        text_config=LlamaConfig(**spec["text"], pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=image_id, vision_feature_select_strategy="default",
        vision_feature_layer=-2, projector_hidden_act="gelu", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    side = vs["image_size"]
    ip = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=vs["patch_size"],
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    published_layout(tmp)
    proc.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "benchmark_model.json").write_text(json.dumps(
        {"size": size, "seed": seed, "builder_version": BUILDER_VERSION}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def ensure_llava(cache: Path, size: str, seed: int = 0) -> Path:
    """The cached checkpoint for ``size`` (rebuilt when missing or from another builder version)."""
    path = cache / f"llava-{size}"
    stamp = path / "benchmark_model.json"
    want = {"size": size, "seed": seed, "builder_version": BUILDER_VERSION}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    return build_llava(path, size, seed)
