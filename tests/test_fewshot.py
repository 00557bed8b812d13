"""Few-shot prompts (no leakage, K+1 images, answers from the pool) and the 95% intervals."""

from __future__ import annotations

import random

import pytest

from mm1_mlx.images import pixel_hash
from mm1_mlx.shapes import fewshot

TESTS = fewshot.items(6, "heldout-test")
POOL = fewshot.items(64, fewshot.POOL_SEED)


@pytest.mark.parametrize("k", [0, 2, 4, 8])
def test_context_has_no_leak_and_k_plus_one_images(k):
    pool_keys = {(p.key, p.question, p.answer) for p in POOL}
    for i, item in enumerate(TESTS):
        context = fewshot.choose_context(item, POOL, k, random.Random(i))
        assert len(context) == k
        for c in context:
            assert pixel_hash(c.scene.image) != pixel_hash(item.scene.image)
            assert c.answer != item.answer and item.answer not in (c.answer, c.full)
            assert c.kind == item.kind
            assert (c.key, c.question, c.answer) in pool_keys  # solved examples come from the pool
        fewshot.check_context(item, context)
        msgs, images = fewshot.chat_prompt(context, item)
        assert len(images) == k + 1 and images[-1] is item.scene.image
        assert sum(m["content"].count("<image>") for m in msgs) == k + 1
        assert [m["content"] for m in msgs if m["role"] == "assistant"] == [c.answer for c in context]
        text, raw_images = fewshot.raw_prompt(context, item)
        assert text.count("<image>") == k + 1 and len(raw_images) == k + 1
        assert text.rstrip().endswith("Answer:") or item.kind == "caption"


def test_pool_and_tests_share_no_image():
    assert not {p.key for p in POOL} & {t.key for t in TESTS}


def test_check_context_catches_the_test_image_and_answer():
    item = TESTS[0]
    with pytest.raises(AssertionError, match="test image"):
        fewshot.check_context(item, [item])
    same_answer = next(p for p in POOL if p.kind == item.kind and p.answer == item.answer)
    with pytest.raises(AssertionError, match="test answer"):
        fewshot.check_context(item, [same_answer])


def test_tokenized_prompt_holds_k_plus_one_images():
    from mm1_mlx.checkpoint import WEIGHTS_DIR
    from mm1_mlx.processor import Processor

    processor = Processor.from_pretrained(str(WEIGHTS_DIR / "mm1-tiny"))
    item = TESTS[1]
    context = fewshot.choose_context(item, POOL, 4, random.Random(0))
    msgs, images = fewshot.chat_prompt(context, item)
    prepared = [processor.prepare_image(im, max_tiles=1) for im in images]
    ids = processor.tokenize(processor.apply_chat_template(msgs), prepared)
    assert ids.count(processor.image_token_id) == 5 * processor.num_image_tokens


def test_short_answers_and_exact_scoring():
    counts = [t for t in TESTS if t.kind == "count"]
    assert all(t.answer == str(len(t.scene.shapes)) for t in counts)
    color = next(t for t in TESTS if t.kind == "color")
    assert color.answer in color.full and " " not in color.answer
    assert fewshot.exact(f" {color.answer.title()}.", color.answer) == 1.0
    assert fewshot.exact(color.full, color.answer) == 0.0  # the right fact in the wrong format
    assert fewshot.score_item(color, color.full) == {"exact": 0.0, "lenient": 1.0}


def test_wilson_interval():
    lo, hi = fewshot.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = fewshot.wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert fewshot.wilson(10, 10)[1] == 1.0


def test_bootstrap_interval_and_summary():
    assert fewshot.bootstrap([0.5] * 20) == (0.5, 0.5)
    lo, hi = fewshot.bootstrap([0.0, 1.0] * 50 + [0.5] * 100)
    assert lo < 0.5 < hi and hi - lo < 0.15
    s = fewshot.summarize([{"f1": 0.2}, {"f1": 0.4}], "f1")
    assert s["mean"] == 30.0 and s["interval"] == "bootstrap" and s["ci95"][0] <= 30.0
    s = fewshot.summarize([{"exact": 1.0}, {"exact": 0.0}], "exact")
    assert s["interval"] == "wilson" and s["mean"] == 50.0


@pytest.mark.parametrize("flags", [["--shots", "two"], ["--shots", "0,-1"], ["--shots", "40"],
                                   ["--shots", "0,2", "--drawing", "independent"]])
def test_bad_shots_flags_are_one_line(flags, capsys):
    from mm1_mlx import eval as eval_cli

    with pytest.raises(SystemExit) as e:
        eval_cli.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
