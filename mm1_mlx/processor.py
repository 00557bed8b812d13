"""Turning a prompt and images into model inputs: chat template, image tokens, pixels, tiles."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image

from .errors import MM1Error
from .images import DEFAULT_MAX_PIXELS, load_image, pixel_hash
from .io.validate import is_int, is_number, need, read_json
from .models.config import _FromDict

IMAGE_TOKEN = "<image>"
PREPROCESSOR_FILE = "preprocessor_config.json"
MAX_TILES = 64  # high-resolution splitting: tiles per image at most
PAD_CANVAS_SIDE = 4096  # a longer image is shrunk before padding (the canvas is side x side)


@dataclass
class ImageSettings(_FromDict):
    image_size: int = 224
    image_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    resize_mode: str = "crop"  # crop: shortest side + center crop; pad: pad to square; squash
    pad_color: list | None = None  # pad colour (0-255); defaults to the mean
    max_image_tiles: int = 1  # high-resolution splitting: at most this many tiles (+ overview)
    max_pixels: int = DEFAULT_MAX_PIXELS
    finetune_image_size: int | None = None  # the size adapters train at by default (None: image_size)

    RULES: ClassVar[dict] = {"image_size": (1, 8192), "finetune_image_size": (1, 8192),
                             "resize_mode": {"crop", "pad", "squash"},
                             "max_image_tiles": (1, MAX_TILES), "max_pixels": (1, 1 << 31)}

    def check(self, where: str = PREPROCESSOR_FILE, prefix: str = "") -> None:
        super().check(where, prefix)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            need(len(v) == 3 and all(is_number(x) for x in v), where, name, v, "three numbers")
        need(all(x > 0 for x in self.image_std), where, "image_std", self.image_std,
             "three positive numbers")
        pc = self.pad_color
        need(pc is None or (len(pc) == 3 and all(is_int(x) and 0 <= x <= 255 for x in pc)),
             where, "pad_color", pc, "null or three integers 0-255")


@dataclass
class PreparedImage:
    """One user image: its sub-images (tiles then overview, or just itself) and content hash."""

    pixels: np.ndarray  # (n_sub, S, S, 3) float32, normalized
    key: str  # pixel hash + preprocessing, for the image prefix cache

    @property
    def num_sub_images(self) -> int:
        return self.pixels.shape[0]


def best_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of tiles covering the image best: most resolution kept, least waste."""
    best, best_key = (1, 1), None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            scale = min(cols * tile / width, rows * tile / height)
            kept = min(width * height * scale * scale, width * height)
            waste = cols * rows * tile * tile - kept
            key = (kept, -waste)
            if best_key is None or key > best_key:
                best, best_key = (cols, rows), key
    return best


