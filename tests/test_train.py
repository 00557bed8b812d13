"""The training recipe: a short smoke run learns, saves atomically and resumes exactly."""

import mm1_mlx  # noqa: F401, I001

import json
import random
import time

import mlx.core as mx
import numpy as np

from mm1_mlx.shapes import world
from mm1_mlx.checkpoint import load
from mm1_mlx.models.model import Model
from mm1_mlx.shapes.train import RECIPES, make_batch, setup_processor, train


def test_shapes_world_is_deterministic_and_never_shows_new_concepts():
    a = world.sft_sample(random.Random("x"))
    b = world.sft_sample(random.Random("x"))
    assert a[0] == b[0] and np.array_equal(np.asarray(a[1][0]), np.asarray(b[1][0]))
    rng = random.Random(0)
    for _ in range(200):
        _, text, _ = world.pretrain_sample(rng, (0.45, 0.45, 0.1))
        msgs, _ = world.sft_sample(rng)
        words = (text + " ".join(m["content"] for m in msgs)).lower()
        assert "hexagon" not in words and "teal" not in words


def test_questions_answer_from_the_scene():
    rng = random.Random(3)
    scene = world.random_scene(rng, n=3)
    qa = {k: (q, a) for k, q, a in world.questions(rng, scene)}
    assert qa["count"][1] == "There are three shapes."
    kinds = {s.kind: s for s in scene.shapes}
    for kind in ("color", "where"):
        q, a = qa[kind]
        shape = next(k for k in kinds if k in q)
        assert (kinds[shape].color if kind == "color" else world.WHERE[kinds[shape].position]) in a


def test_pretraining_describes_scenes_keyed_by_colour_and_by_shape():
    rng = random.Random(4)
    scene = world.Scene([world.Shape("star", "blue", "top"), world.Shape("circle", "red", "left")],
                       None)
    assert world.shape_caption(scene) == ("The circle is red and on the left. "
                                          "The star is blue and at the top.")
    assert world.shape_tags(scene) == "circle red left, star blue top."
    forms = {world.describe(rng, scene)[0] for _ in range(50)}
    assert forms == {"caption", "sentences", "tags"}
    texts = [world.pretrain_sample(rng, (0.45, 0.45, 0.1))[1] for _ in range(300)]
    assert any(" is tagged " in t or "Tags of picture" in t for t in texts)
    assert any(t.startswith("<image>\nThe ") for t in texts)


def test_pixels_match_named_colours():
    rng = random.Random(5)
    for color in world.COLORS:
        scene = world.random_scene(rng, colors=[color], shapes=["square"], n=1)
        img = np.asarray(scene.image.convert("RGB")).reshape(-1, 3).astype(int)
        bg = np.median(img, axis=0)
        shape_px = img[np.abs(img - bg).sum(1) > 60]
        assert len(shape_px) > 50, color


def test_stage0_labels_follow_the_drawing():
    rng = random.Random(11)
    scene = world.random_scene(rng, n=2)
    kinds, cols = world.slot_labels(scene)
    for s in scene.shapes:
        k = world.POSITIONS.index(s.position)
        assert (kinds[k], cols[k]) == (1 + world.SHAPES.index(s.kind), 1 + world.COLORS.index(s.color))
        x, y = s.center  # recorded while drawing: near its slot, and the drawn pixels are there
        assert abs(x - world.SLOTS[s.position][0]) <= 0.06 and abs(y - world.SLOTS[s.position][1]) <= 0.06
        img = np.asarray(scene.image.convert("RGB")).astype(int)
        h = img.shape[0]
        bg = img[1, 1]
        assert np.abs(img[int(y * h), int(x * h)] - bg).sum() > 60
    assert sum(k == 0 for k in kinds) == len(world.POSITIONS) - 2
    # 4x4 token cells: a cell takes the shape covering most of it; the cell holding a centre is it
    cells, cell_cols = world.token_labels(scene, 4)
    for s in scene.shapes:
        x, y = s.center
        k = int(y * 4) * 4 + int(x * 4)
        assert (cells[k], cell_cols[k]) == (1 + world.SHAPES.index(s.kind),
                                           1 + world.COLORS.index(s.color))
    assert sum(c > 0 for c in cells) < 16  # the background stays "nothing"


