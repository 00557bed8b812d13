"""``python -m app [--model PATH_OR_REPO] [--adapter-path PATH]`` / ``mm1-chat``: the terminal chat UI.

The sampling flags (mlx-lm's ``chat`` spellings) override the saved settings for this session.
``--server URL`` chats through a running ``mm1-server`` (or any OpenAI-compatible server) instead."""

from __future__ import annotations

import argparse

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)
from mm1_mlx.cli import args as cli_args
from mm1_mlx.errors import cli_errors


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m app",
                                description="Chat with an MM1 model about images (also: mm1-chat).")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, bundled model name or hub id (default mm1-tiny)")
    p.add_argument("--adapter-path", "--adapter", dest="adapter", default=None,
                   help="LoRA adapter directory")
    p.add_argument("--temperature", "--temp", dest="temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=None)
    p.add_argument("--system-prompt", "--system", dest="system_prompt", default=None)
    p.add_argument("--server", default=None, metavar="URL",
                   help="chat through a running server (e.g. http://127.0.0.1:8080) instead of "
                        "loading a model here")
    p.add_argument("--api-key", default=None, help="the server's API key (with --server)")
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
    from .engine import load_engine

    given = {k: getattr(args, k) for k in ("temperature", "top_p", "max_tokens", "system_prompt")
             if getattr(args, k) is not None}
    loader = load_engine
    if args.server:  # the model lives in the server; "loading" connects to it
        from .server_engine import ServerEngine

        def loader(spec, adapter):
            return ServerEngine(args.server, args.api_key)

    ChatApp(args.model, args.adapter, loader=loader, data_dir=args.data_dir, settings=given).run()


if __name__ == "__main__":
    main()
