"""The model behind the chat: loading, listing local checkpoints, streaming a reply to a conversation.

Heavy imports (mlx, transformers) happen inside the functions, which the app calls from workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Settings:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    system_prompt: str = ""

    @classmethod
    def from_dict(cls, d: dict | None) -> Settings:
        """Stored settings; a value of the wrong type or out of range keeps its default."""
        bounds = {"temperature": (float, 0.0, 5.0), "top_p": (float, 0.0, 1.0),
                  "max_tokens": (int, 1, 100_000), "system_prompt": (str, None, None)}
        kept = {}
        for k, v in (d if isinstance(d, dict) else {}).items():
            kind, lo, hi = bounds.get(k, (None, None, None))
            if kind is None or isinstance(v, bool):
                continue
            if kind is str and isinstance(v, str):
                kept[k] = v
            elif kind is not str and isinstance(v, (int, float)) and (kind is float or
                                                                      isinstance(v, int)):
                if lo <= v <= hi:  # NaN fails too
                    kept[k] = kind(v)
        return cls(**kept)

    def to_dict(self) -> dict:
        return asdict(self)


def chat_messages(history, system_prompt: str = "") -> tuple[list[dict], list[str]]:
    """Stored messages -> chat messages with one ``<image>`` per image, and the image paths in order."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    images = []
    for m in history:
        content = f"{IMAGE_PLACEHOLDER}\n" * len(m.images) + m.content
        msgs.append({"role": m.role, "content": content})
        images += m.images
    return msgs, images


class Engine:
    """A loaded model and processor; ``stream`` yields ``mm1_mlx.generate.Chunk``s."""

    def __init__(self, model, processor, name: str):
        self.model, self.processor, self.name = model, processor, name

    def new_cache(self):
        from mm1_mlx.generate import PromptCache

        return PromptCache()

    def check_image(self, path: str) -> None:
        """Raise ``ImageError`` (one line) if the model could not use this file."""
        from mm1_mlx.images import load_image

        load_image(path, self.processor.image.max_pixels)

    def stream(self, messages: list[dict], images: list[str], settings: Settings, cache) -> Iterator:
        from mm1_mlx.generate import stream_generate

        return stream_generate(self.model, self.processor, messages, images,
                               max_tokens=settings.max_tokens, temperature=settings.temperature,
                               top_p=settings.top_p, prompt_cache=cache)


def load_engine(spec: str | None, adapter: str | None = None) -> Engine:
    """Load a checkpoint (``None``: the bundled default) -> Engine. Raises MM1Error."""
    import mm1_mlx
    from mm1_mlx.checkpoint import DEFAULT_MODEL

    model, processor = mm1_mlx.load(spec, adapter_path=adapter)
    return Engine(model, processor, spec or DEFAULT_MODEL)


Loader = Callable[[str | None, str | None], Engine]


def local_models(models_dir: Path, recent: list[str]) -> list[tuple[str, str]]:
    """(label, spec) for bundled checkpoints, those under ``models_dir`` and recently used ones."""
    from mm1_mlx.checkpoint import bundled_models

    out: dict[str, str] = {}
    for name in bundled_models():
        out[name] = f"{name}  (bundled)"
    if models_dir.is_dir():
        for cfg in sorted(models_dir.glob("*/config.json")):
            out.setdefault(str(cfg.parent), f"{cfg.parent.name}  ({models_dir})")
    for spec in recent:
        if spec and (spec.count("/") == 1 and not os.path.exists(spec) or
                     os.path.isfile(os.path.join(spec, "config.json"))):
            out.setdefault(spec, f"{spec}  (recent)")
    return [(label, spec) for spec, label in out.items()]
