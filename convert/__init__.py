"""Converters from PyTorch / Hugging Face / OpenCLIP weights to mm1-mlx checkpoints.

``python -m convert --hf-path llava-hf/llava-1.5-7b-hf --mlx-path out`` converts a whole LLaVA
model; ``--vision PATH --text PATH --connector c-abstractor`` assembles an MM1-style model from
parts with a freshly initialised connector (optionally upcycling the decoder into an MoE). The
conversion itself lives in the library (``mm1_mlx.formats``), which ``mm1_mlx.load`` also uses.
"""

from mm1_mlx.checkpoint import save
from mm1_mlx.formats.assemble import assemble
from mm1_mlx.formats.sources import resolve
from mm1_mlx.formats.weights import convert_weights, upcycle_experts
from mm1_mlx.io.atomic import check_output


def convert(mlx_path: str, force: bool = False, **options):
    """Convert or assemble a model (``assemble``'s options) and save it at ``mlx_path``, which
    must be new or empty, or (with ``force``) a checkpoint; never one of the inputs."""
    inputs = [resolve(options[k]) for k in ("hf_path", "vision", "text") if options.get(k)]
    check_output(mlx_path, "checkpoint", inputs, force, flag="--mlx-path")  # before the work
    return save(*assemble(**options), mlx_path, inputs=inputs, force=force, flag="--mlx-path")


__all__ = ["convert", "convert_weights", "upcycle_experts"]
