"""``python -m mm1_mlx.server --model M [--adapter-path A] [--host 127.0.0.1] [--port 8080]`` /
``mm1-server``: serve a model through OpenAI's chat-completions API (see ``mm1_mlx/server``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)

from ..cli import args as cli_args
from ..errors import MM1Error, cli_errors
from ..images import DEFAULT_MAX_PIXELS


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.server",
                                description="OpenAI-compatible chat server for an MM1 model.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, bundled model name or hub id (default mm1-tiny)")
    p.add_argument("--adapter-path", "--adapter", dest="adapter_path", default=None,
                   help="LoRA adapter directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="requests decoding at once (bounds KV-cache memory; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot; more are answered 429 (default 64)")
    p.add_argument("--prompt-cache-bytes", type=int, default=1 << 30,
                   help="memory for reused image features and KV prefixes (default 1 GiB)")
    p.add_argument("--prefill-step-size", type=int, default=512,
                   help="prompt tokens per prefill chunk; running streams wait at most one chunk")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    p.add_argument("--temperature", "--temp", dest="temperature", type=float, default=0.0,
                   help="default temperature of a request (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="default top_p of a request")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt for requests that bring none")
    p.add_argument("--allow-local-images", metavar="DIR", default=None,
                   help="accept image paths (and file:// URLs) inside DIR; refused by default")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels (default 50M)")
    p.add_argument("--max-body-bytes", type=int, default=64 << 20,
                   help="request body cap in bytes; larger bodies get 413 (default 64 MiB)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queue included (default 600)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _check(args) -> None:
    for name in ("max_concurrency", "max_queue", "prefill_step_size", "max_tokens", "max_images",
                 "max_pixels", "max_body_bytes", "prompt_cache_bytes"):
        if getattr(args, name) < (0 if name == "prompt_cache_bytes" else 1):
            raise MM1Error(f"--{name.replace('_', '-')} must be positive")
    if args.request_timeout <= 0:
        raise MM1Error("--request-timeout must be positive")
    if args.allow_local_images is not None and not os.path.isdir(args.allow_local_images):
        raise MM1Error(f"--allow-local-images: not a directory: {args.allow_local_images}")


def build(args):
    """Load the model and make the app and its scheduler (not started)."""
    from ..checkpoint import DEFAULT_MODEL, load
    from .app import Defaults, Limits, Server, create_app
    from .scheduler import Scheduler

    model, processor = load(args.model, adapter_path=args.adapter_path)
    processor.image.max_pixels = args.max_pixels
    scheduler = Scheduler(model, processor, max_batch=args.max_concurrency,
                          max_queue=args.max_queue, prefill_step=args.prefill_step_size,
                          cache_bytes=args.prompt_cache_bytes)
    limits = Limits(args.max_body_bytes, args.max_images, args.request_timeout,
                    args.allow_local_images, args.api_key)
    defaults = Defaults(args.max_tokens, args.temperature, args.top_p, args.system_prompt)
    server = Server(args.model or DEFAULT_MODEL, processor, scheduler,
                    model.config.text_config.max_position_embeddings, limits, defaults)
    return create_app(server), scheduler


@cli_errors
def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    _check(args)
    try:
        import uvicorn
    except ImportError:
        raise MM1Error("the server needs its extra: pip install 'mm1-mlx[server]'") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    app, scheduler = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key", file=sys.stderr)
    scheduler.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        scheduler.stop()


if __name__ == "__main__":
    main()
