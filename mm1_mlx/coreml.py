"""Running the image encoder + connector through a Core ML package (macOS), the decoder in MLX.

``CoreMLEncoder(path).encode(pixel_values)`` takes what the processor produces, (N, S, S, 3)
channels-last and normalized with the checkpoint's mean/std, and returns (N, T, D) float32 image
tokens for ``model(..., image_features=...)``. The package (``python -m convert.coreml``) takes
RGB images and normalises inside its graph, so the pixels are mapped back to 8-bit images first;
the processor's pixels come from 8-bit images, so that round trip is exact. All sub-images
(tiles + overview) go to Core ML as one batch prediction.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MM1Error

META = "mm1_mlx."  # prefix of our keys in a package's user-defined metadata
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU",
                 "cpu_only": "CPU_ONLY"}


def import_coremltools():
    """coremltools, with its Linux 'cannot load the Core ML runtime' warnings silenced."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError:
        raise MM1Error("coremltools is not installed (pip install 'mm1-mlx[coreml]')") from None
    return ct


@dataclass
class PackageInfo:
    """What an exported encoder package declares in its user-defined metadata."""

    model: str
    version: str
    image_size: int
    num_image_tokens: int
    hidden_size: int
    image_mean: list
    image_std: list
    compute_units: str = "all"

    @classmethod
    def from_metadata(cls, meta: dict, path: str = "package") -> PackageInfo:
        try:
            return cls(
                model=meta[META + "model"], version=meta[META + "version"],
                image_size=int(meta[META + "image_size"]),
                num_image_tokens=int(meta[META + "num_image_tokens"]),
                hidden_size=int(meta[META + "hidden_size"]),
                image_mean=json.loads(meta[META + "image_mean"]),
                image_std=json.loads(meta[META + "image_std"]),
                compute_units=meta.get(META + "compute_units", "all"),
            )
        except (KeyError, ValueError) as e:
            raise MM1Error(f"{path} is not an mm1-mlx encoder package (metadata {e})") from None


def read_package_info(path: str) -> PackageInfo:
    """Metadata of an exported package; works on any OS (reads the spec only)."""
    ct = import_coremltools()
    if not Path(path).is_dir():
        raise MM1Error(f"Core ML package not found: {path}")
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as e:
        raise MM1Error(f"cannot read Core ML package {path}: {e}".splitlines()[0]) from None
    return PackageInfo.from_metadata(dict(spec.description.metadata.userDefined), str(path))


def to_uint8_images(pixel_values: np.ndarray, mean, std) -> np.ndarray:
    """Normalized (N, S, S, 3) pixels -> (N, S, S, 3) uint8, undoing the processor's mapping."""
    x = pixel_values.astype(np.float32) * np.asarray(std, np.float32)
    x = (x + np.asarray(mean, np.float32)) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class CoreMLEncoder:
    """An exported encoder package, loaded for prediction (macOS only)."""

    def __init__(self, path: str, compute_units: str | None = None):
        if sys.platform != "darwin":
            raise MM1Error("the Core ML vision backend runs only on macOS")
        ct = import_coremltools()
        self.info = read_package_info(path)
        units = compute_units or self.info.compute_units
        if units not in COMPUTE_UNITS:
            raise MM1Error(f"compute units must be one of {', '.join(COMPUTE_UNITS)}, not {units}")
        try:
            self.model = ct.models.MLModel(
                str(path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[units]))
        except Exception as e:
            raise MM1Error(f"cannot load Core ML package {path}: {e}".splitlines()[0]) from None

    def check_model(self, config) -> None:
        """Raise if the package does not fit this MLX model's config (a ModelConfig)."""
        want = (config.vision_config.image_size, config.num_image_tokens,
                config.text_config.hidden_size)
        have = (self.info.image_size, self.info.num_image_tokens, self.info.hidden_size)
        if want != have:
            raise MM1Error(f"Core ML package {self.info.model} gives (size, tokens, width) {have}, "
                           f"the model needs {want}")

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) normalized channels-last pixels -> (N, T, D) float32 image tokens."""
        from PIL import Image

        S = self.info.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (S, S, 3):
            raise MM1Error(f"expected (N, {S}, {S}, 3) pixels, got {pixel_values.shape}")
        images = to_uint8_images(pixel_values, self.info.image_mean, self.info.image_std)
        batch = [{"image": Image.fromarray(im)} for im in images]
        outs = self.model.predict(batch)  # one Core ML batch (predictionsFromBatch)
        return np.concatenate([np.asarray(o["image_features"], np.float32) for o in outs])
