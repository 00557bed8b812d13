"""Opening user images safely: formats, EXIF orientation, colour modes, size limits."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MM1Error

DEFAULT_MAX_PIXELS = 50_000_000  # decompression-bomb guard
FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}


class ImageError(MM1Error):
    pass


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, CMYK, I;16, L, 1, F) -> RGB; transparency over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * (255.0 if a.max() <= 1 else 1) + 0.5, 0, 255)
                              .astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path or PIL image -> an upright RGB PIL image, or an ImageError saying what is wrong."""
    if isinstance(source, Image.Image):
        img = source
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageError(f"image not found: {path}")
        if os.path.isdir(path):
            raise ImageError(f"image path is a directory: {path}")
        if os.path.getsize(path) == 0:
            raise ImageError(f"image file is empty (0 bytes): {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"image too large: {path} is {w}x{h} = {w * h / 1e6:.1f} MP, "
                                     f"limit {max_pixels / 1e6:.0f} MP")
                if img.format not in FORMATS:
                    raise ImageError(f"unsupported image format {img.format}: {path}")
                img.seek(0)  # GIF/WebP/TIFF: first frame
                img.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"not an image file: {path}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image too large (decompression bomb): {path}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot read image {path}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image too large: {w}x{h} = {w * h / 1e6:.1f} MP, "
                         f"limit {max_pixels / 1e6:.0f} MP")
    if w == 0 or h == 0:
        raise ImageError("image has zero size")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not stop us from using the pixels
        pass
    return to_rgb(img)


def pixel_hash(img: Image.Image) -> str:
    """Content hash of the decoded pixels: same picture, same key, whatever the file."""
    h = hashlib.sha256(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()
