"""Generation: the CLI as users call it, the API, streaming, the image prefix cache, tiling."""

import mm1_mlx  # noqa: F401, I001

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_config, make_model, make_processor
from mlx_lm.models.cache import make_prompt_cache
from PIL import Image

from mm1_mlx.generate import PromptCache, generate, position_keys, prefill, stream_generate
from mm1_mlx.processor import tiles_for


@pytest.fixture(scope="module")
def model(processor):
    return make_model(make_config(processor))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (48, 40), (220, 20, 20)).save(p)
    return p


def run_cli(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mm1_mlx.generate", *map(str, args)],
                          capture_output=True, text=True, input=stdin, env=env, timeout=300)


def test_api_equals_cli_and_stream_concatenates(model, processor, tiny_checkpoint, image_file):
    from mm1_mlx import load

    m, p = load(str(tiny_checkpoint))
    api = generate(m, p, "what color is the square ?", [image_file], max_tokens=12)
    chunks = list(stream_generate(m, p, "what color is the square ?", [image_file], max_tokens=12))
    assert "".join(c.text for c in chunks) == api
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].generation_tokens >= 1
    r = run_cli("--model", tiny_checkpoint, "--image", image_file, "--prompt",
                "what color is the square ?", "--max-tokens", 12, "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == api
    for key in ("image encode", "tokens/s", "time to first token", "peak memory"):
        assert key in r.stderr
    r2 = run_cli("--model", tiny_checkpoint, "--image", image_file, "--prompt", "-",
                 "--max-tokens", 12, stdin="what color is the square ?")
    assert r2.returncode == 0 and r2.stdout.rstrip("\n") == api


def test_prefix_cache_gives_identical_logits(model, processor, image_file):
    first = "<image>\nwhat color is the square ?"
    second = "<image>\nhow many shapes are there ?"
    cache = PromptCache()
    list(stream_generate(model, processor, first, [image_file], max_tokens=3, prompt_cache=cache))
    ids, px, keys = processor(second, [image_file])
    feats = cache.features[keys[0]]
    assert len(cache.features) == 1
    kv, start = cache.reuse(model, position_keys(ids, processor.image_token_id, keys,
                                                 [processor.num_image_tokens]))
    assert start > processor.num_image_tokens  # the image and the text before it are reused
    n_before = sum(1 for t in ids[:start] if t == processor.image_token_id)
    cached = prefill(model, ids[start:], feats, n_before, kv, processor.image_token_id)[0, -1]
    fresh = model(mx.array([ids]), mx.array(px))[0, -1]
    np.testing.assert_allclose(np.array(cached), np.array(fresh), atol=1e-5, rtol=1e-5)
    # same pixels from a different file and path are the same image
    out = list(stream_generate(model, processor, second, [Image.open(image_file)], max_tokens=3,
                               prompt_cache=cache))
    assert out[-1].prefilled_tokens < out[-1].prompt_tokens


def test_cached_and_uncached_generation_agree(model, processor, image_file):
    cache = PromptCache()
    for q in ["what color is the square ?", "where is the star ?", "what color is the square ?"]:
        a = generate(model, processor, q, [image_file], max_tokens=8, prompt_cache=cache)
        b = generate(model, processor, q, [image_file], max_tokens=8)
        assert a == b


def test_chunked_prefill_equals_one_pass(model, processor, image_file):
    ids, px, _ = processor("<image> what color <image> where", [image_file, image_file])
    feats = model.encode_images(mx.array(px)).reshape(-1, 64)
    one = prefill(model, ids, feats, 0, make_prompt_cache(model.language_model), processor.image_token_id)
    kv = make_prompt_cache(model.language_model)
    many = prefill(model, ids, feats, 0, kv, processor.image_token_id, step=3)
    np.testing.assert_allclose(np.array(one[0, -1]), np.array(many[0, -1]), atol=1e-5)


def test_placeholders_and_images_order(processor, image_file):
    ids, px, _ = processor("hello <image> world <image>", [image_file, Image.new("RGB", (9, 9))])
    assert px.shape[0] == 2
    first_img = ids.index(processor.image_token_id)
    text = processor.tokenizer.decode(ids[:first_img])
    assert "hello" in text and "world" not in text  # the first image sits between the words
    T = processor.num_image_tokens
    assert processor.tokenizer.decode([ids[first_img + T]]) == "world"
    ids2, _, _ = processor("what color", [image_file])  # no placeholder: image first
    what = processor.tokenizer.convert_tokens_to_ids("what")
    assert ids2.index(processor.image_token_id) < ids2.index(what)
    with pytest.raises(mm1_mlx.errors.MM1Error):
        processor("<image> <image>", [image_file])


def test_high_resolution_splitting():
    p = make_processor(image_size=672, num_image_tokens=144, max_image_tiles=4)
    img = Image.new("RGB", (1344, 1344), (10, 200, 10))
    prepared = p.prepare_image(img)
    assert prepared.pixels.shape == (5, 672, 672, 3)  # 2x2 tiles + overview
    ids, px, _ = p("<image> what", [img])
    assert ids.count(p.image_token_id) == 5 * 144
    assert tiles_for(1344, 1344, 672, 4) == 5 and tiles_for(1344, 1344, 672, 1) == 1
    assert p.prepare_image(img, max_tiles=1).pixels.shape[0] == 1
    assert tiles_for(2688, 1344, 672, 8) == 9  # 4x2 grid for a 2:1 image


def test_prompt_too_long_is_an_error(processor, image_file):
    small = make_model(make_config(processor, context=16))
    with pytest.raises(mm1_mlx.errors.MM1Error, match="longer than the model's context"):
        generate(small, processor, "what color " * 20, [image_file])


BAD_INPUTS = {
    "missing": (None, "image not found"),
    "text.jpg": (b"this is not an image\n", "not an image"),
    "empty.png": (b"", "empty"),
    "truncated.png": ("truncate", "cannot read image"),
    "bomb.png": ("bomb", "too large"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_cli_bad_images(name, tiny_checkpoint, tmp_path, image_file):
    content, message = BAD_INPUTS[name]
    path = tmp_path / name
    if content == "truncate":
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
        img.save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "bomb":
        Image.new("1", (9000, 6000)).save(path)  # 54 MP, tiny on disk
    elif content is not None:
        path.write_bytes(content)
    r = run_cli("--model", tiny_checkpoint, "--image", path, "--prompt", "what")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_bad_model_and_prompt(tiny_checkpoint, image_file, tmp_path):
    r = run_cli("--model", tmp_path / "nope", "--image", image_file, "--prompt", "what")
    assert r.returncode == 2 and "model not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--model", "someorg/not-a-model", "--image", image_file, "--prompt", "what")
    assert r.returncode == 2 and "could not be fetched" in r.stderr
    r = run_cli("--model", tiny_checkpoint, "--image", image_file, "--prompt", "what " * 600)
    assert r.returncode == 2 and "longer than the model's context" in r.stderr
    r = run_cli("--model", tiny_checkpoint, "--image", image_file, "--prompt", "what",
                "--max-pixels", 100)
    assert r.returncode == 2 and "too large" in r.stderr


def test_content_part_chat_templates(processor):
    """llava-hf style templates iterate over typed content parts, not a string."""
    from conftest import make_tokenizer

    from mm1_mlx.processor import Processor

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {% for c in m['content'] | selectattr('type', "
        "'equalto', 'image') %}<image> {% endfor %}{% for c in m['content'] | selectattr('type', "
        "'equalto', 'text') %}{{ c['text'] }} {% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}")
    p = Processor(tok, processor.image, processor.num_image_tokens)
    text = p.apply_chat_template([{"role": "user", "content": "<image>\nwhat color is it ?"}])
    assert text == "user <image> what color is it ? assistant"


def test_cli_adapter_for_another_base(tiny_checkpoint, image_file, tmp_path):
    from mm1_mlx import load
    from mm1_mlx.tuner import adapters

    model, _ = load(str(tiny_checkpoint))
    params = adapters.lora_config(4, 8.0, 0.0, -1, ["self_attn.q_proj", "self_attn.v_proj"])
    model.freeze()
    adapters.apply_lora(model, params)
    (tmp_path / "ad").mkdir()
    adapters.write_adapters(tmp_path / "ad", model, adapters.adapter_config(model, params, False))
    ok = run_cli("--model", tiny_checkpoint, "--adapter", tmp_path / "ad", "--image", image_file,
                 "--prompt", "what", "--max-tokens", 2)
    assert ok.returncode == 0, ok.stderr
    r = run_cli("--model", "mm1-tiny", "--adapter", tmp_path / "ad", "--image", image_file,
                "--prompt", "what")
    assert r.returncode == 2 and "not on this model" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_package_api_names_are_the_functions():
    code = ("from mm1_mlx import load, generate, stream_generate, save\n"
            "import types\n"
            "assert not any(isinstance(f, types.ModuleType) for f in "
            "(load, generate, stream_generate, save))\n"
            "import mm1_mlx\nassert callable(mm1_mlx.generate)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
