"""``python -m mm1_mlx.eval``: the command line of ``mm1_mlx/shapes/eval.py`` (shapes world)."""

from .shapes.eval import main, setup_arg_parser

__all__ = ["main", "setup_arg_parser"]

if __name__ == "__main__":
    main()