def test_smoke_recipe_learns_and_resumes(tmp_path):
    recipe = RECIPES["smoke"]()
    recipe.pretrain_steps, recipe.sft_steps = 12, 8
    run = tmp_path / "run"
    model, proc, losses = train(recipe, run, save_every=4, out=tmp_path / "model", quiet=True)
    enc = [loss for stage, loss in losses if stage == "encoder"]
    pre = [loss for stage, loss in losses if stage == "pretrain"]
    assert len(enc) == 24 and np.mean(enc[-4:]) < 0.9 * np.mean(enc[:4])  # stage 0 learns
    assert np.mean(pre[-3:]) < 0.7 * np.mean(pre[:3])  # loss falls
    assert (run / "loss.png").stat().st_size > 1000
    m2, _ = load(str(tmp_path / "model"))  # the final checkpoint opens with mm1_mlx.load
    # resume: rewind the saved state to step 4 of SFT, then continue -> same weights as before
    again = RECIPES["smoke"]()
    again.pretrain_steps, again.sft_steps = 12, 8
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert progress == {"stage": "sft", "step": 8, "losses": [list(x) for x in losses]}
    # the batches are a pure function of the step: a resumed run sees the same data
    ids_a, _, _ = make_batch(setup_processor(run, again), again, "sft", 5)
    ids_b, _, _ = make_batch(proc, recipe, "sft", 5)
    assert np.array_equal(ids_a, ids_b)


def test_encoder_stage_trains_the_image_encoder_then_freezes_the_vit(tmp_path):
    from mlx.utils import tree_flatten

    r = RECIPES["smoke"]()
    r.encoder_steps, r.pretrain_steps, r.sft_steps, r.encoder_batch_size = 4, 0, 0, 4
    mx.random.seed(r.seed)  # as train() does before building the model
    fresh = dict(tree_flatten(Model(r.model).parameters()))
    model, _, _ = train(r, tmp_path, save_every=2, quiet=True)
    after0 = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert (tmp_path / "state" / "head.safetensors").exists()
    changed = {k for k in after0 if not np.allclose(after0[k], np.array(fresh[k]))}
    assert changed and all(k.startswith(("vision_tower.", "connector.")) for k in changed)
    r.pretrain_steps, r.batch_size = 3, 4  # the same run goes on into pre-training
    model, _, losses = train(r, tmp_path, save_every=2, quiet=True)
    assert [s for s, _ in losses] == ["encoder"] * 4 + ["pretrain"] * 3
    after1 = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for k in after0:
        same = np.array_equal(after0[k], after1[k])
        assert same == k.startswith("vision_tower."), k  # ViT frozen, everything else trains


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    def recipe(steps):
        r = RECIPES["smoke"]()
        r.pretrain_steps, r.sft_steps, r.batch_size = steps, 0, 4
        r.encoder_steps, r.encoder_batch_size = 4, 4
        return r

    full, _, _ = train(recipe(6), tmp_path / "a", save_every=3, quiet=True)
    state = tmp_path / "b" / "state" / "progress.json"
    train(recipe(6), tmp_path / "b", save_every=3, quiet=True, max_steps=3)  # stops after a save
    assert json.loads(state.read_text())["stage"] == "encoder"
    train(recipe(6), tmp_path / "b", save_every=3, quiet=True, max_steps=5)  # the last save: step 3
    assert json.loads(state.read_text())["stage"] == "pretrain"
    assert json.loads(state.read_text())["step"] == 3
    resumed, _, _ = train(recipe(6), tmp_path / "b", save_every=3, quiet=True)
    from mlx.utils import tree_flatten

    a, b = dict(tree_flatten(full.parameters())), dict(tree_flatten(resumed.parameters()))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-4, err_msg=k)


def test_cli_saves_on_sigint_and_says_where_it_resumes(tmp_path, capsys):
    """Ctrl-C (SIGINT) stops `python -m mm1_mlx.train` after the current step, saved; the next
    run says where it resumes."""
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mm1_mlx.train", "--recipe", "smoke", "--run-dir", str(run),
           "--pretrain-steps", "5000", "--save-every", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "tokenizer" / "tokenizer.json").exists() and time.time() < deadline:
        time.sleep(0.2)  # the tokenizer is made after the handlers are set
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert progress["step"] >= 1 and "stopped:" in err and "Traceback" not in err
    r = RECIPES["smoke"]()
    r.pretrain_steps = 5000
    train(r, run, save_every=100000, quiet=True, max_steps=1)
    assert (f"stage {progress['stage']}, step {progress['step']} of"
            in capsys.readouterr().err)


