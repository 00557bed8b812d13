"""Opening user images safely: formats, EXIF orientation, colour modes, size limits."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.error
import urllib.request
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MM1Error

DEFAULT_MAX_PIXELS = 50_000_000  # decompression-bomb guard
MAX_SIDE = 32_768  # longest side accepted
MAX_ASPECT = 200  # long side / short side at most (as Qwen2-VL): resizes stay bounded
FETCH_TIMEOUT_S = 10.0  # per connect / read, for http(s) images
FETCH_MAX_BYTES = 20 << 20  # an image larger than this is refused before it is read whole
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


def is_url(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://", "data:"))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow one to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise ImageError(f"image URL redirected to a non-http(s) address: {newurl[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
        raise ImageError("a data URL must look like data:image/<type>;base64,<data>")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageError(f"image data URL over the limit of {max_bytes >> 20} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL is not valid base64") from None


def fetch_image_bytes(url: str, timeout: float = FETCH_TIMEOUT_S,
                      max_bytes: int = FETCH_MAX_BYTES) -> bytes:
    """The bytes behind an http(s) or ``data:image/...;base64,`` URL, read with a timeout and a
    byte cap (checked on the announced length and again while reading); ImageError otherwise."""
    if url.lower().startswith("data:"):
        return _decode_data_url(url, max_bytes)
    if not url.lower().startswith(("http://", "https://")):
        raise ImageError(f"only http(s) and data: image URLs are fetched: {url[:200]}")
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    req = urllib.request.Request(url, headers={"User-Agent": "mm1-mlx"})
    try:
        with opener.open(req, timeout=timeout) as r:
            size = r.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > max_bytes:
                raise ImageError(f"image at {url[:200]} is {int(size) >> 20} MB, over the limit "
                                 f"of {max_bytes >> 20} MB")
            data = r.read(max_bytes + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"could not fetch image {url[:200]}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ImageError(f"could not fetch image {url[:200]}: {reason}") from None
    if len(data) > max_bytes:
        raise ImageError(f"image at {url[:200]} is over the limit of {max_bytes >> 20} MB")
    if not data:
        raise ImageError(f"image at {url[:200]} is empty (0 bytes)")
    return data


def check_size(w: int, h: int, name: str, max_pixels: int) -> None:
    """Pixels, side length and aspect ratio within bounds, from the header, before decoding or
    any resize or canvas is allocated."""
    if w <= 0 or h <= 0:
        raise ImageError(f"image has zero size: {name}")
    if w * h > max_pixels:
        raise ImageError(f"image too large: {name} is {w}x{h} = {w * h / 1e6:.1f} MP, "
                         f"limit {max_pixels / 1e6:.0f} MP")
    if max(w, h) > MAX_SIDE:
        raise ImageError(f"image too large: {name} is {w}x{h}, a side is over {MAX_SIDE} pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"image too narrow: {name} is {w}x{h}, an aspect ratio over "
                         f"{MAX_ASPECT}:1")


def _open(source, name: str, max_pixels: int) -> Image.Image:
    """Open and decode ``source`` (a path or a file object) with the size guards."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            check_size(*img.size, name, max_pixels)
            if img.format not in FORMATS:
                raise ImageError(f"unsupported image format {img.format}: {name}")
            img.seek(0)  # GIF/WebP/TIFF: first frame
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image file: {name}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large (decompression bomb): {name}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read image {name}: {e}") from None
    return img


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, an http(s) or data: URL, or a PIL image -> an upright RGB PIL image, or an
    ImageError saying what is wrong."""
    if isinstance(source, Image.Image):
        img = source
    elif is_url(source):
        name = source[:60] + ("..." if len(source) > 60 else "")
        img = _open(io.BytesIO(fetch_image_bytes(source)), name, max_pixels)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageError(f"image not found: {path}")
        if os.path.isdir(path):
            raise ImageError(f"image path is a directory: {path}")
        if not os.path.isfile(path):  # a FIFO or device would block or never end
            raise ImageError(f"image path is not a regular file: {path}")
        if os.path.getsize(path) == 0:
            raise ImageError(f"image file is empty (0 bytes): {path}")
        img = _open(path, path, max_pixels)
    check_size(*img.size, "the image", max_pixels)
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
