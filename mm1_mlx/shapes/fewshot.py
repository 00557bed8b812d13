"""Few-shot evaluation on shapes world: K solved examples, then the test question, as one
interleaved multi-image prompt (MM1 scores its models 0-, 4- and 8-shot this way).

Tasks are short-answer questions whose *format* only the examples show: the answer is one word
("blue", "star", "left"), and a count is written as a digit ("3": a label mapping; the model's own
answers spell numbers out). ``exact`` scores that format; ``lenient`` is ``eval.score`` (the facts,
whatever the wording), so both what the context taught and what the model knows are reported.
Pre-trained (not chat) models get the same examples as raw text, ``caption`` included.

No leakage, by construction and checked by ``check_context``: the examples come from a pool of
scenes drawn from their own seed (``POOL_SEED``, apart from the test splits and from training's
``"{seed}:{stage}:{step}"`` streams), never hold the test image (by pixel hash), and never have the
test's answer (so copying an example's answer cannot score). ``exists`` is left out: a yes/no
context without the test's answer would hold only the wrong one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..cli import args as cli_args
from ..generate import prefill
from ..images import pixel_hash
from . import eval as shapes_eval
from . import world

POOL_SEED = "fewshot-pool"
KINDS = ("color", "shape", "count", "where")
SHOTS = (0, 2, 4, 8)
QA_TEMPLATE = "Question: {q} Answer:"  # the raw-text form for pre-trained models


@dataclass
class Item:
    """One solved question about one scene (``kind`` "caption" has no question)."""

    scene: world.Scene
    kind: str
    question: str
    answer: str  # the short answer (the format the examples show)
    full: str  # the answer as the training data writes it
    key: str  # pixel hash of the image


def short_answer(kind: str, full: str, scene: world.Scene) -> str:
    """"The star is blue." -> "blue"; counts as digits ("3")."""
    if kind == "count":
        return str(len(scene.shapes))
    if kind == "caption":
        return full
    (word,) = shapes_eval.mentioned(full, shapes_eval.WORDS[kind])
    return word


def items(n: int, seed: str, kinds=KINDS) -> list[Item]:
    """n scenes drawn from ``seed``, one item of each kind per scene."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = world.random_scene(rng)
        found = {k: (q, a) for k, q, a in world.questions(rng, scene)}
        found["caption"] = ("", world.caption(scene))
        key = pixel_hash(scene.image)
        out += [Item(scene, k, found[k][0], short_answer(k, found[k][1], scene), found[k][1], key)
                for k in kinds]
    return out


def choose_context(item: Item, pool: list[Item], k: int, rng: random.Random) -> list[Item]:
    """k pool items of the test's kind, with another image and another answer."""
    ok = [p for p in pool if p.kind == item.kind and p.key != item.key and p.answer != item.answer]
    if len(ok) < k:
        raise ValueError(f"the pool has {len(ok)} usable {item.kind} examples, {k} asked")
    return rng.sample(ok, k)


def check_context(item: Item, context: list[Item]) -> None:
    """Raise if an example holds the test image or the test answer."""
    for c in context:
        if c.key == item.key or pixel_hash(c.scene.image) == item.key:
            raise AssertionError("a context example holds the test image")
        if c.answer == item.answer or c.full == item.full:
            raise AssertionError("a context example holds the test answer")


def chat_prompt(context: list[Item], item: Item) -> tuple[list[dict], list]:
    """Chat messages (one user/assistant turn per example) and their images, in order."""
    msgs = []
    for c in context:
        msgs += [{"role": "user", "content": f"<image>\n{c.question}"},
                 {"role": "assistant", "content": c.answer}]
    msgs.append({"role": "user", "content": f"<image>\n{item.question}"})
    return msgs, [c.scene.image for c in context] + [item.scene.image]


def raw_prompt(context: list[Item], item: Item) -> tuple[str, list]:
    """Text for a pre-trained model: "<image>\\nQuestion: .. Answer: blue" per example (captions
    as "<image>\\nA red circle ..."), the parts joined as interleaved documents join them."""
    def part(x: Item, solved: bool) -> str:
        if x.kind == "caption":
            return "<image>\n" + (x.answer if solved else "")
        qa = QA_TEMPLATE.format(q=x.question)
        return f"<image>\n{qa} {x.answer}." if solved else f"<image>\n{qa}"

    text = " ".join([part(c, True) for c in context] + [part(item, False)])
    return text, [c.scene.image for c in context] + [item.scene.image]


