"""The HTTP side: Starlette routes for ``/v1/chat/completions``, ``/v1/models`` and ``/health``.

A request is read (with a byte cap), checked, its images loaded and the prompt tokenized in a
worker thread (fetches never hold up the model), then handed to the ``Scheduler``'s model thread;
its tokens come back through an asyncio queue. A client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import MM1Error
from ..generate import position_keys
from ..images import is_url
from .scheduler import Event, Job, Sampling, Scheduler
from .schema import APIError, ChatRequest, flatten, parse_request

log = logging.getLogger("mm1_mlx.server")

POLL_S = 0.5  # how often a waiting request checks that its client is still there


@dataclass
class Limits:
    max_body_bytes: int = 64 << 20
    max_images: int = 8
    request_timeout: float = 600.0
    allow_local_images: str | None = None  # a directory local image paths must lie in
    api_key: str | None = None


@dataclass
class Defaults:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    system_prompt: str | None = None


class Server:
    """The state the routes share: model name, processor, scheduler, limits."""

    def __init__(self, name: str, processor, scheduler: Scheduler, context: int,
                 limits: Limits, defaults: Defaults):
        self.name, self.processor, self.scheduler = name, processor, scheduler
        self.context, self.limits, self.defaults = context, limits, defaults
        self.names = {name, os.path.basename(os.path.normpath(name))}
        self.created = int(time.time())
        self._tokenize_lock = threading.Lock()

    # ---- checks ----
    def authorize(self, request: Request) -> None:
        key = self.limits.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        cap = self.limits.max_body_bytes
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > cap:
            raise APIError(413, f"request body over the limit of {cap} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise APIError(413, f"request body over the limit of {cap} bytes",
                               code="request_too_large")
        return bytes(body)

    def local_image(self, source: str) -> str:
        """A local path confined to --allow-local-images (symlinks resolved first)."""
        root = self.limits.allow_local_images
        if root is None:
            raise APIError(400, "image URLs must be http(s) or data:image/...;base64 (local paths "
                                "need the server's --allow-local-images DIR)", "messages",
                           "invalid_image_url")
        path = source[len("file://"):] if source.lower().startswith("file://") else source
        root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, real]) != root:
            raise APIError(400, "local image path is outside the allowed directory", "messages",
                           "invalid_image_url")
        return real

    def image(self, source: str):
        """A ``PreparedImage`` from a data: or http(s) URL (fetched by ``mm1_mlx.images``, with its
        timeout and byte cap) or an allowed local path."""
        if not is_url(source):
            if ":" in source.split("/")[0] and not source.lower().startswith("file://"):
                raise APIError(400, f"unsupported image URL scheme: {source[:60]}", "messages",
                               "invalid_image_url")
            source = self.local_image(source)
        try:
            return self.processor.prepare_image(source)
        except MM1Error as e:
            raise APIError(400, str(e), "messages", "invalid_image") from None

    # ---- preparing a job (worker thread) ----
    def prepare(self, req: ChatRequest) -> tuple[list[int], list, list]:
        msgs, sources = flatten(req.messages, self.processor.image_token)
        if self.defaults.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.defaults.system_prompt})
        if len(sources) > self.limits.max_images:
            raise APIError(400, f"{len(sources)} images, over the limit of {self.limits.max_images}",
                           "messages", "too_many_images")
        images = [self.image(src) for src in sources]
        try:
            with self._tokenize_lock:
                ids = self.processor.tokenize(self.processor.apply_chat_template(msgs), images)
        except MM1Error as e:  # e.g. a chat template that drops a message holding an image
            raise APIError(400, str(e), "messages") from None
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens, longer than the model's context "
                                f"({self.context})", "messages", "context_length_exceeded")
        T = self.processor.num_image_tokens
        keys = position_keys(ids, self.processor.image_token_id, [p.key for p in images],
                             [p.num_sub_images * T for p in images])
        return ids, images, keys

    def sampling(self, req: ChatRequest, prompt_len: int) -> Sampling:
        d = self.defaults
        max_tokens = req.max_completion_tokens or req.max_tokens or d.max_tokens
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        return Sampling(max_tokens=min(max_tokens, self.context - prompt_len),
                        temperature=d.temperature if req.temperature is None else req.temperature,
                        top_p=d.top_p if req.top_p is None else req.top_p,
                        seed=req.seed, stop=tuple(stop))


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def chat_completions(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.authorize(request)
    req = parse_request(await srv.read_body(request))
    if req.model is not None and req.model not in srv.names:
        raise APIError(404, f"the model {req.model!r} does not exist; this server has {srv.name!r}",
                       "model", "model_not_found")
    ids, images, keys = await run_in_threadpool(srv.prepare, req)
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: Event) -> None:  # the model thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown)
            pass

    job = Job(ids, images, keys, srv.sampling(req, len(ids)), emit,
              time.monotonic() + srv.limits.request_timeout)
    if not srv.scheduler.submit(job):
        raise APIError(429, "the server is busy (queue full); retry later", code="rate_limit_exceeded")
    watcher = asyncio.create_task(_watch(request, queue, job))
    try:
        first = await queue.get()
        if first is None:  # the client left
            return Response(status_code=499)
        if first.error is not None:
            raise APIError(first.status, first.error)
        reply = Reply(srv.name, req.stream_options is not None and req.stream_options.include_usage)
        if req.stream:  # from here Starlette watches the connection and cancels the stream
            return StreamingResponse(_stream(reply, first, queue, job),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        events = [first]
        while events[-1].finish_reason is None and events[-1].error is None:
            events.append(await queue.get())
            if events[-1] is None:
                return Response(status_code=499)
        if events[-1].error is not None:
            raise APIError(events[-1].status, events[-1].error)
        return JSONResponse(reply.whole("".join(e.text for e in events), events[-1]))
    except BaseException:
        job.cancelled.set()
        raise
    finally:
        watcher.cancel()


async def _watch(request: Request, queue: asyncio.Queue, job: Job) -> None:
    """Cancel the job (and wake its handler with None) once the client has disconnected."""
    while not job.cancelled.is_set():
        await asyncio.sleep(POLL_S)
        if await request.is_disconnected():
            job.cancelled.set()
            queue.put_nowait(None)


class Reply:
    """OpenAI's response objects for one completion."""

    def __init__(self, model: str, include_usage: bool):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model, self.include_usage, self.created = model, include_usage, int(time.time())

    @staticmethod
    def usage(e: Event) -> dict:
        return {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
                "total_tokens": e.prompt_tokens + e.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": e.cached_tokens}}

    def whole(self, text: str, last: Event) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": last.finish_reason}
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage(last)}

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def _stream(reply: Reply, first: Event, queue: asyncio.Queue, job: Job):
    """Server-sent events: a role chunk, content chunks, the finish chunk, usage, [DONE]."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            if event.error is not None:  # after the headers went out: an error event, then done
                yield f"data: {json.dumps(APIError(event.status, event.error).body())}\n\n"
                break
            if event.text:
                yield reply.chunk({"content": event.text})
            if event.finish_reason is not None:
                yield reply.chunk({}, event.finish_reason)
                if reply.include_usage:
                    yield reply.chunk({}, usage=reply.usage(event))
                break
            event = await queue.get()
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once finished; stops the job if the client went away


async def models(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.authorize(request)
    return JSONResponse({"object": "list", "data": [
        {"id": srv.name, "object": "model", "created": srv.created, "owned_by": "mm1-mlx"}]})


async def health(request: Request) -> Response:
    srv: Server = request.app.state.server
    return JSONResponse({"status": "ok", "model": srv.name, **srv.scheduler.stats()})


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(APIError(exc.status_code, exc.detail or "error"))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)  # the traceback stays in the server's log
    return _error(APIError(500, f"internal server error ({type(exc).__name__})"))


def create_app(server: Server) -> Starlette:
    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.server = server
    return app
