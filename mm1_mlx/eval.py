"""``python -m mm1_mlx.eval``: the command line of ``mm1_mlx/shapes/eval.py`` (shapes world), and
with ``--shots`` of ``mm1_mlx/shapes/fewshot.py`` (few-shot accuracy)."""

from __future__ import annotations

import json
import sys

from .errors import MM1Error, cli_errors
from .shapes import eval as shapes_eval
from .shapes import fewshot


def setup_arg_parser():
    p = shapes_eval.setup_arg_parser()
    fewshot.add_arguments(p)
    return p


@cli_errors
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.shots is None:
        return shapes_eval.run(args)
    if args.new_concepts or args.drawing != "ours":
        raise MM1Error("--shots takes neither --new-concepts nor --drawing independent")
    from .checkpoint import load

    model, processor = load(args.model, adapter_path=args.adapter, progress=not args.quiet)
    result = fewshot.evaluate_fewshot(model, processor, args.n, shapes_eval.SPLITS[args.split],
                                      args.shots, progress=not args.quiet)
    result["model"] = args.model or "mm1-tiny"
    json.dump(result, sys.stdout, indent=2)
    print()


__all__ = ["main", "setup_arg_parser"]

if __name__ == "__main__":
    main()
