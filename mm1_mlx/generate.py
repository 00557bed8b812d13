"""Generation: ``python -m mm1_mlx.generate --image photo.jpg --prompt "..."`` and the Python API.

As in mlx-lm, ``generate_step`` produces tokens (and picks, once per reply, the CPU decode step
where it applies) and ``stream_generate`` wraps it: prompt and images in, prefix caches, prefill,
detokenized text and statistics out. Reuses mlx-lm's KV caches, samplers, logits processors and
streaming detokenizer. A ``PromptCache`` keeps encoded image features (keyed by pixel content) and
the KV cache of the last prompt, so a follow-up question about the same image re-encodes nothing
and only prefills the new tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cli import args as cli_args
from .cpu import step as cpu_step
from .errors import MM1Error, cli_errors
from .processor import MAX_TILES

# tokens per prefill chunk (mlx-lm's default): a 622-token LLaVA prompt in one chunk prefills in
# 1.63 s against 1.78 s in two of 512 (every weight is read once per chunk)
PREFILL_STEP = 2048


@dataclass
class Chunk:
    """A piece of streamed text with the running statistics."""

    text: str
    token: int | None
    prompt_tokens: int  # tokens in the whole prompt
    prefilled_tokens: int  # tokens actually computed (the rest came from the prompt cache)
    image_encode_ms: float
    prompt_tps: float
    ttft_ms: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" | "length" | None while streaming


@dataclass
class PromptCache:
    """Encoded images by content key, and the KV cache of the previous prompt."""

    max_images: int = 16
    features: OrderedDict = field(default_factory=OrderedDict)
    keys: list = field(default_factory=list)  # one entry per cached position
    kv: list | None = None

    def image_features(self, key: str, encode: Callable[[], mx.array]) -> tuple[mx.array, bool]:
        if key in self.features:
            self.features.move_to_end(key)
            return self.features[key], True
        feats = encode()
        self.features[key] = feats
        while len(self.features) > self.max_images:
            self.features.popitem(last=False)
        return feats, False

    def reuse(self, model, keys: list) -> tuple[list, int]:
        """KV cache holding the longest shared prefix of ``keys`` (at least one token left)."""
        n = 0
        if self.kv is not None and can_trim_prompt_cache(self.kv):
            limit = min(len(self.keys), len(keys) - 1)
            while n < limit and self.keys[n] == keys[n]:
                n += 1
        if n == 0:
            self.kv = make_prompt_cache(model.language_model)
        else:
            trim_prompt_cache(self.kv, len(self.keys) - n)
        self.keys = keys[:n]
        return self.kv, n


def position_keys(ids: list[int], image_token_id: int, image_keys: list[str],
                  tokens_per_image: list[int]) -> list:
    """A key per position: the token id, or (image key, index) inside an image's span."""
    out, img, k = [], 0, 0
    for t in ids:
        if t == image_token_id:
            out.append((image_keys[img], k))
            k += 1
            if k == tokens_per_image[img]:
                img, k = img + 1, 0
        else:
            out.append(t)
    return out


