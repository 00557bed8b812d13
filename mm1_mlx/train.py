"""Train an MM1-style model from scratch on shapes world: ``python -m mm1_mlx.train --recipe tiny``.

The command line of ``mm1_mlx/shapes/train.py`` (the recipe, the stages and their state); Ctrl-C
or SIGTERM saves after the current step, and rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from .checkpoint import WEIGHTS_DIR
from .cli import args as cli_args
from .cli.signals import StopRequest
from .errors import MM1Error, cli_errors
from .io.atomic import atomic_dir
from .shapes.train import RECIPES, train


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.train",
                                description="Train an MM1-style model on shapes world.")
    p.add_argument("--recipe", default="tiny", choices=sorted(RECIPES))
    p.add_argument("--run-dir", default=None, help="state and logs (default runs/RECIPE)")
    p.add_argument("--out", default=None, help="final checkpoint (default RUN_DIR/model)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--install", action="store_true",
                   help="also install the result as a bundled model in the package")
    p.add_argument("--pretrain-steps", type=cli_args.non_negative_int)
    p.add_argument("--sft-steps", type=cli_args.non_negative_int)
    p.add_argument("--batch-size", type=cli_args.positive_int)
    p.add_argument("--mix", default=None,
                   help="interleaved,captions,text-only fractions (default 0.45,0.45,0.10)")
    p.add_argument("--save-every", type=cli_args.positive_int, default=100)
    p.add_argument("--seed", type=cli_args.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@cli_errors
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    recipe = RECIPES[args.recipe]()
    for k in ("pretrain_steps", "sft_steps", "batch_size", "seed"):
        if getattr(args, k) is not None:
            setattr(recipe, k, getattr(args, k))
    if args.mix:
        try:
            mix = tuple(float(x) for x in args.mix.split(","))
        except ValueError:
            raise MM1Error(f"--mix takes three numbers, got {args.mix!r}") from None
        if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
            raise MM1Error(f"--mix takes three non-negative fractions, got {args.mix!r}")
        recipe.mix = mix
    run = Path(args.run_dir or f"runs/{args.recipe}")
    out = Path(args.out) if args.out else run / "model"
    t = time.perf_counter()
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(recipe, run, args.save_every, out, quiet=args.quiet, stop=lambda: stop.asked,
              force=args.force)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.asked:
        sys.exit(130)
    print(f"saved {out} in {(time.perf_counter() - t) / 60:.1f} min")
    if args.install:
        dst = WEIGHTS_DIR / recipe.name
        with atomic_dir(dst, "checkpoint", force=True, allow_package=True) as tmp:
            shutil.copytree(out, tmp, dirs_exist_ok=True)
        print(f"installed as {dst}")


if __name__ == "__main__":
    main()
