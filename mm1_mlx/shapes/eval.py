"""Shapes-world evaluation: per-question-type accuracy on held-out images, and caption F1.

``python -m mm1_mlx.eval --model M [--split test] [--n N]`` prints JSON. Held-out images come from
seeds the training code never uses (training draws from ``"{seed}:{stage}:{step}"`` streams).
"""

from __future__ import annotations

import random
import re

from . import redraw, world

SPLITS = {"test": "heldout-test", "valid": "heldout-valid"}
TYPES = ["color", "shape", "count", "exists", "where", "describe"]
WORDS = {
    "color": world.COLORS + world.NEW_COLORS,
    "shape": world.SHAPES + world.NEW_SHAPES,
    "where": world.POSITIONS,
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def mentioned(text: str, vocab: list[str]) -> set[str]:
    ws = _words(text)
    found = {w for w in ws if w in vocab}
    found |= {w[:-1] for w in ws if w.endswith("s") and w[:-1] in vocab}
    return found


def count_of(text: str) -> set[int]:
    ws = _words(text)
    return {world.NUMBERS.index(w) for w in ws if w in world.NUMBERS} | {int(w) for w in ws
                                                                         if w.isdigit()}


def pairs(text: str, colors=None, shapes=None) -> set[tuple[str, str]]:
    """(colour, shape) pairs named in a description: a colour word followed by a shape word."""
    colors, shapes = colors or WORDS["color"], shapes or WORDS["shape"]
    ws, out = _words(text), set()
    for i, w in enumerate(ws):
        if w in colors:
            for v in ws[i + 1: i + 3]:
                if v in shapes or (v.endswith("s") and v[:-1] in shapes):
                    out.add((w, v.rstrip("s") if v not in shapes else v))
                    break
    return out


def score(kind: str, answer: str, expected: str, scene: world.Scene) -> float:
    """1.0 if the answer says what the expected answer says (and nothing contradicting)."""
    if kind in ("color", "shape", "where"):  # exactly the expected word, nothing else
        return float(mentioned(answer, WORDS[kind]) == mentioned(expected, WORDS[kind]))
    if kind == "count":
        return float(count_of(answer) == {len(scene.shapes)})
    if kind == "exists":
        a = _words(answer)
        return float(bool(a) and a[0] == expected.lower().rstrip("."))
    if kind == "describe":
        return caption_f1(answer, scene)
    raise ValueError(kind)


def caption_f1(answer: str, scene: world.Scene) -> float:
    truth = {(s.color, s.kind) for s in scene.shapes}
    got = pairs(answer)
    if not got:
        return 0.0
    tp = len(truth & got)
    if tp == 0:
        return 0.0
    p, r = tp / len(got), tp / len(truth)
    return 2 * p * r / (p + r)


DRAWINGS = {"ours": world.random_scene, "independent": redraw.random_scene}


def heldout(n: int, seed: str, shapes=None, colors=None, must_include=(None, None),
            drawing: str = "ours"):
    """n held-out scenes, each with one question of every type (targeting ``must_include``).
    ``drawing="independent"`` draws them with ``redraw`` (code the training data never used)."""
    shapes, colors = shapes or world.SHAPES, colors or world.COLORS
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = DRAWINGS[drawing](rng, shapes, colors, must_include=must_include)
        qs = {}
        for _ in range(12):  # draw until each question is about the focus shape, if any
            for kind, q, a in world.questions(rng, scene, shapes, colors):
                focus = must_include[0] or must_include[1]
                if kind not in qs and (focus is None or kind in ("count", "describe")
                                       or focus in q or focus in a):
                    qs[kind] = (q, a)
            if len(qs) == len(TYPES):
                break
        out.append((scene, qs))
    return out


def evaluate(model, processor, n: int = 200, seed: str | int = SPLITS["test"], shapes=None,
             colors=None, must_include=(None, None), max_tokens: int = 48,
             types: list[str] | None = None, failures: int = 5, drawing: str = "ours",
             progress: bool = False) -> dict:
    """Accuracy per question type and overall (caption F1 reported apart), greedy decoding;
    ``progress`` shows a bar of images done on stderr."""
    from tqdm import tqdm

    from ..generate import PromptCache, generate

    types = types or TYPES
    totals = {k: 0.0 for k in types}
    counts = {k: 0 for k in types}
    bad = []
    scenes = heldout(n, str(seed), shapes, colors, must_include, drawing)
    for scene, qs in tqdm(scenes, desc="eval", unit="image", disable=not progress,
                          dynamic_ncols=True):
        cache = PromptCache()
        for kind in types:
            if kind not in qs:
                continue
            q, a = qs[kind]
            reply = generate(model, processor, f"<image>\n{q}", [scene.image],
                             max_tokens=max_tokens, prompt_cache=cache)
            s = score(kind, reply, a, scene)
            totals[kind] += s
            counts[kind] += 1
            if s < 1 and len(bad) < failures:
                bad.append({"question": q, "expected": a, "answer": reply})
    acc = {k: round(100 * totals[k] / counts[k], 2) for k in types if counts[k] and k != "describe"}
    qa = [k for k in acc]
    result = {"accuracy": acc,
              "overall": round(sum(acc[k] * counts[k] for k in qa) / max(1, sum(counts[k] for k in qa)),
                               2),
              "questions": sum(counts[k] for k in qa), "images": n, "seed": str(seed),
              "drawing": drawing}
    if counts.get("describe"):
        result["caption_f1"] = round(100 * totals["describe"] / counts["describe"], 2)
    result["failures"] = bad
    return result
