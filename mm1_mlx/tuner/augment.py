"""Train-time image augmentation for LoRA fine-tuning (``python -m mm1_mlx.lora``, on by default).

A few hundred pictures all come from one camera, one renderer or one light: without variation
adapters learn those pixels rather than the concept (most of all the image encoder's, which
``--train-vision`` adapts). Each training image is drawn afresh at every step with a random zoom
(0.85-1.1) / shift / rotation, brightness, contrast and saturation change, noise and JPEG
re-encoding. No flips and only small shifts and no hue change: answers about where a thing is or
what colour it has must stay true. The output keeps the input's size (the tile count of the
tokenized sample depends on it). Deterministic: a pure function of the image and the seed.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageEnhance


def geometry(img: Image.Image, rng: random.Random) -> Image.Image:
    """Zoom 0.85-1.1, shift up to 6% of the side, rotate up to 10 degrees, edges filled with the
    image's own border colour."""
    w, h = img.size
    edge = np.asarray(img)[[0, -1]].reshape(-1, 3).mean(0)
    # not further out: at 0.7 a small hexagon is a few pixels from a circle (README: 0.7-1.05 had
    # held-out circles named hexagons; 0.85-1.1 kept the original set 4 points higher)
    zoom = rng.uniform(0.85, 1.1)
    dx, dy = rng.uniform(-0.06, 0.06) * w, rng.uniform(-0.06, 0.06) * h
    out = img.rotate(rng.uniform(-10, 10), Image.BICUBIC, translate=(dx, dy),
                     fillcolor=tuple(int(c) for c in edge))
    cw, ch = w / zoom, h / zoom  # zoom > 1: crop the middle; < 1: take in a border
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    if zoom < 1:
        canvas = Image.new("RGB", (round(cw), round(ch)), tuple(int(c) for c in edge))
        canvas.paste(out, (round((cw - w) / 2), round((ch - h) / 2)))
        return canvas.resize((w, h), Image.BICUBIC)
    return out.crop(tuple(round(b) for b in box)).resize((w, h), Image.BICUBIC)


def photometric(img: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness and contrast +-15%, saturation +-20%; sometimes noise or JPEG (no blur: small
    shapes would lose the corners that tell them apart)."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        a = np.asarray(img, np.float32)
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(2, 8), a.shape)
        img = Image.fromarray(np.clip(a + noise, 0, 255).round().astype(np.uint8))
    if rng.random() < 0.4:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(50, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """One random variation of ``img`` (RGB, same size)."""
    img = img.convert("RGB")
    if rng.random() < 0.8:
        img = geometry(img, rng)
    return photometric(img, rng)
