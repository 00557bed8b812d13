"""The OpenAI-compatible server: the real ``openai`` client, error cases over HTTP, batching without
cross-talk, a bounded load test. Servers run in-process on 127.0.0.1 (ephemeral ports)."""

import mm1_mlx  # noqa: F401, I001
import mm1_mlx.errors

import base64
import concurrent.futures as cf
import contextlib
import functools
import http.server
import os
import subprocess
import sys
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server extra (starlette, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from mlx_lm.models.cache import BatchKVCache, make_prompt_cache  # noqa: E402

from mm1_mlx.cpu import step as cpu_step  # noqa: E402
from mm1_mlx.generate import generate, prefill  # noqa: E402
from mm1_mlx.server.__main__ import setup_arg_parser  # noqa: E402
from mm1_mlx.server.app import Defaults, Limits, Server, create_app  # noqa: E402
from mm1_mlx.server.scheduler import Job, PrefixCache, Sampling, Scheduler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "examples", "shapes.png")
QUESTIONS = ["Describe the image.", "What color is the star?", "How many shapes are there?",
             "Where is the circle?", "Is there a red star?", "What shape is the blue one?"]


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}] if images else text}]


@contextlib.contextmanager
def serve(app):
    """Run ``app`` with uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny():
    from mm1_mlx import load

    return load("mm1-tiny")


@pytest.fixture(scope="module")
def scheduler(tiny):
    model, processor = tiny
    s = Scheduler(model, processor, max_batch=8, max_queue=64, cache_bytes=64 << 20)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    (d / "shapes.png").write_bytes(open(SHAPES, "rb").read())
    (d / "notes.txt").write_text("not an image")
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(open(SHAPES, "rb").read())
    os.symlink(outside, d / "escape.png")
    return d


def make_server(tiny, scheduler, **limits) -> Server:
    model, processor = tiny
    return Server("mm1-tiny", processor, scheduler, model.config.text_config.max_position_embeddings,
                  Limits(**limits), Defaults())


@pytest.fixture(scope="module")
def url(tiny, scheduler, local_dir):
    app = create_app(make_server(tiny, scheduler, max_body_bytes=1 << 20, max_images=3,
                                 allow_local_images=str(local_dir)))
    with serve(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def image_http(tmp_path_factory):
    """A local HTTP server with the example image and a file that is not an image."""
    d = tmp_path_factory.mktemp("www")
    (d / "shapes.png").write_bytes(open(SHAPES, "rb").read())
    (d / "broken.png").write_bytes(b"\x89PNG but not really")
    handler = functools.partial(QuietHandler, directory=str(d))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def solo(tiny, text, images=(), **kw):
    """What the library (the CLI's code path) answers to the same one-turn request."""
    model, processor = tiny
    prompt = "\n".join(["<image>"] * len(images) + [text])
    return generate(model, processor, prompt, list(images), **kw)


# ---- the openai client ----
def test_openai_client_image_data_url_equals_cli(client, tiny):
    r = client.chat.completions.create(model="mm1-tiny", messages=user("Describe the image.",
                                                                       data_url(SHAPES)))
    text = r.choices[0].message.content
    cli = subprocess.run([sys.executable, "-m", "mm1_mlx.generate", "--image", SHAPES, "--prompt",
                          "Describe the image."], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert cli.returncode == 0, cli.stderr
    assert text == cli.stdout.rstrip("\n") == solo(tiny, "Describe the image.", [SHAPES])
    assert "circle" in text
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 16 and u.completion_tokens >= 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_openai_streaming_with_usage_and_url_image(client, tiny, image_http):
    stream = client.chat.completions.create(
        model="mm1-tiny", stream=True, stream_options={"include_usage": True},
        messages=user("What color is the star?", f"{image_http}/shapes.png"))
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == solo(tiny, "What color is the star?", [SHAPES]) == "The star is blue."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 4


def test_sse_ends_with_done_and_text_only_prompt(url, tiny):
    body = {"messages": user("How many shapes are there?"), "stream": True, "max_tokens": 8}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    import json

    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == solo(tiny, "How many shapes are there?", max_tokens=8)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in events[-1]


def test_max_tokens_stop_and_seed(client):
    msgs = user("Describe the image.", data_url(SHAPES))
    r = client.chat.completions.create(model="mm1-tiny", messages=msgs, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = client.chat.completions.create(model="mm1-tiny", messages=msgs).choices[0].message.content
    r = client.chat.completions.create(model="mm1-tiny", messages=msgs, stop=[" on the"])
    assert r.choices[0].message.content == full[:full.index(" on the")]
    assert r.choices[0].finish_reason == "stop"
    runs = [client.chat.completions.create(model="mm1-tiny", messages=msgs, temperature=1.5,
                                           seed=s, max_tokens=12).choices[0].message.content
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0]
    r = client.chat.completions.create(model="mm1-tiny", messages=msgs, temperature=1.0, seed=-5,
                                       top_p=0.9, max_tokens=4)
    assert r.usage.completion_tokens >= 1


def test_conversation_reuses_the_prefix(client, tiny):
    first = user("What color is the star?", data_url(SHAPES))
    a = client.chat.completions.create(model="mm1-tiny", messages=first)
    turn2 = first + [{"role": "assistant", "content": a.choices[0].message.content},
                     {"role": "user", "content": "How many shapes are there?"}]
    b = client.chat.completions.create(model="mm1-tiny", messages=turn2)
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 1
    model, processor = tiny
    msgs = [{"role": "user", "content": "<image>\nWhat color is the star?"},
            {"role": "assistant", "content": a.choices[0].message.content},
            {"role": "user", "content": "How many shapes are there?"}]
    assert b.choices[0].message.content == generate(model, processor, msgs, [SHAPES])


def test_text_before_image_reads_as_the_cli(client, tiny):
    """OpenAI's examples send the text part first; one text part puts the images first (as the
    CLI does), interleaved parts keep their order."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What color is the star?"},
                                         {"type": "image_url", "image_url": {"url": data_url(SHAPES)}}]}]
    r = client.chat.completions.create(model="mm1-tiny", messages=msgs)
    assert r.choices[0].message.content == solo(tiny, "What color is the star?", [SHAPES])
    from mm1_mlx.server.schema import Message, flatten

    parts = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": "a"},
             {"type": "text", "text": "with"}, {"type": "image_url", "image_url": "b"}]
    out, images = flatten([Message.model_validate({"role": "user", "content": parts})], "<image>")
    assert out[0]["content"] == "Compare\n<image>\nwith\n<image>" and images == ["a", "b"]


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["mm1-tiny"]
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["model"] == "mm1-tiny"


# ---- errors ----
def post(url, body, timeout=60, **kw):
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, **kw)


def assert_error(r, status, word):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert word in err["message"].lower(), err["message"]
    assert "traceback" not in r.text.lower()


@pytest.mark.parametrize("image, word", [
    ("data:image/png;base64,!!!notbase64", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "not an image"),
    ("data:text/plain;base64,aGVsbG8=", "data url"),
    ("ftp://example.com/a.png", "scheme"),
    ("/etc/passwd", "outside"),
    ("notes.txt", "not an image"),
    ("escape.png", "outside"),
    ("../outside/secret.png", "outside"),
    ("missing.png", "not found"),
])
def test_bad_images_are_400(url, image, word):
    assert_error(post(url, {"messages": user("Describe it.", image)}), 400, word)


def test_image_errors_from_urls(url, image_http):
    assert_error(post(url, {"messages": user("Hi.", f"{image_http}/nothere.png")}), 400, "404")
    assert_error(post(url, {"messages": user("Hi.", f"{image_http}/broken.png")}), 400, "image")


def test_local_image_inside_the_allowed_directory(url, tiny):
    r = post(url, {"messages": user("What color is the star?", "shapes.png")})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == \
        solo(tiny, "What color is the star?", [SHAPES])


def test_local_images_refused_by_default(tiny, scheduler):
    with serve(create_app(make_server(tiny, scheduler))) as base:
        assert_error(post(base, {"messages": user("Hi.", SHAPES)}), 400, "allow-local-images")


@pytest.mark.parametrize("body, param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": user("hi"), "max_tokens": "5"}, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens"),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": user("hi"), "stream": "yes"}, "stream"),
    ({"messages": user("hi"), "n": 2}, "n"),
    ({"messages": user("hi"), "stop": 3}, "stop"),
    ({"messages": user("hi"), "seed": 1.5}, "seed"),
    ({"messages": user("hi"), "seed": 1 << 70}, "seed"),
    ({"messages": [1, 2]}, "messages.0"),
    ({"messages": user("hi"), "frequency_penalty": "x"}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
     "messages.0.content"),
])
def test_wrong_fields_are_400(url, body, param):
    r = post(url, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_other_errors(url, tiny):
    assert_error(httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=10),
                 400, "json")
    assert_error(post(url, {"model": "gpt-4o", "messages": user("hi")}), 404, "gpt-4o")
    assert_error(post(url, {"messages": user("hi", *[data_url(SHAPES)] * 4)}), 400, "images")
    context = tiny[0].config.text_config.max_position_embeddings
    assert_error(post(url, {"messages": user("red " * context)}), 400, "context")
    big = {"messages": user("hi"), "pad": "x" * (2 << 20)}
    assert_error(post(url, big), 413, "limit")
    assert_error(post(url, {"messages": user("an <image> tag")}), 400, "<image>")
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert_error(httpx.post(f"{url}/v1/chat/completions", content=b"[]", timeout=10), 400, "")
    assert_error(httpx.post(f"{url}/v1/chat/completions", content=b"", timeout=10), 400, "json")
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_image_pixel_limit(url, tiny, monkeypatch):
    monkeypatch.setattr(tiny[1].image, "max_pixels", 1000)
    assert_error(post(url, {"messages": user("Hi.", data_url(SHAPES))}), 400, "too large")


def test_api_key(tiny, scheduler):
    with serve(create_app(make_server(tiny, scheduler, api_key="s3cret"))) as base:
        assert_error(post(base, {"messages": user("hi")}), 401, "api key")
        assert_error(post(base, {"messages": user("hi")},
                          headers={"Authorization": "Bearer wrong"}), 401, "api key")
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert c.chat.completions.create(model="mm1-tiny", messages=user("hi"), max_tokens=2)


def test_queue_full_is_429(tiny):
    model, processor = tiny
    idle = Scheduler(model, processor, max_batch=1, max_queue=1)  # not started: nothing drains
    assert idle.submit(Job([1], [], [1], Sampling(), lambda e: None, time.monotonic() + 60))
    with serve(create_app(make_server(tiny, idle))) as base:
        assert_error(post(base, {"messages": user("hi")}), 429, "busy")


def test_cli_defaults_to_localhost():
    args = setup_arg_parser().parse_args(["--adapter", "a", "--temp", "0.5"])
    assert args.host == "127.0.0.1" and args.adapter_path == "a" and args.temperature == 0.5
    r = subprocess.run([sys.executable, "-m", "mm1_mlx.server", "--max-concurrency", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "max-concurrency" in r.stderr and "Traceback" not in r.stderr


# ---- batching ----
def _prefilled(tiny, text):
    model, processor = tiny
    p = processor.prepare_image(SHAPES)
    ids = processor.tokenize(processor.apply_chat_template(processor.messages(text, 1)), [p])
    kv = make_prompt_cache(model.language_model)
    feats = model.encode_images(mx.array(p.pixels)).reshape(-1, model.config.text_config.hidden_size)
    logits = prefill(model, ids, feats, 0, kv, processor.image_token_id)
    return kv, mx.argmax(logits[0, -1]).item()


@pytest.mark.parametrize("fast_path", [True, False])
def test_batched_decode_logits_equal_solo(tiny, fast_path, monkeypatch):
    """One decode step of three left-padded requests together equals each one alone (alone: the
    CPU decode step where it applies, else the MLX layers)."""
    monkeypatch.setattr(cpu_step, "ENABLED", fast_path)
    lm = tiny[0].language_model
    states = [_prefilled(tiny, q) for q in QUESTIONS[:3]]
    step = cpu_step.decode_step(lm) if fast_path else None
    assert (step is not None) == fast_path
    alone = [(step or lm)(lm.embed(mx.array([[t]])), kv)[0, -1] for kv, t in states]
    states = [_prefilled(tiny, q) for q in QUESTIONS[:3]]
    batch = [BatchKVCache.merge([kv[i] for kv, _ in states]) for i in range(len(lm.layers))]
    together = lm(lm.embed(mx.array([[t] for _, t in states])), batch)[:, -1]
    for a, b in zip(alone, together):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-4)
        assert mx.argmax(a).item() == mx.argmax(b).item()


def test_prefix_cache_is_bounded_and_never_written():
    cache = PrefixCache(max_bytes=20000)  # an entry: 2 x 256 x 4 floats
    kv = make_kv(10)
    cache.store(list(range(10)), [kv])
    found, n = cache.lookup(list(range(8)) + [99, 100], None)
    assert n == 8
    before = np.array(kv.keys)
    found[0].update_and_fetch(mx.ones((1, 1, 2, 4)), mx.ones((1, 1, 2, 4)))
    mx.eval(found[0].keys)
    np.testing.assert_array_equal(np.array(kv.keys), before)  # the stored entry is untouched
    for i in range(5):
        cache.store([100 + i] * 10, [make_kv(10)])
    assert 0 < cache.nbytes <= 20000 and len(cache.items) == 2


def make_kv(n):
    from mlx_lm.models.cache import KVCache

    c = KVCache()
    c.update_and_fetch(mx.random.normal((1, 1, n, 4)), mx.random.normal((1, 1, n, 4)))
    mx.eval(c.keys, c.values)
    return c


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS"))
    except OSError:
        return None


def test_load_16_streaming_clients_equal_their_solo_answers(url, tiny, scheduler, image_http):
    requests = []
    for i in range(16):
        q = QUESTIONS[i % len(QUESTIONS)]
        images = [] if i % 4 == 0 else [data_url(SHAPES) if i % 2 else f"{image_http}/shapes.png"]
        requests.append((q, images, 12 + 4 * (i % 5)))
    expected = [solo(tiny, q, [SHAPES] * len(im), max_tokens=m) for q, im, m in requests]
    rss = _rss_mb()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    peak = []

    def run(req):
        q, images, m = req
        stream = client.chat.completions.create(model="mm1-tiny", messages=user(q, *images),
                                                max_tokens=m, stream=True)
        peak.append(scheduler.stats()["active"])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(run, requests))
    assert answers == expected
    assert max(peak) > 1, "the requests never decoded together"
    assert httpx.get(f"{url}/health").json()["active"] == 0
    assert scheduler.prefix.nbytes <= scheduler.prefix.max_bytes
    if rss is not None:
        assert _rss_mb() - rss < 500


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation(tiny, stream, monkeypatch):
    from mm1_mlx.server import app

    monkeypatch.setattr(app, "POLL_S", 0.05)
    model, processor = tiny
    endless = Scheduler(model, processor)
    endless.eos = set()  # only the client can stop it
    endless.start()
    body = {"messages": user("Describe the image.", data_url(SHAPES)), "stream": stream,
            "max_tokens": 100000}
    try:
        with serve(create_app(make_server(tiny, endless))) as base:
            if stream:
                with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                                  timeout=120) as r:
                    next(r.iter_lines())
            else:
                with pytest.raises(httpx.ReadTimeout):
                    post(base, body, timeout=0.5)
            deadline = time.monotonic() + 20
            while endless.cancelled == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            stats = endless.stats()
            assert endless.cancelled == 1 and stats["active"] == stats["queued"] == 0
    finally:
        endless.stop()


# ---- the TUI as a client ----
def test_server_engine_streams_the_servers_answer(url, tiny):
    from app.engine import Settings
    from app.server_engine import ServerEngine, _openai_messages

    msgs = [{"role": "user", "content": "<image>\nWhat color is the star?"}]
    assert _openai_messages(msgs, [SHAPES])[0]["content"][1] == {
        "type": "text", "text": "What color is the star?"}
    engine = ServerEngine(url)
    assert engine.model == "mm1-tiny"
    chunks = list(engine.stream(msgs, [SHAPES], Settings(), engine.new_cache()))
    assert "".join(c.text for c in chunks) == solo(tiny, "What color is the star?", [SHAPES])
    assert chunks[-1].finish_reason == "stop" and chunks[-1].generation_tokens >= 4
    with pytest.raises(mm1_mlx.errors.MM1Error, match="does not exist|cannot reach"):
        ServerEngine("http://127.0.0.1:9").stream(msgs, [SHAPES], Settings(), None)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_tui_chats_through_the_server(url, tiny, tmp_path):
    pytest.importorskip("textual", reason="the tui extra is not installed")
    from textual_image.widget import UnicodeImage

    from app.app import ChatApp
    from app.server_engine import ServerEngine

    app = ChatApp(loader=lambda spec, adapter: ServerEngine(url), data_dir=tmp_path / "data",
                  image_widget=UnicodeImage, picker_root=tmp_path)
    async with app.run_test(size=(110, 36)) as pilot:
        for text in (f"/image {SHAPES}", "What color is the star?"):
            await _settle(app, pilot)
            app.query_one("#prompt").value = text
            await pilot.press("enter")
        await _settle(app, pilot)
        [conv] = app.store.conversations()
        reply = app.store.messages(conv.id)[-1]
        assert (reply.role, reply.finish) == ("assistant", "stop")
        assert reply.content == solo(tiny, "What color is the star?", [SHAPES])


async def _settle(app, pilot):
    for _ in range(3):
        await pilot.pause()
        for worker in [w for w in app.workers if w.group in ("model", "attach", "generate")]:
            await worker.wait()
        await pilot.pause()


@pytest.mark.slow
def test_serve_benchmark_runs_end_to_end(tmp_path, monkeypatch):
    from benchmarks import serve

    monkeypatch.setattr(serve, "CLIENTS", (1, 2))
    res = serve.main(["--model", "mm1-tiny", "--requests", "4", "--max-tokens", "4",
                      "--serial-clients", "2", "--out", str(tmp_path),
                      "--cache", str(tmp_path / "cache")])
    rows = res["rows"]
    assert [(r["system"].split()[1], r["clients"]) for r in rows] == [
        ("batched", 1), ("batched", 2), ("one", 2)]
    assert all(r["tokens"] >= 4 and r["tokens_per_s"] > 0 and r["ttft_p95_s"] >= r["ttft_p50_s"] > 0
               for r in rows)
    assert "| mm1-mlx batched" in (tmp_path / "serve.md").read_text()
    assert serve.percentile([1, 2, 3, 4], 0.5) == 2.5
