"""One system, one process: ``python -m benchmarks.worker SYSTEM SPEC_JSON`` prints a JSON result.

Systems: ``transformers`` (PyTorch CPU), ``mlx-vlm`` (as installed), ``mlx-vlm+blas`` (our BLAS binding
bound first), ``mm1-mlx`` (our checkpoint, any quantization); text-only decoders on prompt token
ids: ``llama.cpp-F32/Q8_0/Q4_0`` and ``mm1-mlx(-q8|-q4)-text`` (``llama_cpp.py``). Each other one
answers a first question about an image and a follow-up about the same image (with the system's own
prefix/image cache if it has one), timed from the call to the first token, then decodes
``max_tokens`` tokens. The peak RSS is the
high-water mark of this process's own address space (``VmHWM``); then the process
measures the memory read bandwidth (``read_gbps``) that its decode rate is compared with.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time

from .llama_cpp import LLAMA, OURS, run_llama, run_ours
from .machine import probe_buffer, read_gbps


def peak_rss_gb() -> float:
    """Peak resident memory of this process's own address space, in GB.

    Linux's ``ru_maxrss`` is the wrong number here: it carries the parent's RSS across fork+exec
    (a parent holding 4.6 GB made every worker report 4.6 GB). ``VmHWM`` in /proc/self/status
    starts afresh with each exec; ``ru_maxrss`` remains where /proc is absent (macOS, in bytes)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024 / 1e9
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _figures(t0: float, times: list[float], counts: list[int], prompt_tokens: int) -> dict:
    """TTFT from the call, decode rate between the first and last token."""
    ttft = times[0] - t0
    n = counts[-1] - counts[0]
    dt = times[-1] - times[0]
    return {"ttft_s": ttft, "prompt_tokens": prompt_tokens, "prefill_tps": prompt_tokens / ttft,
            "generated": counts[-1], "decode_tps": n / dt if n and dt > 0 else None}


def run_transformers(spec: dict) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, StoppingCriteria

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(spec["hf_path"], dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(spec["hf_path"])
    load_s = time.perf_counter() - t

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def ask(text):
        t0 = time.perf_counter()
        inputs = proc(images=Image.open(spec["image"]).convert("RGB"), text=text,
                      return_tensors="pt")
        clock = Clock()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=spec["max_tokens"],
                           min_new_tokens=spec["max_tokens"], do_sample=False,
                           stopping_criteria=[clock])
        n = inputs["input_ids"].shape[1]
        return _figures(t0, clock.times, list(range(1, len(clock.times) + 1)), n)

    first = ask(spec["prompts"][0])
    second = ask(spec["prompts"][1])
    return {"load_s": load_s, "first": first, "second": second,
            "second_question_cache": "none (fresh run)"}


class ImageKwargsFilter:
    """Harness workaround: mlx-vlm 0.7's LlavaProcessor passes text kwargs (``padding``) on to the
    image processor, which transformers 5 rejects; drop the ones the image processor does not take."""

    def __init__(self, inner):
        self.inner = inner
        self.valid = set(getattr(getattr(inner, "valid_kwargs", None), "__annotations__", {}))

    def __call__(self, images, **kwargs):
        return self.inner(images, **{k: v for k, v in kwargs.items() if k in self.valid})

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_mlx_vlm(spec: dict, bind: bool) -> dict:
    if bind:
        from mm1_mlx.cpu.blas import bind_blas

        blas = bind_blas()
    import mlx.core as mx
    from mlx_vlm import load, stream_generate
    from mlx_vlm.generate.common import PromptCacheState
    from mlx_vlm.vision_cache import VisionFeatureCache

    if not bind:
        blas = "as installed"
    t = time.perf_counter()
    model, processor = load(spec["hf_path"])
    load_s = time.perf_counter() - t
    vision_cache, prompt_state = VisionFeatureCache(), PromptCacheState()

    def ask(text):
        times, counts, prompt_tokens, cached = [], [], 0, 0
        t0 = time.perf_counter()
        for r in stream_generate(model, processor, text, image=[spec["image"]],
                                 max_tokens=spec["max_tokens"], temperature=0.0,
                                 vision_cache=vision_cache, prompt_cache_state=prompt_state):
            times.append(time.perf_counter())
            counts.append(r.generation_tokens)
            prompt_tokens, cached = r.prompt_tokens, r.cached_tokens or 0
        out = _figures(t0, times, counts, prompt_tokens)
        out["cached_tokens"] = cached
        return out

    workaround = None
    try:
        first = ask(spec["prompts"][0])
    except ValueError as e:  # fails in preprocessing, before any compute: retry with the fix
        if "unexpected keyword argument" not in str(e):
            raise
        processor.image_processor = ImageKwargsFilter(processor.image_processor)
        workaround = f"harness drops text kwargs before the image processor ({e})"
        first = ask(spec["prompts"][0])
    second = ask(spec["prompts"][1])
    return {"load_s": load_s, "first": first, "second": second, "blas": blas,
            "workaround": workaround,
            "mlx_peak_gb": mx.get_peak_memory() / 1e9,
            "second_question_cache": "VisionFeatureCache + PromptCacheState"}


def run_mm1(spec: dict) -> dict:
    import mm1_mlx
    from mm1_mlx.generate import PromptCache, stream_generate

    t = time.perf_counter()
    model, processor = mm1_mlx.load(spec["mlx_path"])
    load_s = time.perf_counter() - t
    cache = PromptCache()

    def ask(text):
        times, counts, last = [], [], None
        t0 = time.perf_counter()
        for c in stream_generate(model, processor, text, [spec["image"]],
                                 max_tokens=spec["max_tokens"], prompt_cache=cache):
            times.append(time.perf_counter())
            counts.append(c.generation_tokens)
            last = c
        out = _figures(t0, times, counts, last.prompt_tokens)
        # our own clock stops at the first token; the first yield also waits for the detokenizer
        out["ttft_s"] = last.ttft_ms / 1000
        out["prefill_tps"] = last.prompt_tokens / out["ttft_s"]
        out.update(prefilled_tokens=last.prefilled_tokens, image_encode_ms=last.image_encode_ms,
                   mlx_peak_gb=last.peak_memory_gb)
        return out

    first = ask(spec["questions"][0])  # our chat template renders the same prompt text
    second = ask(spec["questions"][1])
    return {"load_s": load_s, "first": first, "second": second,
            "blas": mm1_mlx.backend_info()["blas"], "second_question_cache": "PromptCache"}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    system, spec = argv[0], json.loads(argv[1])
    if system in LLAMA:
        out = run_llama(spec)
    elif system in OURS:
        out = run_ours(spec)
    elif system == "transformers":
        out = run_transformers(spec)
    elif system in ("mlx-vlm", "mlx-vlm+blas"):
        out = run_mlx_vlm(spec, bind=system == "mlx-vlm+blas")
    else:
        out = run_mm1(spec)
    out["peak_rss_gb"] = peak_rss_gb()
    # this run's bandwidth bound, measured in the same process right after its answers (the VM's
    # bandwidth drifts 10-30% over minutes); after the RSS, which its buffer would raise
    out["read_gbps"] = max(read_gbps(probe_buffer(spec.get("probe_mb", 512))))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
