"""``python -m mm1_mlx.train``: the command line of ``mm1_mlx/shapes/train.py`` (shapes world)."""

from .shapes.train import main, setup_arg_parser

__all__ = ["main", "setup_arg_parser"]

if __name__ == "__main__":
    main()
