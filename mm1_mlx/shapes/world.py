"""Shapes world: procedurally drawn images of coloured shapes and text about them, by seed.

Four kinds of sample, as in MM1's pre-training mix plus SFT: captions, interleaved image-text
documents, text-only sentences, and instruction conversations. Colours are drawn from several
common palettes (CSS, matplotlib, hand-picked) with jitter in hue, saturation and brightness, so a
clearly red shape is "red" whoever drew it. "hexagon" and "teal" never occur here: they are kept for
the LoRA demonstration (``extra_shapes`` / ``extra_colors`` turn them on).
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["circle", "square", "triangle", "star", "diamond"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
NEW_SHAPES = ["hexagon"]
NEW_COLORS = ["teal"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
SLOTS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8),
         "center": (0.5, 0.5)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom", "center": "in the center"}
NUMBERS = ["zero", "one", "two", "three", "four", "five"]

PALETTES = {
    "red": ["#ff0000", "#dc1e1e", "#d62728", "#e41a1c", "#dc143c", "#c81e1e", "#f03232"],
    "orange": ["#ffa500", "#ff7f0e", "#ff8c00", "#f58c14", "#fa9600", "#ff7518"],
    "yellow": ["#ffff00", "#ffd700", "#f0d21e", "#ffe119", "#fadc32", "#ffeb3b"],
    "green": ["#008000", "#00ff00", "#2ca02c", "#28a03c", "#3cb44b", "#228b22", "#32cd32"],
    "blue": ["#0000ff", "#1f77b4", "#4363d8", "#2850dc", "#1e90ff", "#4169e1", "#0050c8"],
    "purple": ["#800080", "#9467bd", "#911eb4", "#8a2be2", "#9932cc", "#6a0dad", "#7b3fa0"],
    "pink": ["#ffc0cb", "#ff69b4", "#e377c2", "#f078b4", "#ff1493", "#ffb6c1", "#f5a0c8"],
    "brown": ["#a52a2a", "#8b4513", "#8c564b", "#825028", "#a0522d", "#964b00", "#6f4e37"],
    "teal": ["#008080", "#17becf", "#20b2aa", "#009688", "#00a0a0", "#2a9d8f"],
}


@dataclass
class Shape:
    kind: str
    color: str
    position: str
    center: tuple[float, float] | None = None  # where it was drawn, as fractions of the image
    radius: float | None = None

    @property
    def phrase(self) -> str:
        return f"{article(self.color)} {self.color} {self.kind} {WHERE[self.position]}"


@dataclass
class Scene:
    shapes: list[Shape]
    image: Image.Image


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _hex(c: str) -> tuple[float, float, float]:
    return tuple(int(c[i:i + 2], 16) / 255 for i in (1, 3, 5))


def jitter_color(rng: random.Random, name: str) -> tuple[int, int, int]:
    r, g, b = _hex(rng.choice(PALETTES[name]))
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    h = (h + rng.uniform(-0.02, 0.02)) % 1.0
    s = min(1.0, s * rng.uniform(0.85, 1.1))
    v = min(1.0, v * rng.uniform(0.85, 1.08))
    return tuple(int(round(x * 255)) for x in colorsys.hsv_to_rgb(h, s, v))


def background(rng: random.Random, size: int) -> Image.Image:
    h, s, v = rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.88, 1.0)
    base = tuple(int(x * 255) for x in colorsys.hsv_to_rgb(h, s, v))
    img = Image.new("RGB", (size, size), base)
    if rng.random() < 0.3:  # a soft vertical gradient
        d = ImageDraw.Draw(img)
        delta = rng.uniform(-0.06, 0.06)
        for y in range(size):
            f = 1 + delta * (y / size - 0.5)
            d.line([(0, y), (size, y)], fill=tuple(min(255, int(c * f)) for c in base))
    return img


def polygon(kind: str, cx: float, cy: float, r: float, angle: float, aspect: float):
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * math.sqrt(2) * 0.8, y * math.sqrt(2) * 0.8) for x, y in pts]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3
                                                    for k in range(3))]
        pts = [(1.15 * x, 1.15 * (y + 0.2)) for x, y in pts]
    elif kind == "diamond":
        pts = [(0, -1), (aspect, 0), (0, 1), (-aspect, 0)]
    elif kind == "star":
        inner = 0.38 + 0.1 * (aspect - 0.55) / 0.2
        pts = [((1 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5))
               for k in range(10)]
    elif kind == "hexagon":
        pts = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, shape: Shape, size: int,
               scale: int) -> None:
    fx, fy = SLOTS[shape.position]
    cx = (fx + rng.uniform(-0.05, 0.05)) * size * scale
    cy = (fy + rng.uniform(-0.05, 0.05)) * size * scale
    r = rng.uniform(0.09, 0.14) * size * scale
    shape.center, shape.radius = (cx / (size * scale), cy / (size * scale)), r / (size * scale)
    fill = jitter_color(rng, shape.color)
    outline = None
    if rng.random() < 0.15:  # a darker outline, as some drawing code adds
        outline = tuple(int(c * 0.6) for c in fill)
    width = max(1, int(r * 0.08))
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
        return
    limits = {"square": 0.35, "triangle": 0.4, "diamond": 0.25, "star": math.pi, "hexagon": math.pi}
    angle = rng.uniform(-limits[shape.kind], limits[shape.kind])
    aspect = rng.uniform(0.55, 0.75)
    draw.polygon(polygon(shape.kind, cx, cy, r, angle, aspect), fill=fill, outline=outline,
                 width=width if outline else 1)


def render(rng: random.Random, shapes: list[Shape], size: int | None = None) -> Image.Image:
    size = size or rng.choice([96, 112, 128, 160, 192, 224])
    aa = rng.random() < 0.7
    scale = 3 if aa else 1
    img = background(rng, size)
    big = img.resize((size * scale, size * scale)) if aa else img
    draw = ImageDraw.Draw(big)
    for s in shapes:
        draw_shape(draw, rng, s, size, scale)
    img = big.resize((size, size), Image.BOX) if aa else big
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return img


def random_scene(rng: random.Random, shapes=SHAPES, colors=COLORS, n: int | None = None,
                 must_include: tuple[str | None, str | None] = (None, None), draw=render) -> Scene:
    """1-4 shapes, each of a distinct kind and colour, in distinct positions, drawn by ``draw``."""
    n = n or rng.randint(1, 4)
    kinds = rng.sample(list(shapes), n)
    cols = rng.sample(list(colors), n)
    kind, color = must_include
    if kind is not None and kind not in kinds:
        kinds[0] = kind
    if color is not None and color not in cols:
        cols[0] = color
    spots = rng.sample(POSITIONS, n)
    objs = [Shape(k, c, p) for k, c, p in zip(kinds, cols, spots)]
    objs.sort(key=lambda s: POSITIONS.index(s.position))
    return Scene(objs, draw(rng, objs))


def slot_labels(scene: Scene, shapes=SHAPES, colors=COLORS) -> tuple[list[int], list[int]]:
    """Per position slot (``POSITIONS`` order): 1 + shape index and 1 + colour index, 0 if empty."""
    kinds, cols = [0] * len(POSITIONS), [0] * len(POSITIONS)
    for s in scene.shapes:
        k = POSITIONS.index(s.position)
        kinds[k], cols[k] = 1 + list(shapes).index(s.kind), 1 + list(colors).index(s.color)
    return kinds, cols


def token_labels(scene: Scene, side: int, shapes=SHAPES, colors=COLORS, samples: int = 6,
                 min_cover: float = 0.08) -> tuple[list[int], list[int]]:
    """Per cell of a side x side grid (row-major): 1 + shape index and 1 + colour index of the
    shape covering most of the cell (its disc, sampled at samples^2 points), 0 below min_cover."""
    kinds, cols = [0] * (side * side), [0] * (side * side)
    offsets = [(i + 0.5) / samples for i in range(samples)]
    for row in range(side):
        for col in range(side):
            best, best_n = None, min_cover * samples * samples
            for s in scene.shapes:
                (cx, cy), r = s.center, s.radius
                n = sum((((col + u) / side - cx) ** 2 + ((row + v) / side - cy) ** 2) <= r * r
                        for u in offsets for v in offsets)
                if n >= best_n:
                    best, best_n = s, n
            if best is not None:
                k = row * side + col
                kinds[k] = 1 + list(shapes).index(best.kind)
                cols[k] = 1 + list(colors).index(best.color)
    return kinds, cols


def caption(scene: Scene) -> str:
    phrases = [s.phrase for s in scene.shapes]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def by_shape(scene: Scene) -> list[Shape]:
    return sorted(scene.shapes, key=lambda s: SHAPES.index(s.kind) if s.kind in SHAPES else 99)


def shape_caption(scene: Scene) -> str:
    """The caption's facts keyed by shape, in a fixed shape order: "The circle is red and on the
    left." Reading a colour or place *from* a named shape is what "What color is the star?" needs;
    colour-first captions only ever teach reading a shape from a colour or a place."""
    return " ".join(f"The {s.kind} is {s.color} and {WHERE[s.position]}." for s in by_shape(scene))


def shape_tags(scene: Scene) -> str:
    """Alt-text style tags, "star blue top, circle red left.": each colour straight after its
    shape word. A small decoder learns to look a colour up at the shape word itself quickly; it
    does not learn the two-step lookup ("The star is" -> red) until it has that first step."""
    return ", ".join(f"{s.kind} {s.color} {s.position}" for s in by_shape(scene)) + "."


DESCRIPTIONS = {"caption": 0.5, "sentences": 0.25, "tags": 0.25}  # pre-training description forms


def describe(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """(form, text) of a pre-training description: the caption, its shape-keyed sentences, or
    tags, drawn with the weights in ``DESCRIPTIONS``."""
    form = rng.choices(list(DESCRIPTIONS), weights=list(DESCRIPTIONS.values()))[0]
    text = {"caption": caption, "sentences": shape_caption, "tags": shape_tags}[form](scene)
    return form, text


def count_text(n: int) -> str:
    return f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n != 1 else ''}."


def questions(rng: random.Random, scene: Scene, shapes=SHAPES, colors=COLORS
              ) -> list[tuple[str, str, str]]:
    """(question type, question, answer) triples answerable from the scene."""
    s = rng.choice(scene.shapes)
    qs = [
        ("color", f"What color is the {s.kind}?", f"The {s.kind} is {s.color}."),
        ("shape", f"What shape is the {s.color} one?", f"It is {article(s.kind)} {s.kind}."),
        ("count", "How many shapes are there?", count_text(len(scene.shapes))),
        ("where", f"Where is the {s.kind}?", f"The {s.kind} is {WHERE[s.position]}."),
        ("describe", "Describe the image.", caption(scene)),
    ]
    present = {(x.color, x.kind) for x in scene.shapes}
    if rng.random() < 0.5:
        c, k = s.color, s.kind
    else:  # hard negatives: right colour wrong shape, or right shape wrong colour
        while True:
            c = rng.choice([s.color, rng.choice(list(colors))])
            k = rng.choice([s.kind, rng.choice(list(shapes))])
            if (c, k) not in present:
                break
    qs.append(("exists", f"Is there {article(c)} {c} {k}?", "Yes." if (c, k) in present else "No."))
    return qs


def conversation(rng: random.Random, scene: Scene, turns: int = 1, shapes=SHAPES, colors=COLORS):
    qs = questions(rng, scene, shapes, colors)
    chosen = rng.sample(qs, turns)
    msgs = []
    for i, (_, q, a) in enumerate(chosen):
        q = f"<image>\n{q}" if i == 0 else q
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def interleaved(rng: random.Random) -> tuple[str, list[Image.Image]]:
    """A short document about 2-3 pictures, comparing them."""
    scenes = [random_scene(rng) for _ in range(rng.randint(2, 3))]
    ordinals = ["first", "second", "third"]
    parts = []
    for i, sc in enumerate(scenes):
        form, body = describe(rng, sc)
        intro = rng.choice({
            "caption": [f"The {ordinals[i]} picture shows", f"Picture {i + 1} has",
                        f"In the {ordinals[i]} image we see"],
            "sentences": [f"In the {ordinals[i]} picture,", f"In picture {i + 1},"],
            "tags": [f"Tags of picture {i + 1}:", f"The {ordinals[i]} picture is tagged"],
        }[form])
        parts.append(f"<image>\n{intro} {body[0].lower()}{body[1:]}")
    a, b = rng.sample(range(len(scenes)), 2)
    na, nb = len(scenes[a].shapes), len(scenes[b].shapes)
    if na == nb:
        cmp = f"The {ordinals[a]} and {ordinals[b]} pictures have the same number of shapes."
    else:
        more = "more" if na > nb else "fewer"
        cmp = f"The {ordinals[a]} picture has {more} shapes than the {ordinals[b]} one."
    shared = {s.color for s in scenes[a].shapes} & {s.color for s in scenes[b].shapes}
    if shared:
        cmp += f" Both have something {sorted(shared)[0]}."
    return " ".join(parts) + " " + cmp, [sc.image for sc in scenes]


TEXT_FACTS = [
    "A square has four equal sides.", "A triangle has three sides and three corners.",
    "A circle is round and has no corners.", "A star has five points.",
    "A diamond looks like a square standing on one corner.", "Red and yellow make orange.",
    "Blue and yellow make green.", "Red and blue make purple.", "Pink is a light red.",
    "Brown is a dark orange.", "The sky is blue.", "Grass is green.", "Bananas are yellow.",
    "One plus one is two.", "Two plus one is three.", "Two plus two is four.",
    "Three plus one is four.", "Left is the opposite of right.", "Top is the opposite of bottom.",
    "The center is in the middle.", "Shapes can be big or small.",
]


def text_only(rng: random.Random) -> str:
    n = rng.randint(1, 3)
    if rng.random() < 0.5:
        return " ".join(rng.sample(TEXT_FACTS, n))
    k, c = rng.choice(SHAPES), rng.choice(COLORS)
    p = rng.choice(POSITIONS)
    return f"Imagine {article(c)} {c} {k} {WHERE[p]}. It is a {k} and its color is {c}."


def pretrain_sample(rng: random.Random, mix: tuple[float, float, float]):
    """(kind, text with <image> placeholders, images): interleaved / caption / text-only."""
    r = rng.random() * sum(mix)
    if r < mix[0]:
        text, imgs = interleaved(rng)
        return "interleaved", text, imgs
    if r < mix[0] + mix[1]:
        sc = random_scene(rng)
        return "caption", "<image>\n" + describe(rng, sc)[1], [sc.image]
    return "text", text_only(rng), []


def sft_sample(rng: random.Random):
    sc = random_scene(rng)
    turns = rng.choice([1, 1, 2, 3])
    return conversation(rng, sc, turns), [sc.image]


def corpus_text(rng: random.Random, n: int = 3000) -> list[str]:
    """Text for training the tokenizer (new words included so they split into few pieces)."""
    out = []
    for _ in range(n):
        _, text, _ = pretrain_sample(rng, (0.4, 0.4, 0.2))
        out.append(text)
        msgs, _ = sft_sample(rng)
        out.extend(m["content"] for m in msgs)
    out += [f"{article(c)} {c} {k}" for c in COLORS + NEW_COLORS for k in SHAPES + NEW_SHAPES]
    return out
