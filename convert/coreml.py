"""Export a checkpoint's image encoder + connector to a Core ML ML Program (.mlpackage).

    python -m convert.coreml --model mm1-tiny --out encoder.mlpackage \
        [--precision float16|float32] [--compress none|int8|palettize4] \
        [--compute-units all|cpu_and_ne|cpu_and_gpu]

The graph is a PyTorch twin of our MLX encoder + connector (``convert/torch_twin.py``) built from
the checkpoint's own weights, checked against MLX on rendered images, then traced and converted.

Input ``image``: an RGB image (``ct.ImageType``) at the encoder's resolution. Core ML scales it
to [0, 1]; the checkpoint's per-channel mean/std normalisation runs inside the graph (an
ImageType has only one scale for all channels, so it cannot express per-channel std).
Output ``image_features``: (1, tokens, width) float32, the decoder-width image tokens.
The input is a fixed batch of one: a Core ML image input binds one pixel buffer, and fixed
shapes keep the program eligible for the Neural Engine. Tiles of a high-resolution image run
through the same program as one Core ML batch prediction (``predict([...])``, i.e.
``predictionsFromBatch``), see ``mm1_mlx/coreml.py``: the runtime, whose metadata keys and compute
units this exporter writes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import warnings
from pathlib import Path

import mm1_mlx  # binds OpenBLAS before mlx.core loads
from mm1_mlx.cli import args as cli_args
from mm1_mlx.coreml import COMPUTE_UNITS, META, import_coremltools
from mm1_mlx.errors import MM1Error, cli_errors
from mm1_mlx.io.atomic import atomic_dir, check_output

PRECISIONS = ("float16", "float32")
COMPRESSIONS = ("none", "int8", "palettize4")
TOLERANCE = 1e-3  # twin vs MLX, float32, relative to the features' scale


def sample_images(size: int, n: int = 2, seed: int = 0):
    """(n, size, size, 3) RGB images in [0, 1]: rendered shape scenes, the model's own domain."""
    import numpy as np

    from mm1_mlx.shapes import world

    rng = random.Random(seed)
    imgs = [world.render(rng, world.random_scene(rng).shapes, size) for _ in range(n)]
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in imgs])


def check_twin(model, twin, mean, std, images, tol: float = TOLERANCE) -> float:
    """Max |twin - MLX| over ``images``; an MM1Error if it exceeds ``tol`` x max(1, |MLX|)."""
    import numpy as np

    from .torch_twin import mlx_features, twin_features

    ref = mlx_features(model, images, mean, std)
    got = twin_features(twin, images)
    if got.shape != ref.shape:
        raise MM1Error(f"export graph gives {got.shape}, MLX gives {ref.shape}")
    diff = float(np.abs(got - ref).max())
    if not diff <= tol * max(1.0, float(np.abs(ref).max())):
        raise MM1Error(f"export graph differs from MLX by {diff:.3g} (tolerance {tol:g})")
    return diff


