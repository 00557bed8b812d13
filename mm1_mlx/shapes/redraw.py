"""Shapes-world scenes drawn by independent code, for the robustness check of the eval.

The training images come from ``world.render`` (PIL polygons, our palettes). These are drawn another
way: numpy masks from matplotlib paths, colours taken from matplotlib's XKCD / Tableau / CSS tables
(not our palettes), other sizes, positions, backgrounds and noise, and sometimes JPEG compression.
A model that learned "red" and "star" rather than our drawing code should answer the same.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image

from . import world

COLOR_NAMES = {
    "red": ["xkcd:red", "tab:red", "red", "crimson", "xkcd:bright red"],
    "orange": ["xkcd:orange", "tab:orange", "darkorange", "orange"],
    "yellow": ["xkcd:yellow", "gold", "yellow", "xkcd:sunflower"],
    "green": ["xkcd:green", "tab:green", "forestgreen", "limegreen", "green"],
    "blue": ["xkcd:blue", "tab:blue", "royalblue", "blue", "dodgerblue"],
    "purple": ["xkcd:purple", "tab:purple", "darkviolet", "purple", "rebeccapurple"],
    "pink": ["xkcd:pink", "tab:pink", "hotpink", "deeppink", "lightpink"],
    "brown": ["xkcd:brown", "tab:brown", "saddlebrown", "sienna"],
    "teal": ["xkcd:teal", "teal", "lightseagreen", "tab:cyan"],
}
CENTERS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
           "center": (0.5, 0.5)}


def rgb(name: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.array(to_rgb(name))


def outline(kind: str, rng: random.Random) -> np.ndarray:
    """Unit-size outline points of a shape, before rotation (y grows downwards)."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.85
    if kind == "triangle":  # equilateral, point up, centred on its centroid
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1) * 1.1
    if kind == "diamond":  # a rhombus standing on a corner
        w = rng.uniform(0.5, 0.8)
        return np.array([[0, -1], [w, 0], [0, 1], [-w, 0]])
    if kind == "star":
        inner = rng.uniform(0.4, 0.5)
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if kind == "hexagon":
        t = np.arange(6) * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    raise ValueError(kind)


def mask(kind: str, cx: float, cy: float, r: float, angle: float, size: int, ss: int,
         rng: random.Random) -> np.ndarray:
    """Coverage in [0, 1] of each pixel (ss x ss supersampling)."""
    from matplotlib.path import Path

    pts = outline(kind, rng)
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])
    n = size * ss
    g = (np.arange(n) + 0.5) / ss
    xx, yy = np.meshgrid(g, g)
    inside = Path(pts).contains_points(np.stack([xx.ravel(), yy.ravel()], 1)).reshape(n, n)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def draw(rng: random.Random, shapes: list[world.Shape]) -> Image.Image:
    size = rng.choice([120, 150, 200, 256, 300])
    ss = rng.choice([1, 2, 4])
    bg = np.array([rng.uniform(0.9, 1.0)] * 3) if rng.random() < 0.5 else \
        np.array([rng.uniform(0.85, 1.0) for _ in range(3)])
    img = np.ones((size, size, 3)) * bg
    for sh in shapes:
        fx, fy = CENTERS[sh.position]
        cx, cy = (fx + rng.uniform(-0.06, 0.06)) * size, (fy + rng.uniform(-0.06, 0.06)) * size
        r = rng.uniform(0.08, 0.13) * size
        sh.center, sh.radius = (cx / size, cy / size), r / size  # as world.draw_shape records them
        angle = rng.uniform(-0.3, 0.3) if sh.kind in ("square", "triangle", "diamond") else \
            rng.uniform(0, 2 * math.pi)
        cov = mask(sh.kind, cx, cy, r, angle, size, ss, rng)[..., None]
        color = rgb(rng.choice(COLOR_NAMES[sh.color]))
        img = img * (1 - cov) + color * cov
    img = img + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 0.02),
                                                                      img.shape)
    out = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    if rng.random() < 0.4:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=rng.choice([60, 75, 90]))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def random_scene(rng: random.Random, shapes=world.SHAPES, colors=world.COLORS, n: int | None = None,
                 must_include: tuple[str | None, str | None] = (None, None)) -> world.Scene:
    """``world.random_scene``'s scenes (same choices for the same rng), drawn by ``draw``."""
    return world.random_scene(rng, shapes, colors, n, must_include, draw=draw)
