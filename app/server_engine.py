"""The chat's engine when the model runs in a server: ``python -m app --server URL``.

Speaks OpenAI's chat-completions API (``mm1_mlx.server`` or any compatible server) with the
standard library; images go as data URLs. The server keeps each conversation's prefix, so there is
no local cache. Same interface as ``engine.Engine``.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

from mm1_mlx.images import DEFAULT_MAX_PIXELS

from .engine import IMAGE_PLACEHOLDER, Settings

TIMEOUT_S = 600.0


class ServerEngine:
    def __init__(self, url: str, api_key: str | None = None):
        from mm1_mlx.errors import MM1Error

        self.url, self.api_key = url.rstrip("/"), api_key
        if not self.url.lower().startswith(("http://", "https://")):
            raise MM1Error(f"the server URL must start with http:// or https://: {url}")
        models = json.load(self._open("/v1/models", None, timeout=10))["data"]
        self.model = models[0]["id"] if models else None
        self.name = f"{self.model} @ {self.url}"
        # what the app reads of a processor: the image-size limit it checks attachments against
        self.processor = SimpleNamespace(image=SimpleNamespace(max_pixels=DEFAULT_MAX_PIXELS))

    def new_cache(self):
        return None  # the server reuses the conversation's prefix itself

    def check_image(self, path: str) -> None:
        from mm1_mlx.images import load_image

        load_image(path, DEFAULT_MAX_PIXELS)

    def stream(self, messages: list[dict], images: list[str], settings: Settings, cache) -> Iterator:
        """Yield ``mm1_mlx.generate.Chunk``s as the server streams the reply."""
        from mm1_mlx.generate import Chunk

        body = {"model": self.model, "messages": _openai_messages(messages, images),
                "max_tokens": settings.max_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "stream": True, "stream_options": {"include_usage": True}}
        t0, ttft, n, finish = time.perf_counter(), None, 0, None
        with self._open("/v1/chat/completions", body) as r:
            for event in _events(r):
                if event.get("usage"):
                    u = event["usage"]
                    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                    gen_s = max(time.perf_counter() - t0 - (ttft or 0) / 1000, 1e-9)
                    yield Chunk("", None, u["prompt_tokens"], u["prompt_tokens"] - cached, 0.0, 0.0,
                                ttft or 0.0, u["completion_tokens"], u["completion_tokens"] / gen_s,
                                0.0, finish)
                    return
                choice = event["choices"][0] if event.get("choices") else {}
                text = (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
                if text:
                    n += 1
                    ttft = ttft or (time.perf_counter() - t0) * 1000
                    yield Chunk(text, None, 0, 0, 0.0, 0.0, ttft, n, 0.0, 0.0)
        yield Chunk("", None, 0, 0, 0.0, 0.0, ttft or 0.0, n, 0.0, 0.0, finish)

    def _open(self, path: str, body: dict | None, timeout: float = TIMEOUT_S):
        from mm1_mlx.errors import MM1Error

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise MM1Error(f"server: {_error_message(e.read())} (HTTP {e.code})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise MM1Error(f"cannot reach the server at {self.url}: {reason}") from None


def _events(response) -> Iterator[dict]:
    """The JSON events of a server-sent-events stream, up to ``data: [DONE]``."""
    from mm1_mlx.errors import MM1Error

    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise MM1Error(f"server: {event['error'].get('message', 'error')}")
        yield event


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or "no details"


def _openai_messages(messages: list[dict], images: list[str]) -> list[dict]:
    """Messages with ``<image>`` placeholders + image paths -> OpenAI messages with data URLs."""
    out, used = [], 0
    for m in messages:
        pieces = m["content"].split(IMAGE_PLACEHOLDER)
        if len(pieces) == 1:
            out.append(dict(m))
            continue
        parts = []
        for i, piece in enumerate(pieces):
            if i:
                parts.append({"type": "image_url", "image_url": {"url": _data_url(images[used])}})
                used += 1
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        out.append({"role": m["role"], "content": parts})
    return out


def _data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or ""
    mime = mime if mime.startswith("image/") else "image/png"  # the server reads the bytes anyway
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"
