"""``python -m mm1_mlx.eval``: accuracy on held-out shapes-world questions
(``mm1_mlx/shapes/eval.py``), and with ``--shots`` few-shot accuracy (``mm1_mlx/shapes/fewshot.py``).

    python -m mm1_mlx.eval --model M [--split test] [--n N] [--shots 0,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import args as cli_args
from .errors import MM1Error, cli_errors
from .shapes import fewshot, world
from .shapes.eval import DRAWINGS, SPLITS, evaluate


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.eval",
                                description="Evaluate a model on held-out shapes-world questions.")
    p.add_argument("--model", default=None, help="checkpoint (default mm1-tiny)")
    p.add_argument("--adapter-path", "--adapter", dest="adapter", default=None,
                   help="LoRA adapter directory")
    p.add_argument("--split", default="test", choices=sorted(SPLITS))
    p.add_argument("--n", type=cli_args.positive_int, default=200,
                   help="held-out images (6 questions each)")
    p.add_argument("--new-concepts", action="store_true",
                   help="questions about the LoRA demo's teal/hexagon instead")
    p.add_argument("--drawing", default="ours", choices=sorted(DRAWINGS),
                   help="independent: images drawn by other code (mm1_mlx.shapes.redraw), "
                        "for robustness")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    fewshot.add_arguments(p)
    return p


@cli_errors
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.shots is not None and (args.new_concepts or args.drawing != "ours"):
        raise MM1Error("--shots takes neither --new-concepts nor --drawing independent")
    from .checkpoint import load

    model, processor = load(args.model, adapter_path=args.adapter, progress=not args.quiet)
    if args.shots is None:
        result = zero_shot(model, processor, args)
    else:
        result = fewshot.evaluate_fewshot(model, processor, args.n, SPLITS[args.split],
                                          args.shots, progress=not args.quiet)
    result["model"] = args.model or "mm1-tiny"
    json.dump(result, sys.stdout, indent=2)
    print()


def zero_shot(model, processor, args) -> dict:
    """Accuracy per question type on the split (or on the new concepts, or redrawn scenes)."""
    kw = {}
    if args.new_concepts:
        kw = dict(shapes=world.SHAPES + world.NEW_SHAPES, colors=world.COLORS + world.NEW_COLORS,
                  must_include=(world.NEW_SHAPES[0], world.NEW_COLORS[0]))
    return evaluate(model, processor, n=args.n, seed=SPLITS[args.split], drawing=args.drawing,
                    progress=not args.quiet, **kw)


if __name__ == "__main__":
    main()
