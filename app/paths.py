"""Spotting image paths in pasted or dropped text (shell quoting, backslashes, file:// URLs)."""

from __future__ import annotations

import os
import re
import shlex
from urllib.parse import unquote, urlparse

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def unescape_path(text: str) -> str:
    """One pasted path as the shell or a file manager wrote it -> a plain filesystem path."""
    text = text.strip()
    if text.startswith("file://"):
        return unquote(urlparse(text).path)
    try:
        parts = shlex.split(text)
    except ValueError:  # unbalanced quote: take the text as it is
        parts = [text]
    if len(parts) == 1:
        text = parts[0]
    return os.path.expanduser(text)


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(path)


def image_path_in(text: str) -> str | None:
    """The image path that ``text`` consists of (as pasted or dropped), else None."""
    if not text.strip() or "\n" in text.strip():
        return None
    path = unescape_path(text)
    return os.path.abspath(path) if is_image_path(path) else None


# a token: quoted, or non-space runs with backslash-escaped spaces allowed
_TOKEN = re.compile(r"""'[^']+'|"[^"]+"|(?:\\ |[^\s])+""")


def split_image_paths(text: str) -> tuple[str, list[str]]:
    """Ollama-style: pull existing image paths out of a prompt -> (remaining text, paths)."""
    paths, keep, last = [], [], 0
    for m in _TOKEN.finditer(text):
        path = image_path_in(m.group(0))
        if path is None:
            continue
        keep.append(text[last:m.start()])
        last = m.end()
        paths.append(path)
    keep.append(text[last:])
    return re.sub(r"[ \t]{2,}", " ", "".join(keep)).strip(), paths
