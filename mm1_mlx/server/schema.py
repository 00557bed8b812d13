"""OpenAI's chat-completions request, checked: typed fields (wrong types are a 400, not a guess),
messages with string content or ``text`` / ``image_url`` parts, and errors in OpenAI's JSON shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; unknown fields are ignored, as OpenAI's
    # clients send ones a server may not know
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class Part(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted and checked, not used
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    user: str | None = None


def parse_request(body: bytes) -> ChatRequest:
    """The request, or an APIError(400) naming the first bad field."""
    try:
        req = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "json_invalid":
            raise APIError(400, "the request body is not valid JSON") from None
        raise APIError(400, f"{param or 'body'}: {err['msg']}", param) from None
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", "logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes at most 4 non-empty strings", "stop")
    return req


def image_source(part: Part) -> str:
    url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
    if not url:
        raise APIError(400, "an image_url part needs image_url.url", "messages")
    return url


def flatten(messages: list[Message], image_token: str) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> chat messages whose text holds one ``image_token`` per image, and the
    image sources in order. An image part becomes ``image_token`` on its own line. A message with
    one text part puts its images first, whatever the parts' order (OpenAI's examples send the text
    first), so it reads as the CLI's ``--image X --prompt TEXT``; interleaved parts keep their order."""
    out, images = [], []
    for i, m in enumerate(messages):
        parts = [m.content or ""] if not isinstance(m.content, list) else m.content
        pieces = []
        for part in parts:
            text = part if isinstance(part, str) else part.text
            if isinstance(part, Part) and part.type == "image_url":
                images.append(image_source(part))
                pieces.append(image_token)
            elif text is None:
                raise APIError(400, "a text part needs text", f"messages.{i}.content")
            elif image_token in text:
                raise APIError(400, f"message text may not contain {image_token}; send images as "
                                    "image_url parts", f"messages.{i}.content")
            elif text or isinstance(part, str):
                pieces.append(text)
        texts = [p for p in pieces if p != image_token]
        if len(texts) <= 1:
            pieces = [image_token] * (len(pieces) - len(texts)) + texts
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": "\n".join(pieces)})
    return out, images