def prefill(model, ids: list[int], features: mx.array | None, first_feature: int, kv,
            image_token_id: int, step: int = PREFILL_STEP) -> mx.array:
    """Run ``ids`` through the model in chunks, filling ``kv``; logits of the last chunk.

    ``features`` holds one row per image token of the whole prompt; ``first_feature`` is the row of
    the first image token in ``ids`` (the earlier ones are already in the cache).
    """
    used = first_feature
    for pos in range(0, len(ids), step):
        chunk = ids[pos:pos + step]
        n_img = sum(1 for t in chunk if t == image_token_id)
        f = features[used: used + n_img] if n_img else None
        logits = model(mx.array(chunk)[None], cache=kv, image_features=f, last_only=True)
        used += n_img
        if pos + step < len(ids):
            mx.eval([c.state for c in kv])
    return logits


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def generate_step(model, kv: list, logits: mx.array, history: mx.array, sampler: Callable,
                  logits_processors: list, max_tokens: int, stop_tokens=()) -> Iterator[int]:
    """Tokens sampled one at a time, starting from the prefilled prompt's ``logits``, until a stop
    token or ``max_tokens``. Each token but the first is fed back through the decoder (advancing
    ``kv``) before it is handed out, so the next step computes while the caller uses it; the first
    leaves at once (its time is the time to first token). A stop token is not fed back.

    On the CPU the decoder runs as ``cpu.step``'s numpy decode step where it applies (chosen here,
    once per reply); anywhere else, and for any model it does not cover, as MLX layers."""
    lm = model.language_model
    step = cpu_step.decode_step(lm)
    step = step if step is not None and step.accepts(kv) else None

    def forward(tok: mx.array) -> mx.array:
        return step(step.embed(tok.item()), kv) if step else model(tok[None], cache=kv)

    def sample(logits: mx.array) -> mx.array:
        logits = logits[:, -1, :]
        for proc in logits_processors:
            logits = proc(history, logits)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    tok = sample(logits)
    for n in range(1, max_tokens + 1):
        t = tok.item()
        if t in stop_tokens or n == max_tokens:
            yield t
            return
        history = mx.concatenate([history, tok])
        if n == 1:
            yield t
        nxt = sample(forward(tok))
        mx.async_eval(nxt)
        if n > 1:
            yield t
        tok = nxt


def encode_images(model, prepared: list, cache: PromptCache,
                  image_encoder: Callable[[np.ndarray], np.ndarray] | None = None) -> list:
    """Image features (tokens x hidden) per prepared image, from ``cache`` where it has them."""
    D = model.config.text_config.hidden_size

    def encode(pixels):
        if image_encoder is not None:
            return mx.array(image_encoder(pixels)).reshape(-1, D)
        return model.encode_images(mx.array(pixels)).reshape(-1, D)

    feats = [cache.image_features(p.key, lambda p=p: encode(p.pixels))[0] for p in prepared]
    if feats:
        mx.eval(feats)
    return feats


def make_sampling(processor, temperature: float, top_p: float, top_k: int, min_p: float,
                  repetition_penalty: float | None) -> tuple[Callable, list]:
    """mlx-lm's sampler and logits processors; the image placeholder and padding are banned."""
    sampler = make_sampler(temperature, top_p=top_p if top_p < 1.0 else 0.0, min_p=min_p,
                           top_k=top_k)
    banned = {processor.image_token_id, processor.tokenizer.pad_token_id} - {None}
    processors = make_logits_processors(logit_bias={t: -1e9 for t in banned},
                                        repetition_penalty=repetition_penalty)
    return sampler, processors


def stream_generate(model, processor, prompt, images=(), *, system: str | None = None,
                    max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, min_p: float = 0.0, repetition_penalty: float | None = None,
                    seed: int | None = None, max_tiles: int | None = None,
                    prompt_cache: PromptCache | None = None,
                    image_encoder: Callable[[np.ndarray], np.ndarray] | None = None,
                    ) -> Iterator[Chunk]:
    """Yield text chunks as they are generated; the last chunk has ``finish_reason`` set.

    ``prompt`` is text (``<image>`` marks where each image goes; images without a placeholder go
    first) or a list of chat messages. ``images`` are paths or PIL images.
    """
    check_sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
                   model.config.text_config.vocab_size)
    if seed is not None:
        mx.random.seed(seed)
    t0 = time.perf_counter()
    ids, prepared = processor.prepare(prompt, images, system, max_tiles)
    context = model.config.text_config.max_position_embeddings
    if len(ids) >= context:
        raise MM1Error(f"prompt is {len(ids)} tokens, longer than the model's context ({context})")
    max_tokens = min(max_tokens, context - len(ids))
    cache = prompt_cache if prompt_cache is not None else PromptCache()

    t_img = time.perf_counter()
    feats = encode_images(model, prepared, cache, image_encoder)
    image_ms = (time.perf_counter() - t_img) * 1000
    keys = position_keys(ids, processor.image_token_id, [p.key for p in prepared],
                         [p.num_sub_images * processor.num_image_tokens for p in prepared])
    kv, start = cache.reuse(model, keys)
    img_before = sum(1 for k in keys[:start] if isinstance(k, tuple))

    t_pre = time.perf_counter()
    logits = prefill(model, ids[start:], mx.concatenate(feats) if feats else None, img_before,
                     kv, processor.image_token_id)
    cache.keys = keys
    sampler, processors = make_sampling(processor, temperature, top_p, top_k, min_p,
                                        repetition_penalty)
    tokenizer = TokenizerWrapper(processor.tokenizer)
    eos = set(tokenizer.eos_token_ids)
    tokens = generate_step(model, kv, logits, mx.array(ids), sampler, processors, max_tokens, eos)
    stats = _Stats(len(ids), len(ids) - start, image_ms, t0, t_pre)
    detok = tokenizer.detokenizer
    detok.reset()
    finish = "length"
    for n, t in enumerate(tokens, start=1):
        stats.first_token()
        if t in eos:
            finish = "stop"
            break
        if n < max_tokens:
            cache.keys.append(t)
        detok.add_token(t)
        segment = detok.last_segment  # reading it takes it
        if segment:
            yield stats.chunk(segment, t, n)
    detok.finalize()
    yield stats.chunk(detok.last_segment, None, n, finish)