class Processor:
    def __init__(self, tokenizer, image_settings: ImageSettings, num_image_tokens: int,
                 image_token: str = IMAGE_TOKEN):
        self.tokenizer = tokenizer
        self.image = image_settings
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise MM1Error(f"tokenizer has no {image_token} token")

    # ---- files ----
    @classmethod
    def from_pretrained(cls, path: str) -> Processor:
        from transformers import AutoTokenizer

        pre = os.path.join(path, PREPROCESSOR_FILE)
        if not os.path.exists(pre):
            raise MM1Error(f"{path} has no {PREPROCESSOR_FILE}")
        cfg = read_json(pre)
        settings = ImageSettings.from_dict(cfg, pre)
        settings.check(pre)
        tokens, token = cfg.get("num_image_tokens"), cfg.get("image_token", IMAGE_TOKEN)
        need(is_int(tokens) and tokens >= 1, pre, "num_image_tokens", tokens, "a positive integer")
        need(isinstance(token, str) and token, pre, "image_token", token, "a non-empty string")
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # AutoTokenizer grumbles about our config.json's model_type
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise MM1Error(f"cannot load the tokenizer in {path}: {e}".splitlines()[0]) from None
        finally:
            hf_logging.set_verbosity(level)
        processor = cls(tok, settings, tokens, token)
        processor.check_template(path)
        return processor

    def check_template(self, path: str) -> None:
        """Render a one-turn conversation: a broken chat template fails here, naming its file."""
        if not getattr(self.tokenizer, "chat_template", None):
            return
        try:
            self.apply_chat_template([{"role": "user", "content": "hi"}])
        except MM1Error as e:
            raise MM1Error(f"{path}: {e}") from None

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        cfg = dict(self.image.to_dict(), num_image_tokens=self.num_image_tokens,
                   image_token=self.image_token, processor_class="mm1_mlx.Processor")
        with open(os.path.join(path, PREPROCESSOR_FILE), "w") as f:
            json.dump(cfg, f, indent=2)

    # ---- images ----
    def _normalize(self, img: Image.Image) -> np.ndarray:
        a = np.asarray(img, dtype=np.float32) / 255.0
        return (a - np.array(self.image.image_mean, np.float32)) / np.array(self.image.image_std,
                                                                           np.float32)

    def _square(self, img: Image.Image, size: int) -> Image.Image:
        w, h = img.size
        mode = self.image.resize_mode
        if mode == "pad" and w != h:
            if max(w, h) > PAD_CANVAS_SIDE:  # bound the canvas: shrink first (keeps the aspect)
                s = PAD_CANVAS_SIDE / max(w, h)
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
                w, h = img.size
            side = max(w, h)
            color = self.image.pad_color or [int(round(m * 255)) for m in self.image.image_mean]
            canvas = Image.new("RGB", (side, side), tuple(color))
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        elif mode == "crop" and w != h:
            s = size / min(w, h)
            img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            return img.crop((left, top, left + size, top + size))
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return img

    def prepare_image(self, source, max_tiles: int | None = None) -> PreparedImage:
        """Load one image; split into tiles plus an overview when high-res splitting is on."""
        img = load_image(source, self.image.max_pixels)
        size = self.image.image_size
        max_tiles = self.image.max_image_tiles if max_tiles is None else max_tiles
        if not 1 <= max_tiles <= MAX_TILES:
            raise MM1Error(f"max image tiles must be between 1 and {MAX_TILES}, got {max_tiles}")
        subs = []
        cols, rows = best_grid(*img.size, size, max_tiles) if max_tiles > 1 else (1, 1)
        if cols * rows > 1:
            big = img.resize((cols * size, rows * size), Image.BICUBIC)
            for r in range(rows):
                for c in range(cols):
                    box = (c * size, r * size, (c + 1) * size, (r + 1) * size)
                    subs.append(self._normalize(big.crop(box)))
        subs.append(self._normalize(self._square(img, size)))  # the overview goes last (MM1.5)
        key = f"{pixel_hash(img)}:{size}:{self.image.resize_mode}:{cols}x{rows}"
        return PreparedImage(np.stack(subs), key)

    # ---- text ----
    def content_parts(self, text: str) -> list[dict]:
        """"<image>\nWhat?" -> [{"type": "image"}, {"type": "text", "text": "What?"}]."""
        parts = []
        for i, piece in enumerate(text.split(self.image_token)):
            if i:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        return parts

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            if "'type'" in template or '"type"' in template:  # templates over content parts
                messages = [dict(m, content=self.content_parts(m["content"]))
                            if isinstance(m["content"], str) else m for m in messages]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            except Exception as e:  # jinja2 errors, raise_exception(), empty conversations
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise MM1Error(f"the chat template fails: {msg[:200]}") from None
            if not isinstance(text, str):
                raise MM1Error("the chat template does not render text")
            return text
        text = "".join(f"{m['role'].upper()}: {m['content']}\n" for m in messages)
        return text + ("ASSISTANT:" if add_generation_prompt else "")

    def messages(self, prompt: str, num_images: int, system: str | None = None) -> list[dict]:
        """A one-turn conversation; images without a placeholder go before the prompt."""
        missing = num_images - prompt.count(self.image_token)
        if missing < 0:
            raise MM1Error(f"the prompt has {prompt.count(self.image_token)} {self.image_token} "
                           f"placeholders but {num_images} images were given")
        prompt = f"{self.image_token}\n" * missing + prompt
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": prompt}]

    def tokenize(self, text: str, images: list[PreparedImage]) -> list[int]:
        """Tokenize, expanding the i-th ``<image>`` into its image tokens (tiles x tokens each)."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise MM1Error(f"the text has {len(parts) - 1} {self.image_token} placeholders but "
                           f"{len(images)} images were given")
        ids: list[int] = []
        for i, part in enumerate(parts):
            if part:
                ids += self.tokenizer.encode(part, add_special_tokens=False)
            if i < len(images):
                ids += [self.image_token_id] * (images[i].num_sub_images * self.num_image_tokens)
        return ids

    def prepare(self, prompt, images=(), system: str | None = None, max_tiles: int | None = None
                ) -> tuple[list[int], list[PreparedImage]]:
        """Prompt (text or chat messages) + images -> input ids and the prepared images."""
        prepared = [self.prepare_image(im, max_tiles) for im in images]
        msgs = prompt if isinstance(prompt, list) else self.messages(prompt, len(prepared), system)
        return self.tokenize(self.apply_chat_template(msgs), prepared), prepared

    def __call__(self, prompt, images=(), system: str | None = None,
                 max_tiles: int | None = None) -> tuple[list[int], np.ndarray | None, list[str]]:
        """Prompt (text or chat messages) + images -> input ids, pixel values, image keys."""
        ids, prepared = self.prepare(prompt, images, system, max_tiles)
        pixels = np.concatenate([p.pixels for p in prepared]) if prepared else None
        return ids, pixels, [p.key for p in prepared]

    def encode_conversation(self, messages: list[dict], images: list[PreparedImage]
                            ) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and a mask that is True on assistant tokens."""
        ids, mask, done, used = [], [], "", 0
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self.apply_chat_template(messages[:i], add_generation_prompt=True)
                pieces = [(head[len(done):], False)]
                done = head
            else:
                pieces = []
            full = self.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            pieces.append((full[len(done):], m["role"] == "assistant"))
            done = full
            for text, train in pieces:
                n = text.count(self.image_token)
                piece_ids = self.tokenize(text, images[used: used + n])
                used += n
                ids += piece_ids
                mask += [train] * len(piece_ids)
        if used != len(images):
            raise MM1Error(f"the conversation has {used} {self.image_token} placeholders but "
                           f"{len(images)} images were given")
        return ids, mask


def tiles_for(width: int, height: int, tile: int, max_tiles: int) -> int:
    """Number of sub-images (tiles + overview) an image of this size becomes."""
    cols, rows = best_grid(width, height, tile, max_tiles) if max_tiles > 1 else (1, 1)
    return cols * rows + 1 if cols * rows > 1 else 1


__all__ = ["Processor", "ImageSettings", "PreparedImage", "best_grid", "tiles_for"]
