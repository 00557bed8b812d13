"""CLI: ``python -m convert --hf-path PATH_OR_REPO --mlx-path OUT`` (see ``--help``)."""

from __future__ import annotations

import argparse

import mm1_mlx  # noqa: F401  (binds the BLAS before mlx.core loads)
from mm1_mlx.cli import args as cli_args
from mm1_mlx.errors import cli_errors


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(
        prog="python -m convert",
        description="Convert a LLaVA, FastVLM or Honeybee model, or assemble a vision tower and a "
                    "decoder, into an mm1-mlx checkpoint.")
    p.add_argument("--hf-path", "--model", dest="hf_path",
                   help="a whole model, directory or hub id: LLaVA, FastVLM (fast_vlm or Apple's "
                        "llava_qwen2) or Honeybee")
    p.add_argument("--vision", help="vision tower: HF CLIP/SigLIP/AIMv2 or OpenCLIP directory or "
                                    "hub id")
    p.add_argument("--text", help="decoder: HF Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen2-MoE/OLMoE")
    p.add_argument("--mlx-path", required=True, help="output checkpoint directory (new, or a "
                   "checkpoint replaced with --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing checkpoint at --mlx-path")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype (default: the source's, else float16)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--connector", default="c-abstractor",
                   choices=["c-abstractor", "avg-pool", "attention-pool", "mlp"],
                   help="fresh connector for --vision/--text assembly")
    p.add_argument("--image-tokens", type=cli_args.positive_int, default=144, help="image tokens per image")
    p.add_argument("--connector-hidden", type=cli_args.positive_int,
                   help="connector width (default: the tower's)")
    p.add_argument("--feature-layer", type=int, default=-2,
                   help="vision hidden state fed to the connector (default: penultimate)")
    p.add_argument("--upcycle-experts", type=cli_args.int_range(0, 4096), default=0, metavar="E",
                   help="turn dense FFNs into E-expert MoE layers (copies of the FFN)")
    p.add_argument("--moe-every", type=cli_args.positive_int, default=1, metavar="K",
                   help="with --upcycle-experts: every K-th layer becomes MoE")
    p.add_argument("--top-k", type=cli_args.positive_int, default=2,
                   help="with --upcycle-experts: experts per token")
    p.add_argument("--seed", type=cli_args.seed, default=0, help="seed for freshly initialised weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@cli_errors
def main(argv=None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.hf_path and (args.vision or args.text):
        setup_arg_parser().error("--hf-path cannot be combined with --vision/--text")
    from . import convert

    out = convert(
        args.mlx_path, hf_path=args.hf_path, vision=args.vision, text=args.text,
        connector=args.connector, image_tokens=args.image_tokens,
        connector_hidden=args.connector_hidden, feature_layer=args.feature_layer,
        dtype=args.dtype, q_bits=args.q_bits if args.quantize else None,
        q_group_size=args.q_group_size, upcycle=args.upcycle_experts,
        moe_every=args.moe_every, top_k=args.top_k, seed=args.seed, force=args.force,
        progress=not args.quiet)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