def to_mlprogram(ct, twin, size: int, precision: str, compute_units: str):
    """Trace the twin and convert it to an ML Program with an RGB image input."""
    import numpy as np
    import torch

    example = torch.rand(1, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(twin, example)
        return ct.convert(
            traced,
            inputs=[ct.ImageType(name="image", shape=(1, 3, size, size), scale=1 / 255.0,
                                 color_layout=ct.colorlayout.RGB)],
            outputs=[ct.TensorType(name="image_features", dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.macOS14,  # iOS17 too: needed for compression ops
            compute_precision=getattr(ct.precision, precision.upper()),
            compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]),
            skip_model_load=True,  # Linux cannot load it; on macOS the backend loads it
        )


def compress(ct, mlmodel, mode: str):
    """Weight compression: int8 linear (symmetric, per channel) or 4-bit k-means palettes."""
    from coremltools.optimize import coreml as cto

    if mode == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if mode == "palettize4":
        try:
            import sklearn  # noqa: F401  (coremltools' k-means)
        except ImportError:
            raise MM1Error("--compress palettize4 needs scikit-learn (pip install scikit-learn)"
                           ) from None
        # one 16-entry table per tensor: grouped tables would need macOS 15 / iOS 18
        op = cto.OpPalettizerConfig(nbits=4, mode="kmeans")
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    return mlmodel


def package_metadata(config, name: str, settings, precision: str, compression: str,
                     compute_units: str, twin_diff: float) -> dict[str, str]:
    vc = config.vision_config
    meta = {
        "model": name,
        "version": mm1_mlx.__version__,
        "image_size": vc.image_size,
        "num_image_tokens": config.num_image_tokens,
        "hidden_size": config.text_config.hidden_size,
        "connector": config.connector_config.type,
        "image_mean": json.dumps([float(m) for m in settings.image_mean]),
        "image_std": json.dumps([float(s) for s in settings.image_std]),
        "input": "RGB image 0-255, scaled to [0,1] by Core ML; (x-mean)/std inside the graph",
        "precision": precision,
        "compress": compression,
        "compute_units": compute_units,
        "twin_max_abs_diff": f"{twin_diff:.3g}",
    }
    return {META + k: str(v) for k, v in meta.items()}


def describe(mlmodel, meta: dict[str, str]) -> None:
    size, tokens = meta[META + "image_size"], meta[META + "num_image_tokens"]
    width = meta[META + "hidden_size"]
    mlmodel.short_description = (f"{meta[META + 'model']} image encoder + connector: "
                                 f"{size}x{size} RGB image -> {tokens} x {width} image tokens")
    mlmodel.author = f"mm1-mlx {meta[META + 'version']}"
    mlmodel.input_description["image"] = f"RGB image, {size}x{size}"
    mlmodel.output_description["image_features"] = f"(1, {tokens}, {width}) float32 image tokens"
    mlmodel.user_defined_metadata.update(meta)


def check_output_path(out: str) -> Path:
    path = Path(out).expanduser()
    if path.suffix != ".mlpackage":
        raise MM1Error(f"--out must end in .mlpackage: {out}")
    parent = path.resolve().parent
    probe = parent
    while not probe.exists():  # the nearest existing ancestor decides whether we can create it
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise MM1Error(f"cannot write {out}: {probe} is not a writable directory")
    return path


def save_package(mlmodel, path: Path, inputs=(), force: bool = False) -> None:
    """Save to a temporary sibling, then swap it in (``atomic_dir``): a failed save leaves no
    half package, an existing one is replaced only with ``force``."""
    with atomic_dir(path, "mlpackage", inputs, force) as tmp:
        tmp.rmdir()  # coremltools copies the package to a path that must not exist
        mlmodel.save(str(tmp))


def export(model_path: str | None, out: str, precision: str = "float16",
           compression: str = "none", compute_units: str = "all", check: bool = True,
           force: bool = False):
    """Export encoder + connector of ``model_path`` to ``out``; returns (MLModel, twin diff)."""
    import mlx.core as mx

    from mm1_mlx import checkpoint

    from .torch_twin import TWIN_CONNECTORS, build_twin

    for value, choices, flag in ((precision, PRECISIONS, "--precision"),
                                 (compression, COMPRESSIONS, "--compress"),
                                 (compute_units, COMPUTE_UNITS, "--compute-units")):
        if value not in choices:
            raise MM1Error(f"{flag} must be one of {', '.join(choices)}, not {value!r}")
    path = checkpoint.resolve(model_path)
    config = checkpoint.read_config(path)
    kind = config.connector_config.type
    if kind not in TWIN_CONNECTORS:
        raise MM1Error(f"unsupported connector {kind!r} for Core ML export; supported: "
                       f"{', '.join(TWIN_CONNECTORS)}")
    target = check_output_path(out)
    check_output(target, "mlpackage", [path], force)  # before the slow export
    ct = import_coremltools()
    model, processor = checkpoint.load(str(path), lazy=True)  # decoder weights stay unread
    settings = processor.image
    if settings.image_size != config.vision_config.image_size:
        raise MM1Error(f"processor image_size {settings.image_size} differs from the encoder's "
                       f"{config.vision_config.image_size}")
    # the check compares float32 with float32 (a float16 checkpoint is upcast, exactly)
    model.vision_tower.set_dtype(mx.float32)
    model.connector.set_dtype(mx.float32)
    twin = build_twin(model, settings.image_mean, settings.image_std)
    diff = float("nan")
    if check:
        images = sample_images(config.vision_config.image_size)
        diff = check_twin(model, twin, settings.image_mean, settings.image_std, images)
    mlmodel = to_mlprogram(ct, twin, config.vision_config.image_size, precision, compute_units)
    mlmodel = compress(ct, mlmodel, compression)
    name = config.name if config.name != "mm1" else path.name
    describe(mlmodel, package_metadata(config, name, settings, precision, compression,
                                       compute_units, diff))
    save_package(mlmodel, target, [path], force)
    return mlmodel, diff


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(
        prog="python -m convert.coreml",
        description="Export the image encoder + connector to a Core ML .mlpackage.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or bundled model name (default: mm1-tiny)")
    p.add_argument("--out", required=True, help="output path, ending in .mlpackage")
    p.add_argument("--force", action="store_true", help="replace an existing package at --out")
    p.add_argument("--precision", choices=PRECISIONS, default="float16")
    p.add_argument("--compress", choices=COMPRESSIONS, default="none",
                   help="weight compression: int8 linear or 4-bit palettes (k-means)")
    p.add_argument("--compute-units", choices=list(COMPUTE_UNITS), default="all",
                   help="preferred compute units, recorded for the runtime")
    p.add_argument("--no-check", action="store_true",
                   help="skip the numeric check of the export graph against MLX")
    return p


@cli_errors
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    _, diff = export(args.model, args.out, args.precision, args.compress, args.compute_units,
                     check=not args.no_check, force=args.force)
    checked = "" if args.no_check else f" (graph vs MLX: max |diff| {diff:.2g})"
    print(f"wrote {args.out}{checked}")


if __name__ == "__main__":
    main()