def test_independent_drawing_for_the_robustness_check():
    from mm1_mlx.shapes import redraw
    from mm1_mlx.shapes.eval import heldout

    a = heldout(3, "x", drawing="independent")
    b = heldout(3, "x", drawing="independent")
    for (sa, qa), (sb, qb) in zip(a, b):  # deterministic by seed, with every question type
        assert qa == qb and np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
        assert set(qa) == {"color", "shape", "count", "exists", "where", "describe"}
    rng = random.Random(2)
    for kind in world.SHAPES:
        scene = redraw.random_scene(rng, shapes=[kind], colors=["red"], n=1)
        img = np.asarray(scene.image).astype(int)
        h = img.shape[0]
        x, y = redraw.CENTERS[scene.shapes[0].position]
        r, g, b = img[int(y * h), int(x * h)]  # the middle of its place is red
        assert r > 150 and g < 90 and b < 90, (kind, r, g, b)


def test_text_stage_trains_the_decoder_alone_and_pretraining_starts_from_it(tmp_path):
    from mlx.utils import tree_flatten

    r = RECIPES["smoke"]()
    r.text_steps, r.encoder_steps, r.pretrain_steps, r.sft_steps, r.batch_size = 3, 0, 0, 0, 4
    mx.random.seed(r.seed)
    fresh = dict(tree_flatten(Model(r.model).parameters()))
    model, _, losses = train(r, tmp_path / "text", save_every=2, quiet=True)
    assert [s for s, _ in losses] == ["text"] * 3
    changed = {k for k, v in tree_flatten(model.parameters())
               if not np.array_equal(np.array(v), np.array(fresh[k]))}
    assert changed and all(k.startswith("language_model.") for k in changed)
    # text batches hold text only: no image tokens, no pixels
    ids, _, px = make_batch(setup_processor(tmp_path / "text", r), r, "text", 0)
    assert px is None and ids.shape[0] == 4
    decoder = tmp_path / "decoder.safetensors"
    mx.save_safetensors(str(decoder), dict(tree_flatten(model.language_model.parameters())))
    # another run (another seed: another random decoder) starts pre-training from that decoder;
    # a zero learning rate keeps the weights it loaded
    p = RECIPES["smoke"]()
    p.seed, p.encoder_steps, p.pretrain_steps, p.sft_steps, p.batch_size = 5, 0, 1, 0, 2
    p.learning_rate, p.weight_decay, p.decoder_init = 0.0, 0.0, str(decoder)
    started, _, _ = train(p, tmp_path / "pre", quiet=True)
    want = dict(tree_flatten(model.language_model.parameters()))
    for k, v in tree_flatten(started.language_model.parameters()):
        np.testing.assert_array_equal(np.array(v), np.array(want[k]), err_msg=k)


def test_prefetched_batches_equal_the_unprefetched_ones(tmp_path):
    from mm1_mlx.tuner.batching import prefetch

    r = RECIPES["smoke"]()
    r.batch_size = 3
    proc = setup_processor(tmp_path, r)
    steps = range(2, 7)
    ahead = list(prefetch(lambda s: make_batch(proc, r, "pretrain", s), steps))
    assert [s for s, _ in ahead] == list(steps)
    for (_, got), step in zip(ahead, steps):
        want = make_batch(proc, r, "pretrain", step)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                assert np.array_equal(g, w)


def test_recipes_write_the_bundled_models_settings():
    """``--recipe tiny --install`` reproduces the bundled mm1-tiny's files: its image settings,
    the fine-tuning size (144 px, README "Fine-tuning") included."""
    from mm1_mlx.checkpoint import WEIGHTS_DIR
    from mm1_mlx.processor import ImageSettings

    for name, recipe in (("mm1-tiny", "tiny"), ("mm1-tiny-moe", "tiny-moe")):
        saved = json.loads((WEIGHTS_DIR / name / "preprocessor_config.json").read_text())
        assert ImageSettings.from_dict(saved) == RECIPES[recipe]().image, name
    assert RECIPES["tiny"]().image.finetune_image_size == 144
    assert RECIPES["tiny-moe"]().image.finetune_image_size is None  # measured on mm1-tiny only
