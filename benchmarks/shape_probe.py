"""Can a model's image encoder tell two shapes apart? A linear probe on its features.

    python -m benchmarks.shape_probe [--model mm1-tiny] [--adapter-path DIR] [--n 400]
        [--pairs circle:hexagon,circle:square,circle:star] [--drawing independent]

Draws ``--n`` one-shape scenes per pair (half of each shape, colours and places at random, by
``mm1_mlx.shapes.redraw`` unless ``--drawing ours``), encodes them, and fits a ridge classifier on
(a) the ViT's patch features and (b) the connector's image tokens, each max- and mean-pooled over
positions. Accuracy is 5-fold cross-validated; the ridge strength is chosen inside each training
fold (4-fold), never on the fold scored. Near 100%: the features carry the difference and the
decoder only has to learn to read it; near 50%: the encoder does not see it, and no decoder-side
training can recover it.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)
from mm1_mlx.cli import args as cli_args
from mm1_mlx.errors import MM1Error, cli_errors

LAMBDAS = (1.0, 10.0, 100.0, 1000.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float):
    """Standardize, then ridge regression onto +-1 labels in its dual form (few samples, many
    features): (mean, scale, weights)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    alpha = np.linalg.solve(z @ z.T + lam * np.eye(len(z)), 2.0 * y - 1.0)
    return mu, sd, z.T @ alpha


def ridge_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    mu, sd, w = model
    predicted = ((x - mu) / sd @ w > 0).astype(int)
    return float((predicted == y).mean())


def folds(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def fold_score(x: np.ndarray, y: np.ndarray, test: np.ndarray, lam: float) -> float:
    """Accuracy on the rows ``test`` of a ridge classifier fitted on the other rows."""
    train = np.setdiff1d(np.arange(len(y)), test)
    return ridge_accuracy(ridge_fit(x[train], y[train], lam), x[test], y[test])


def cross_validate(x: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    """k-fold accuracy of a ridge classifier whose strength is picked within each training fold
    (4-fold), never on the fold it is scored on."""
    scores = []
    for test in folds(len(y), k):
        train = np.setdiff1d(np.arange(len(y)), test)
        xt, yt, inner = x[train], y[train], folds(len(train), 4, seed=1)
        lam = max(LAMBDAS, key=lambda lam: np.mean([fold_score(xt, yt, f, lam) for f in inner]))
        scores.append(fold_score(x, y, test, lam))
    return float(np.mean(scores))


def scenes(pair: tuple[str, str], n: int, drawing: str, seed: int = 7):
    """n one-shape images, alternately of each shape in ``pair``; their labels 0 / 1."""
    from mm1_mlx.shapes import world
    from mm1_mlx.shapes.eval import DRAWINGS

    rng, images = random.Random(f"{seed}:{pair}"), []
    colors = world.COLORS + world.NEW_COLORS
    for i in range(n):
        images.append(DRAWINGS[drawing](rng, [pair[i % 2]], colors, n=1).image)
    return images, np.arange(n) % 2


def features(model, processor, images) -> dict[str, np.ndarray]:
    """Pooled ViT patch features and connector image tokens of each image."""
    import mlx.core as mx

    vit, tokens = [], []
    for im in images:
        px = mx.array(processor.prepare_image(im, max_tiles=1).pixels)
        v = model.vision_tower(px.astype(model.vision_tower.dtype))
        t = model.connector(v)
        vit.append(np.array(v.astype(mx.float32))[0])
        tokens.append(np.array(t.astype(mx.float32))[0])
    vit, tokens = np.stack(vit), np.stack(tokens)
    return {"ViT patches, max": vit.max(1), "ViT patches, mean": vit.mean(1),
            "image tokens, max": tokens.max(1), "image tokens, mean": tokens.mean(1)}


def probe(model, processor, pairs, n: int, drawing: str) -> dict:
    out = {}
    for pair in pairs:
        images, y = scenes(pair, n, drawing)
        out[":".join(pair)] = {name: round(100 * cross_validate(x, y), 1)
                               for name, x in features(model, processor, images).items()}
    return out


def pair_list(text: str) -> list[tuple[str, str]]:
    from mm1_mlx.shapes import world

    known = world.SHAPES + world.NEW_SHAPES
    pairs = [tuple(p.split(":")) for p in text.split(",")]
    bad = [":".join(p) for p in pairs if len(p) != 2 or not set(p) <= set(known) or p[0] == p[1]]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(bad)}: each pair is two different shapes "
                                         f"of {', '.join(known)}, e.g. circle:hexagon")
    return pairs


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m benchmarks.shape_probe",
                                description="Linear probe: does the image encoder tell two "
                                            "shapes apart?")
    p.add_argument("--model", default="mm1-tiny")
    p.add_argument("--adapter-path", default=None, help="LoRA adapters to apply first")
    p.add_argument("--pairs", type=pair_list, default=pair_list("circle:hexagon,circle:square,"
                                                                "circle:star"))
    p.add_argument("--n", type=cli_args.int_range(20, 5000), default=400,
                   help="images per pair (default 400)")
    p.add_argument("--drawing", default="independent", choices=["independent", "ours"],
                   help="scenes drawn by mm1_mlx.shapes.redraw (default) or the training renderer")
    return p


@cli_errors
def main(argv=None) -> dict:
    a = setup_arg_parser().parse_args(argv)
    from mm1_mlx.checkpoint import load

    model, processor = load(a.model, adapter_path=a.adapter_path)
    if not hasattr(model, "vision_tower") or model.vision_tower is None:
        raise MM1Error(f"{a.model}: no image encoder to probe")
    result = probe(model, processor, a.pairs, a.n, a.drawing)
    cols = list(next(iter(result.values())))
    print(f"| pair ({a.n} images, 5-fold) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for pair, accs in result.items():
        print(f"| {pair} | " + " | ".join(f"{accs[c]:.1f}" for c in cols) + " |")
    print(json.dumps({"model": a.model, "adapter_path": a.adapter_path, "n": a.n,
                      "drawing": a.drawing, "accuracy": result}))
    return result


if __name__ == "__main__":
    main()
