"""Generation: ``python -m mm1_mlx.generate --image photo.jpg --prompt "..."`` and the Python API.

Reuses mlx-lm's KV caches, samplers, logits processors and streaming detokenizer. A ``PromptCache``
keeps encoded image features (keyed by pixel content) and the KV cache of the last prompt, so a
follow-up question about the same image re-encodes nothing and only prefills the new tokens.
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

from .errors import MM1Error, cli_errors

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
    if seed is not None:
        mx.random.seed(seed)
    t0 = time.perf_counter()
    prepared = [processor.prepare_image(im, max_tiles) for im in images]
    msgs = prompt if isinstance(prompt, list) else processor.messages(prompt, len(prepared), system)
    ids = processor.tokenize(processor.apply_chat_template(msgs), prepared)
    context = model.config.text_config.max_position_embeddings
    if len(ids) >= context:
        raise MM1Error(f"prompt is {len(ids)} tokens, longer than the model's context ({context})")
    max_tokens = min(max_tokens, context - len(ids))

    cache = prompt_cache if prompt_cache is not None else PromptCache()
    T = processor.num_image_tokens
    D = model.config.text_config.hidden_size

    def encoder(pixels):
        if image_encoder is not None:
            return mx.array(image_encoder(pixels))
        return model.encode_images(mx.array(pixels))

    t_img = time.perf_counter()
    feats = []
    for p in prepared:
        f, _ = cache.image_features(p.key, lambda p=p: encoder(p.pixels).reshape(-1, D))
        feats.append(f)
    if feats:
        mx.eval(feats)
    image_ms = (time.perf_counter() - t_img) * 1000

    keys = position_keys(ids, processor.image_token_id, [p.key for p in prepared],
                         [p.num_sub_images * T for p in prepared])
    kv, start = cache.reuse(model, keys)
    flat = mx.concatenate(feats) if feats else None
    img_before = sum(1 for k in keys[:start] if isinstance(k, tuple))

    t_pre = time.perf_counter()
    logits = prefill(model, ids[start:], flat, img_before, kv, processor.image_token_id)
    cache.keys = keys

    sampler = make_sampler(temperature, top_p=top_p if top_p < 1.0 else 0.0, min_p=min_p,
                           top_k=top_k)
    # the image placeholder (and padding) must never be generated
    banned = {processor.image_token_id, processor.tokenizer.pad_token_id} - {None}
    processors = make_logits_processors(logit_bias={t: -1e9 for t in banned},
                                        repetition_penalty=repetition_penalty)
    tokenizer = TokenizerWrapper(processor.tokenizer)
    detok = tokenizer.detokenizer
    detok.reset()
    history = mx.array(ids)

    def next_token(logits):
        nonlocal history
        logits = logits[:, -1, :]
        for proc in processors:
            logits = proc(history, logits)
        tok = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        return tok

    tok = next_token(logits)
    mx.eval(tok)
    prefill_s = time.perf_counter() - t_pre
    ttft_ms = (time.perf_counter() - t0) * 1000
    prompt_tps = (len(ids) - start) / max(prefill_s, 1e-9)
    t_gen, n = time.perf_counter(), 0
    finish = "length"
    while n < max_tokens:
        t = tok.item()
        n += 1
        if t in tokenizer.eos_token_ids:
            finish = "stop"
            break
        history = mx.concatenate([history, tok])
        if n < max_tokens:
            cache.keys.append(t)
            nxt = next_token(model(tok[None], cache=kv))
            mx.async_eval(nxt)
        detok.add_token(t)
        seg = detok.last_segment
        if seg:
            yield Chunk(seg, t, len(ids), len(ids) - start, image_ms, prompt_tps, ttft_ms, n,
                        n / max(time.perf_counter() - t_gen, 1e-9), _peak_gb())
        if n < max_tokens:
            tok = nxt
    detok.finalize()
    gen_s = max(time.perf_counter() - t_gen, 1e-9)
    yield Chunk(detok.last_segment, None, len(ids), len(ids) - start, image_ms, prompt_tps,
                ttft_ms, n, n / gen_s, _peak_gb(), finish)


def generate(model, processor, prompt, images=(), **kwargs) -> str:
    """The whole reply as one string (same arguments as ``stream_generate``)."""
    return "".join(c.text for c in stream_generate(model, processor, prompt, images, **kwargs))


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer a prompt about images with an MM1 model.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, bundled model name or hub id (default mm1-tiny)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--adapter", default=None, help="LoRA adapter directory")
    p.add_argument("--max-image-tiles", type=int, default=None,
                   help="high-resolution splitting: up to N tiles plus an overview (1 = off)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images larger than this many pixels (default 50M)")
    p.add_argument("--vision-backend", nargs="+", default=["mlx"], metavar="BACKEND",
                   help="mlx (default) or: coreml PATH.mlpackage (macOS)")
    p.add_argument("--stats", action="store_true", help="print timing and memory statistics")
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
        from .coreml_backend import CoreMLEncoder

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
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip() and not args.image:
        raise MM1Error("the prompt is empty")
    from .checkpoint import load

    model, processor = load(args.model, adapter_path=args.adapter, dtype=args.dtype,
                            q_bits=args.q_bits if args.quantize else None,
                            q_group_size=args.q_group_size)
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
