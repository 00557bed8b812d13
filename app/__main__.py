"""``python -m app [--model PATH_OR_REPO] [--adapter PATH]`` / ``mm1-chat``: the terminal chat UI."""

from __future__ import annotations

import argparse

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)
from mm1_mlx import cli_args
from mm1_mlx.errors import cli_errors


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="mm1-chat", description="Chat with an MM1 model about images.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, bundled model name or hub id (default mm1-tiny)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory")
    p.add_argument("--data-dir", default=None,
                   help="where conversations and images are kept (default: the user data directory, "
                        "or $MM1_CHAT_DATA_DIR)")
    return p


@cli_errors
def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    # textual-image asks the terminal about graphics support; it must do so before Textual starts
    import textual_image.widget  # noqa: F401

    from .app import ChatApp

    ChatApp(args.model, args.adapter, data_dir=args.data_dir).run()


if __name__ == "__main__":
    main()