class _Stats:
    """Timing of one reply, for its chunks: prompt speed, time to first token, decode speed."""

    def __init__(self, prompt_tokens: int, prefilled: int, image_ms: float, t0: float,
                 t_prefill: float):
        self.prompt_tokens, self.prefilled, self.image_ms = prompt_tokens, prefilled, image_ms
        self.t0, self.t_prefill, self.t_gen = t0, t_prefill, None

    def first_token(self) -> None:
        """Called as each token arrives; the first one ends the prefill."""
        if self.t_gen is None:
            self.t_gen = time.perf_counter()
            self.prompt_tps = self.prefilled / max(self.t_gen - self.t_prefill, 1e-9)
            self.ttft_ms = (self.t_gen - self.t0) * 1000

    def chunk(self, text: str, token: int | None, n: int, finish: str | None = None) -> Chunk:
        tps = n / max(time.perf_counter() - self.t_gen, 1e-9)
        return Chunk(text, token, self.prompt_tokens, self.prefilled, self.image_ms,
                     self.prompt_tps, self.ttft_ms, n, tps, _peak_gb(), finish)


def check_sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
                   vocab_size: int) -> None:
    """Sampling settings in range (a NaN temperature or a negative one would decode garbage)."""
    ok = lambda v, lo, hi: isinstance(v, (int, float)) and lo <= v <= hi  # noqa: E731 (NaN fails)
    for name, value, lo, hi in (("max_tokens", max_tokens, 1, 1 << 30),
                                ("temperature", temperature, 0.0, 1e6), ("top_p", top_p, 0.0, 1.0),
                                ("top_k", top_k, 0, vocab_size), ("min_p", min_p, 0.0, 1.0)):
        if not ok(value, lo, hi) or (name in ("max_tokens", "top_k") and not isinstance(value, int)):
            raise MM1Error(f"{name} must be between {lo} and {hi}, got {value}")
    if repetition_penalty is not None and not ok(repetition_penalty, 1e-6, 1e6):
        raise MM1Error(f"repetition_penalty must be a positive number, got {repetition_penalty}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise MM1Error(f"seed must be an integer between 0 and {2**32 - 1}, got {seed}")


def generate(model, processor, prompt, images=(), **kwargs) -> str:
    """The whole reply as one string (same arguments as ``stream_generate``)."""
    return "".join(c.text for c in stream_generate(model, processor, prompt, images, **kwargs))


def str2bool(value: str) -> bool:
    """mlx-lm's ``--verbose True|False`` spelling."""
    v = value.lower()
    if v in ("true", "t", "yes", "y", "1"):
        return True
    if v in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.generate",
                                description="Answer a prompt about images with an MM1 model.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, bundled model name or hub id (default mm1-tiny)")
    p.add_argument("--image", nargs="+", action="extend", default=[], metavar="IMAGE",
                   help="image files or http(s) URLs, one or more (the flag may repeat)")
    p.add_argument("--prompt", "-p", required=True, type=cli_args.utf8_text,
                   help="prompt text, or - to read it from stdin")
    p.add_argument("--system-prompt", "--system", dest="system", default=None,
                   type=cli_args.utf8_text, help="system prompt")
    p.add_argument("--max-tokens", "-m", type=cli_args.positive_int, default=256)
    p.add_argument("--temperature", "--temp", dest="temp", type=cli_args.non_negative_float,
                   default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=cli_args.unit_interval, default=1.0)
    p.add_argument("--top-k", type=cli_args.non_negative_int, default=0)
    p.add_argument("--min-p", type=cli_args.unit_interval, default=0.0)
    p.add_argument("--repetition-penalty", type=cli_args.positive_float, default=None)
    p.add_argument("--seed", type=cli_args.seed, default=None)
    p.add_argument("--adapter-path", "--adapter", dest="adapter", default=None,
                   help="LoRA adapter directory")
    p.add_argument("--max-image-tiles", type=cli_args.int_range(1, MAX_TILES), default=None,
                   help="high-resolution splitting: up to N tiles plus an overview (1 = off)")
    p.add_argument("--max-pixels", type=cli_args.positive_int, default=None,
                   help="refuse images larger than this many pixels (default 50M)")
    p.add_argument("--vision-backend", nargs="+", default=["mlx"], metavar="BACKEND",
                   help="mlx (default) or: coreml PATH.mlpackage (macOS)")
    p.add_argument("--verbose", "--stats", dest="stats", nargs="?", const=True, default=False,
                   type=str2bool, metavar="BOOL",
                   help="print timing and memory statistics (mlx-lm's --verbose [True|False])")
    g = p.add_argument_group("a Hugging Face / mlx-community --model is converted on first use "
                             "(cached), as python -m convert does")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype (default: the source's, else float16)")
    g.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder")
    g.add_argument("--q-bits", type=int, choices=[4, 8], default=4)
    g.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    return p


def vision_backend(spec: list[str], model):
    if spec == ["mlx"]:
        return None
    if len(spec) == 2 and spec[0] == "coreml":
        from .coreml import CoreMLEncoder

        enc = CoreMLEncoder(spec[1])
        enc.check_model(model.config)
        return enc.encode
    raise MM1Error(f"--vision-backend takes 'mlx' or 'coreml PATH', got {' '.join(spec)!r}")


def print_stats(c: Chunk) -> None:
    print(f"image encode: {c.image_encode_ms:.1f} ms\n"
          f"prompt: {c.prompt_tokens} tokens ({c.prefilled_tokens} computed), "
          f"{c.prompt_tps:.1f} tokens/s\n"
          f"time to first token: {c.ttft_ms:.1f} ms\n"
          f"generation: {c.generation_tokens} tokens, {c.generation_tps:.1f} tokens/s\n"
          f"peak memory: {c.peak_memory_gb:.3f} GB", file=sys.stderr)


@cli_errors
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    prompt = cli_args.read_stdin_text() if args.prompt == "-" else args.prompt
    if not prompt.strip() and not args.image:
        raise MM1Error("the prompt is empty")
    from .checkpoint import load

    model, processor = load(args.model, adapter_path=args.adapter, dtype=args.dtype,
                            q_bits=args.q_bits if args.quantize else None,
                            q_group_size=args.q_group_size, progress=True)
    if args.max_pixels is not None:
        processor.image.max_pixels = args.max_pixels
    encoder = vision_backend(args.vision_backend, model)
    last = None
    for chunk in stream_generate(
            model, processor, prompt, args.image, system=args.system, max_tokens=args.max_tokens,
            temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
            max_tiles=args.max_image_tiles, image_encoder=encoder):
        print(chunk.text, end="", flush=True)
        last = chunk
    print(flush=True)
    if args.stats and last is not None:
        print_stats(last)


if __name__ == "__main__":
    main()