def complete(model, processor, text: str, images: list, max_tokens: int) -> str:
    """Greedy continuation of raw ``text`` (no chat template): its first line and sentence (an
    example ends at its period; what follows would be the next example)."""
    prepared = [processor.prepare_image(im, max_tiles=1) for im in images]
    ids = processor.tokenize(text, prepared)
    feats = None
    if prepared:
        pixels = mx.array(np.concatenate([p.pixels for p in prepared]))
        feats = model.encode_images(pixels).reshape(-1, model.config.text_config.hidden_size)
    kv = make_prompt_cache(model.language_model)
    logits = prefill(model, ids, feats, 0, kv, processor.image_token_id)
    banned = [processor.image_token_id, processor.tokenizer.pad_token_id]
    stop = {processor.tokenizer.eos_token_id}
    out: list[int] = []
    while len(out) < max_tokens:
        scores = logits[0, -1]
        scores[mx.array([t for t in banned if t is not None])] = -mx.inf
        tok = int(mx.argmax(scores).item())
        if tok in stop:
            break
        out.append(tok)
        said = processor.tokenizer.decode(out)
        if "\n" in said or "." in said:
            break
        logits = model(mx.array([[tok]]), cache=kv)
    return processor.tokenizer.decode(out).split("\n")[0].split(".")[0].strip() + "."


def exact(reply: str, answer: str) -> float:
    """1.0 if the reply is the short answer itself (case, spaces and a final period aside)."""
    return float(reply.strip().rstrip(".").strip().lower() == answer.lower())


def first_sentence(text: str) -> str:
    return text.split(".")[0].strip()


def score_item(item: Item, reply: str) -> dict:
    """{"exact", "lenient"} for a question; {"f1"} (the first sentence) for a caption."""
    if item.kind == "caption":
        return {"f1": shapes_eval.caption_f1(first_sentence(reply), item.scene)}
    return {"exact": exact(reply, item.answer),
            "lenient": shapes_eval.score(item.kind, reply, item.full, item.scene)}


def run_items(model, processor, tests: list[Item], pool: list[Item], shots: int, chat: bool,
              max_tokens: int = 24, progress: bool = False) -> list[dict]:
    """Score every test item with ``shots`` examples; one record per item (kind, reply, scores)."""
    from tqdm import tqdm

    from ..generate import generate

    records = []
    for i, item in enumerate(tqdm(tests, desc=f"{shots}-shot", disable=not progress,
                                  dynamic_ncols=True)):
        context = choose_context(item, pool, shots, random.Random(f"{POOL_SEED}:{shots}:{i}"))
        check_context(item, context)
        if chat:
            msgs, images = chat_prompt(context, item)
            reply = generate(model, processor, msgs, images, max_tokens=max_tokens)
        else:
            text, images = raw_prompt(context, item)
            reply = complete(model, processor, text, images, max_tokens)
        records.append({"kind": item.kind, "reply": reply, "answer": item.answer,
                        **score_item(item, reply)})
    return records


# ---- 95% intervals ----
def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (0..1), sound at 0 and n successes."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (2.5th and 97.5th)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return 0.0, 0.0
    means = v[np.random.default_rng(seed).integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(records: list[dict], metric: str, binary: bool | None = None) -> dict:
    """Mean (percent) and its 95% interval: Wilson for 0/1 scores (``binary``; by default when
    every value is 0 or 1), bootstrap for graded ones (F1, averages)."""
    vals = [r[metric] for r in records if metric in r]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0}
    if binary is None:
        binary = all(v in (0.0, 1.0) for v in vals)
    lo, hi = wilson(sum(vals), len(vals)) if binary else bootstrap(vals)
    return {"mean": round(100 * sum(vals) / len(vals), 2),
            "ci95": [round(100 * lo, 2), round(100 * hi, 2)], "n": len(vals),
            "interval": "wilson" if binary else "bootstrap"}


# ---- the command line's part (``python -m mm1_mlx.eval --shots 0,2,4,8``) ----
shots_list = cli_args.int_list(0, 16)  # "0,2,4,8"


def add_arguments(p) -> None:
    p.add_argument("--shots", type=shots_list, default=None,
                   help="few-shot: K solved examples (from a separate pool) before each question, "
                        "e.g. 0,2,4,8; answers scored exactly (one word, counts as digits) and "
                        "leniently, with 95%% intervals")


def evaluate_fewshot(model, processor, n: int, seed: str, shots: list[int], chat: bool = True,
                     kinds=KINDS, progress: bool = False) -> dict:
    """Accuracy (exact and lenient, with 95% Wilson intervals, per kind) at each K in ``shots``."""
    tests = items(n, seed, kinds)
    pool = items(max(64, 2 * max(shots)), POOL_SEED, kinds)
    out = {}
    for k in shots:
        records = run_items(model, processor, tests, pool, k, chat, progress=progress)
        out[str(k)] = {
            "exact": summarize(records, "exact"), "lenient": summarize(records, "lenient"),
            "per_kind": {kind: summarize([r for r in records if r["kind"] == kind], "exact")["mean"]
                         for kind in kinds},
            "examples": records[:3]}
    return {"shots": out, "images": n, "questions": len(tests), "seed": seed,
            "pool_seed": POOL_SEED, "kinds": list(kinds)}
