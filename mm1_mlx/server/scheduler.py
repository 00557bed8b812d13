"""Continuous batching: one model thread serves many requests.

Each request is prefilled alone (batch 1, in chunks of ``prefill_step`` tokens, through
``generate.prefill`` as the CLI does), one chunk or one image per turn of the loop, so a long
prompt delays the running streams by one chunk at a time. Requests that are decoding step together:
their KV caches are merged into mlx-lm's left-padded ``BatchKVCache`` and one forward pass per step
serves all of them; a request that finishes is extracted and filtered out. A lone request keeps
its plain ``KVCache``, so it decodes through the CPU decode step (``cpu.step``) exactly as the CLI.

``PrefixCache`` keeps encoded images and the KV caches of finished requests (prompt and reply),
least recently used out past a byte budget: the next turn of a conversation, or another question
about the same image, prefills only what is new.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.sample_utils import apply_top_p
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..cpu import step as cpu_step
from ..generate import prefill
from ..processor import PreparedImage

log = logging.getLogger("mm1_mlx.server")


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What the model thread hands a request: new text, and on the last event why it ended and
    the token counts; or an error (``status`` is the HTTP status to answer with)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on the last event
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500


@dataclass
class Job:
    """One request: its prompt (ids, images, one key per position) and the decoding state."""

    ids: list[int]
    images: list[PreparedImage]
    keys: list  # generate.position_keys of ids
    sampling: Sampling
    emit: Callable[[Event], None]  # called on the model thread; must not block
    deadline: float  # time.monotonic() after which the request stops
    cancelled: threading.Event = field(default_factory=threading.Event)
    feats: list = field(default_factory=list)
    kv: list | None = None
    start: int = 0  # prompt tokens reused from the prefix cache
    pos: int = 0  # prompt tokens in the cache so far
    images_used: int = 0  # image-token rows in the cache so far
    cache_keys: list = field(default_factory=list)  # one per cached position
    next_token: int = 0
    n: int = 0
    text: str = ""
    sent: int = 0
    detok: object = None
    key: mx.array | None = None


def _common_prefix(a: list, b: list, limit: int) -> int:
    n = 0
    limit = min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _prefix_view(c: KVCache, n: int) -> KVCache:
    """A KV cache holding the first ``n`` positions of ``c``. Its arrays are new slices: the next
    write reallocates (``KVCache`` grows by concatenation), so ``c`` is never written."""
    view = KVCache()
    view.keys, view.values, view.offset = c.keys[..., :n, :], c.values[..., :n, :], n
    return view


class PrefixCache:
    """Image features by content key and KV caches by position keys, in one LRU order, least
    recently used out while they take more than ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict = OrderedDict()  # key -> (value, nbytes)
        self.nbytes = 0
        self._ids = 0

    def image_features(self, key: str, encode: Callable[[], mx.array]) -> tuple[mx.array, bool]:
        k = ("image", key)
        if k in self.items:
            self.items.move_to_end(k)
            return self.items[k][0], True
        feats = encode()
        mx.eval(feats)
        self._put(k, feats, feats.nbytes)
        return feats, False

    def lookup(self, keys: list, lm) -> tuple[list, int]:
        """A fresh KV cache holding the longest cached prefix of ``keys`` (at least one token left
        to compute) and its length."""
        best, n = None, 0
        for k, entry_keys in self._prefixes():
            m = _common_prefix(entry_keys, keys, len(keys) - 1)
            if m > n:
                best, n = k, m
        if best is None:
            return make_prompt_cache(lm), 0
        self.items.move_to_end(best)
        return [_prefix_view(c, n) for c in self.items[best][0][1]], n

    def store(self, keys: list, kv: list) -> None:
        if not keys or any(type(c) is not KVCache or c.keys is None for c in kv):
            return
        for k in [k for k, e in self._prefixes() if len(e) <= len(keys) and keys[:len(e)] == e]:
            self._pop(k)  # this one extends them
        self._ids += 1
        self._put(("kv", self._ids), (list(keys), kv), sum(c.nbytes for c in kv))

    def _prefixes(self):
        """(item key, position keys) of the cached KV prefixes."""
        return [(k, v[0][0]) for k, v in self.items.items() if k[0] == "kv"]

    def _put(self, k, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        self.items[k] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._pop(next(iter(self.items)))

    def _pop(self, k) -> None:
        self.nbytes -= self.items.pop(k)[1]


class Scheduler:
    """The model thread. ``submit`` queues a job (False when the queue is full); events reach the
    job through its ``emit``; setting ``job.cancelled`` stops it at the next step."""

    def __init__(self, model, processor, *, max_batch: int = 8, max_queue: int = 64,
                 prefill_step: int = 512, cache_bytes: int = 1 << 30):
        self.model, self.processor = model, processor
        self.lm = model.language_model
        self.max_batch, self.max_queue, self.prefill_step = max_batch, max_queue, prefill_step
        self.prefix = PrefixCache(cache_bytes)
        self.tokenizer = TokenizerWrapper(processor.tokenizer)
        self.eos = set(self.tokenizer.eos_token_ids)
        self.cancelled = 0  # jobs stopped because their client went away
        # the image placeholder (and padding) must never be generated (as generate.stream_generate)
        vocab = self.lm.args.vocab_size
        banned = [t for t in {processor.image_token_id, processor.tokenizer.pad_token_id}
                  if t is not None and t < vocab]
        bias = mx.zeros((vocab,))
        self.bias = bias.at[mx.array(banned)].add(-1e9) if banned else bias
        mx.eval(self.bias)  # MLX streams are per thread: nothing lazy may cross to the model's
        self.waiting: list[Job] = []  # in order; the first is prefilled when a batch slot is free
        self.active: list[Job] = []
        self.cache: list | None = None  # the active jobs' caches per layer (plain for one job)
        self.cpu_step = cpu_step.decode_step(self.lm)  # one job alone decodes as the CLI does
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mm1-scheduler", daemon=True)

    # ---- any thread ----
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> bool:
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(job)
            self._cond.notify()
        return True

    def stats(self) -> dict:
        return {"active": len(self.active), "queued": len(self.waiting),
                "prompt_cache_bytes": self.prefix.nbytes}

    # ---- the model thread ----
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.active or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                self._expire_waiting()
                first = self.waiting[0] if self.waiting else None
            if first is not None and len(self.active) < self.max_batch:
                self._prefill_turn(first)
            self._drop_cancelled()
            if self.active:
                self._decode_turn()

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for job in list(self.waiting):
            if job.cancelled.is_set():
                self.waiting.remove(job)
                self.cancelled += 1
            elif now > job.deadline and job.kv is None:
                self.waiting.remove(job)
                job.emit(Event(error="the request timed out waiting for the model", status=504))

    def _prefill_turn(self, job: Job) -> None:
        try:
            first = self._prefill_step(job)
        except Exception as e:
            log.exception("prefill failed")
            self._unwait(job)
            job.emit(Event(error=f"internal error while reading the prompt: {type(e).__name__}"))
            return
        if first is None:
            return
        self._unwait(job)
        job.cache_keys = list(job.keys)
        job.detok = self.tokenizer.detokenizer
        if self._accept(job, first):
            self._join(job)
        else:
            self.prefix.store(job.cache_keys, job.kv)

    def _unwait(self, job: Job) -> None:
        with self._cond:
            self.waiting.remove(job)

    def _prefill_step(self, job: Job) -> int | None:
        """One image or one chunk of the prompt; the first token once the prompt is in."""
        if len(job.feats) < len(job.images):
            p = job.images[len(job.feats)]
            D = self.lm.args.hidden_size
            f, _ = self.prefix.image_features(
                p.key, lambda: self.model.encode_images(mx.array(p.pixels)).reshape(-1, D))
            job.feats.append(f)
            return None
        if job.kv is None:
            job.kv, job.start = self.prefix.lookup(job.keys, self.lm)
            job.pos = job.start
            job.images_used = sum(1 for k in job.keys[:job.start] if isinstance(k, tuple))
        chunk = job.ids[job.pos:job.pos + self.prefill_step]
        flat = mx.concatenate(job.feats) if job.feats else None
        logits = prefill(self.model, chunk, flat, job.images_used, job.kv,
                         self.processor.image_token_id, self.prefill_step)
        job.images_used += sum(1 for t in chunk if t == self.processor.image_token_id)
        job.pos += len(chunk)
        if job.pos < len(job.ids):
            mx.eval([c.state for c in job.kv])
            return None
        if job.sampling.seed is not None:
            job.key = mx.random.key(job.sampling.seed % (1 << 63))
        elif job.sampling.temperature > 0:
            job.key = mx.random.key(secrets.randbits(32))
        return self._sample([job], logits[:, -1]).item()

    def _sample(self, jobs: list[Job], logits: mx.array) -> mx.array:
        """Next tokens (B,) for (B, V) logits: argmax for greedy jobs, else each its own key."""
        logits = logits + self.bias
        toks = mx.argmax(logits, axis=-1)
        if all(j.sampling.temperature <= 0 for j in jobs):
            return toks
        rows = [toks[i:i + 1] if j.sampling.temperature <= 0 else self._sample_row(j, logits[i:i + 1])
                for i, j in enumerate(jobs)]
        return mx.concatenate(rows)

    @staticmethod
    def _sample_row(job: Job, logits: mx.array) -> mx.array:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if job.sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, job.sampling.top_p)
        job.key, k = mx.random.split(job.key)
        return mx.random.categorical(logprobs * (1 / job.sampling.temperature), key=k)

    def _decode_turn(self) -> None:
        try:
            tokens = self._decode_step()
        except Exception as e:
            log.exception("decode step failed")
            for job in self.active:
                job.emit(Event(error=f"internal error while generating: {type(e).__name__}"))
            self.active, self.cache = [], None
            return
        done = [i for i, (job, t) in enumerate(zip(self.active, tokens))
                if not self._accept(job, t)]
        if done:
            self._leave(done)

    def _decode_step(self) -> list[int]:
        toks = mx.array([[j.next_token] for j in self.active])
        step = self.cpu_step if len(self.active) == 1 else None
        if step is not None and step.accepts(self.cache):
            logits = step(step.embed(self.active[0].next_token), self.cache)
        else:
            logits = self.lm(self.lm.embed(toks), self.cache)
        for job in self.active:
            job.cache_keys.append(job.next_token)
        return self._sample(self.active, logits[:, -1]).tolist()

    def _drop_cancelled(self) -> None:
        gone = [i for i, j in enumerate(self.active) if j.cancelled.is_set()]
        if gone:
            self.cancelled += len(gone)
            self._leave(gone)

    def _join(self, job: Job) -> None:
        """Add a prefilled job to the decoding batch."""
        if not self.active:
            self.cache = job.kv
        else:
            if len(self.active) == 1:
                self.cache = [BatchKVCache.merge([c]) for c in self.cache]
            for c, new in zip(self.cache, job.kv):
                c.extend(BatchKVCache.merge([new]))
        job.kv = None
        self.active.append(job)

    def _leave(self, indices: list[int]) -> None:
        """Take jobs out of the batch, keeping their caches for the conversations' next turns."""
        batched = len(self.active) > 1
        for i in indices:
            kv = [c.extract(i) for c in self.cache] if batched else self.cache
            self.prefix.store(self.active[i].cache_keys, kv)
        keep = [i for i in range(len(self.active)) if i not in set(indices)]
        self.active = [self.active[i] for i in keep]
        if not keep:
            self.cache = None
        elif len(keep) == 1:
            self.cache = [c.extract(keep[0]) for c in self.cache]
        else:
            for c in self.cache:
                c.filter(mx.array(keep))

    def _accept(self, job: Job, token: int) -> bool:
        """Take a sampled token; emit the text it completes. False once the job is finished."""
        if job.cancelled.is_set():
            self.cancelled += 1
            return False
        job.n += 1
        s = job.sampling
        if token in self.eos:
            return self._finish(job, "stop")
        job.detok.add_token(token)
        job.text += job.detok.last_segment
        if self._cut_at_stop(job):
            return self._finish(job, "stop", cut=True)
        if job.n >= s.max_tokens or time.monotonic() > job.deadline:
            return self._finish(job, "length")
        hold = max((len(x) for x in s.stop), default=1) - 1  # a stop string may be starting
        if len(job.text) - hold > job.sent:
            job.emit(Event(job.text[job.sent:len(job.text) - hold]))
            job.sent = len(job.text) - hold
        job.next_token = token
        return True

    def _cut_at_stop(self, job: Job) -> bool:
        found = [i for i in (job.text.find(x, max(0, job.sent - len(x))) for x in job.sampling.stop)
                 if i >= 0]
        if found:
            job.text = job.text[:min(found)]
        return bool(found)

    def _finish(self, job: Job, reason: str, cut: bool = False) -> bool:
        if not cut:  # the detokenizer's held-back bytes; a stop string may be among them
            job.detok.finalize()
            job.text += job.detok.last_segment
            if self._cut_at_stop(job):
                reason = "stop"
        job.emit(Event(job.text[job.sent:], reason, len(job.ids), job.start, job.n))
        job.sent = len(job.text)
        return False
