"""LoRA fine-tuning: data formats, bad input, LoRA layers, training, adapters, resume after crashes."""

import dataclasses
import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_config, make_model, make_processor
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from PIL import Image

from mm1_mlx import checkpoint, lora
from mm1_mlx.errors import MM1Error
from mm1_mlx.io import atomic
from mm1_mlx.tuner import adapters, trainer
from mm1_mlx.tuner import datasets as finetune_data

COLORS = {"red": (230, 20, 20), "blue": (20, 40, 230), "green": (20, 170, 40),
          "yellow": (240, 220, 10)}


def write_images(directory: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n images of one coloured square each -> [(relative path, colour)]."""
    rng = random.Random(seed)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        c = rng.choice(sorted(COLORS))
        img = Image.new("RGB", (40, 40), (250, 250, 250))
        img.paste(COLORS[c], (8, 8, 32, 32))
        img.save(directory / "img" / f"{i}.png")
        out.append((f"img/{i}.png", c))
    return out


def write_dataset(directory: Path, n: int = 16, seed: int = 0) -> Path:
    """A plain image/prompt/response JSONL about square colours (words the test tokenizer knows)."""
    path = directory / "train.jsonl"
    with open(path, "w") as f:
        for rel, c in write_images(directory, n, seed):
            f.write(json.dumps({"image": rel, "prompt": "what color is the square ?",
                                "response": f"it is {c} ."}) + "\n")
    return path


def small_args(ckpt, data, out, **kw) -> lora.TrainingArgs:
    base = dict(model=str(ckpt), data=str(data), adapter_path=str(out), iters=6, batch_size=4,
                learning_rate=3e-3, save_every=3, steps_per_eval=3)
    return lora.TrainingArgs(**{**base, **kw})


def logits_of(model, processor, image):
    ids, px, _ = processor("what color is the square ?", [image])
    return model(mx.array([ids]), mx.array(px))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


# ---- data ----
def test_three_formats_read_the_same(tmp_path):
    (rel, c), = write_images(tmp_path / "sub", 1)
    q, a = "what color is the square ?", f"it is {c} ."
    (tmp_path / "sub" / "llava.json").write_text(json.dumps([{"image": rel, "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}], indent=2))
    (tmp_path / "sub" / "messages.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a}]}], "images": [rel]}) + "\n")
    (tmp_path / "sub" / "plain.jsonl").write_text(
        json.dumps({"image": rel, "prompt": q, "response": a}) + "\n")
    got = []
    for name in ("llava.json", "messages.jsonl", "plain.jsonl"):
        samples, problems = finetune_data.read_samples(tmp_path / "sub" / name)
        assert problems == [] and len(samples) == 1
        got.append((samples[0].messages, samples[0].images))
    assert got[0] == got[1] == got[2]
    assert got[0][0] == [{"role": "user", "content": f"<image>\n{q}"},
                         {"role": "assistant", "content": a}]
    assert got[0][1] == [tmp_path / "sub" / rel]  # relative to the data file, not the cwd


def test_bad_records_are_named_by_file_and_line(tmp_path, processor):
    (rel, _), = write_images(tmp_path, 1)
    good = {"image": rel, "prompt": "what color is the square ?", "response": "it is red ."}
    lines = [
        json.dumps(good),
        '{"image": "img/0.png", "prompt": "what',  # 2: malformed
        json.dumps(dict(good, image="img/missing.png")),  # 3: missing image
        json.dumps({"messages": [{"role": "user", "content": "<image>\nhello"}],
                    "images": [rel]}),  # 4: no assistant turn
        json.dumps(dict(good, prompt="<image> <image> what color ?")),  # 5: 2 placeholders, 1 image
        json.dumps(dict(good, response="it is red . " * 40)),  # 6: too long
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds, problems = finetune_data.load_dataset(path, processor, max_length=60)
    assert len(ds) == 1 and ds[0].where == f"{path}:1"
    assert len(problems) == 5
    expect = {2: "malformed JSON", 3: "image not found", 4: "no assistant turn",
              5: "2 <image> placeholders but 1 images", 6: "longer than the maximum length 60"}
    for line, words in expect.items():
        assert any(p.startswith(f"{path}:{line}: ") and words in p for p in problems), (line,
                                                                                        problems)
    with pytest.raises(MM1Error, match=rf"{path}:2: malformed JSON.*and 4 more"):
        finetune_data.load_dataset(path, processor, max_length=60, on_bad_data="fail")
    # a LLaVA JSON array: the bad item's line within the file
    arr = tmp_path / "bad.json"
    arr.write_text(json.dumps([{"image": rel, "conversations": [{"from": "human", "value": "hi"}, {
        "from": "gpt", "value": "it is red ."}]}, {"image": "nope.png", "conversations": []}],
        indent=1))
    _, problems = finetune_data.read_samples(arr)
    bad_line = [i for i, t in enumerate(arr.read_text().splitlines(), 1) if t == " {"][1]
    assert len(problems) == 1 and problems[0].startswith(f"{arr}:{bad_line}: ")


def test_mask_prompt_selects_assistant_tokens(data, processor):
    sample = finetune_data.read_samples(data)[0][0]
    on = finetune_data.encode(sample, processor, 512, mask_prompt=True)
    off = finetune_data.encode(sample, processor, 512, mask_prompt=False)
    tok = processor.tokenizer
    answer = sample.messages[1]["content"]
    trained = tok.convert_ids_to_tokens([i for i, m in zip(on.ids, on.mask) if m])
    assert [t for t in trained if t != "\n"] == answer.split() + ["<|end|>"]
    trained = tok.convert_ids_to_tokens([i for i, m in zip(off.ids, off.mask) if m])
    assert [t for t in trained if t != "\n"] == ["<|user|>", *"what color is the square ?".split(),
                                                  "<|end|>", "<|assistant|>", *answer.split(),
                                                  "<|end|>"]
    assert not any(m for i, m in zip(off.ids, off.mask) if i == processor.image_token_id)


# ---- LoRA layers ----
@pytest.mark.parametrize("experts", [0, 4])
def test_lora_layers_wrap_attention_mlp_and_experts(processor, experts):
    model = make_model(make_config(processor, experts=experts))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    before = logits_of(model, processor, image)
    model.freeze()
    params = adapters.lora_config(4, 8.0, 0.0, -1, adapters.LORA_KEYS)
    wrapped = adapters.apply_lora(model, params)
    layer1 = "language_model.model.layers.1."
    assert f"{layer1}self_attn.q_proj" in wrapped and f"{layer1}self_attn.o_proj" in wrapped
    if experts:  # layer 1 is the MoE layer (moe_every=2): expert stacks wrapped, router not
        assert isinstance(model.language_model.layers[1].mlp.switch_mlp.gate_proj,
                          LoRASwitchLinear)
        assert f"{layer1}mlp.gate" not in wrapped
    else:
        assert isinstance(model.language_model.layers[1].mlp.down_proj, LoRALinear)
    names = adapters.trainable_weights(model)
    assert names and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in names)
    # lora_b starts at zero: the wrapped model computes exactly what the base did
    assert mx.allclose(logits_of(model, processor, image), before, atol=1e-5)
    with pytest.raises(MM1Error, match="already has LoRA"):
        adapters.apply_lora(model, params)


def test_vision_lora_wraps_the_vit_and_changes_image_features(processor):
    """vision_layers=-1: every ViT layer's attention and MLP get LoRA; at init the model computes
    what the base did, and a non-zero lora_b there changes the image features (not the text)."""
    model = make_model(make_config(processor))
    image = Image.new("RGB", (32, 32), (30, 160, 150))
    _, px, _ = processor("what color is the square ?", [image])
    base_feats = model.encode_images(mx.array(px))
    model.freeze()
    wrapped = adapters.apply_lora(model, adapters.lora_config(4, 8.0, 0.0, -1, adapters.LORA_KEYS,
                                                              vision_layers=-1))
    vit = [w for w in wrapped if w.startswith("vision_tower.")]
    assert len(vit) == 6 * len(model.vision_tower.encoder.layers)
    assert "vision_tower.encoder.layers.0.mlp.fc1" in vit
    assert mx.allclose(model.encode_images(mx.array(px)), base_feats, atol=1e-6)
    fc2 = model.vision_tower.encoder.layers[-1].mlp.fc2
    fc2.lora_b = mx.ones_like(fc2.lora_b) * 0.1
    assert mx.abs(model.encode_images(mx.array(px)) - base_feats).max().item() > 1e-3
    text = mx.array([processor.tokenizer.encode("what color is the square ?")])
    assert mx.array_equal(model(text), make_model(make_config(processor))(text))
    with pytest.raises(MM1Error, match="vision_layers must be -1 or 1..2"):
        adapters.apply_vision_lora(make_model(make_config(processor)), {"vision_layers": 3})


# ---- training, saving, loading ----
def test_train_save_load_and_yaml_config(tmp_path, tiny_checkpoint, data, processor):
    out = tmp_path / "ad"
    log = lora.train(small_args(tiny_checkpoint, data, out, iters=10, valid=str(data)), quiet=True)
    losses = [v for _, v in log["train"]]
    assert log["step"] == 10 and losses[-1] < 0.5 * losses[0]
    assert [s for s, _ in log["valid"]] == [3, 6, 9, 10]
    assert log["valid"][-1][1] < log["valid"][0][1]
    for f in ("adapters.safetensors", "adapter_config.json", "training_state.safetensors",
              "training_log.json", "loss.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    cfg = json.loads((out / "adapter_config.json").read_text())
    base = checkpoint.read_config(tiny_checkpoint)
    assert cfg["base_model"] == adapters.base_identity(base)
    # unfused: the adapter makes the trained answer much likelier
    model, proc = checkpoint.load(str(tiny_checkpoint), adapter_path=str(out))
    plain, _ = checkpoint.load(str(tiny_checkpoint))
    image = Image.open(data.parent / "img" / "0.png")
    ids, px, _ = proc("what color is the square ?", [image])
    prompt = ids + proc.tokenizer.encode("it is", add_special_tokens=False)
    want = json.loads(data.read_text().splitlines()[0])["response"].split()[2]
    wid = proc.tokenizer.convert_tokens_to_ids(want)
    la = model(mx.array([prompt]), mx.array(px))[0, -1]
    lb = plain(mx.array([prompt]), mx.array(px))[0, -1]
    pa, pb = (mx.softmax(x)[wid].item() for x in (la, lb))
    assert pa > 5 * pb, (pa, pb)
    # YAML config form; command-line flags override it
    yml = tmp_path / "cfg.yaml"
    yml.write_text(f"model: {tiny_checkpoint}\ndata: {data}\nadapter-path: {tmp_path / 'y'}\n"
                   "iters: 50\nbatch_size: 2\nrank: 4\nlearning_rate: 1.0e-3\n")
    log = lora.main(["--config", str(yml), "--iters", "2", "--quiet"])
    assert log["step"] == 2 and log["args"]["rank"] == 4 and log["args"]["batch_size"] == 2
    yml.write_text("iterz: 3\n")
    with pytest.raises(SystemExit):
        lora.main(["--config", str(yml)])


def test_adapter_for_another_base_is_refused(tmp_path, tiny_checkpoint, data, processor):
    out = tmp_path / "ad"
    lora.train(small_args(tiny_checkpoint, data, out, iters=1), quiet=True)
    other = make_model(make_config(processor, layers=3))
    with pytest.raises(MM1Error, match=r"trained on mm1 \(config [0-9a-f]+\), not on this model"):
        adapters.load_adapters(other, out)
    renamed = make_model(make_config(processor))
    renamed.config.name = "someone-else"
    with pytest.raises(MM1Error, match="not on this model someone-else"):
        adapters.load_adapters(renamed, out)
    with pytest.raises(MM1Error, match="not an adapter directory"):
        adapters.load_adapters(renamed, tmp_path)


def test_connector_training(tmp_path, tiny_checkpoint, data):
    """By default the whole connector trains, at 0.3x the LoRA learning rate (``--whole-lr-scale``;
    at the full rate it lost 5.6 new-concept and 10.8 original-set points; README, "Fine-tuning"),
    and is saved with the adapter; --no-train-connector leaves it out."""
    out, off, slow = tmp_path / "ad", tmp_path / "off", tmp_path / "slow"
    args = small_args(tiny_checkpoint, data, out, iters=2)
    assert args.train_connector is None  # the default: on for a float connector
    lora.train(args, quiet=True)
    saved = mx.load(str(out / "adapters.safetensors"))
    conn = {k: v for k, v in saved.items() if k.startswith("connector.")}
    assert json.loads((out / "adapter_config.json").read_text())["train_connector"] is True
    model, _ = checkpoint.load(str(tiny_checkpoint), adapter_path=str(out))
    plain, _ = checkpoint.load(str(tiny_checkpoint))
    params, base = dict(tree_flatten(model.parameters())), dict(tree_flatten(plain.parameters()))
    assert conn and all(mx.array_equal(params[k], v) for k, v in conn.items())

    def moved(weights):
        return max(mx.abs(base[k] - weights[k]).max().item() for k in conn)

    # 2 Adam steps without bias correction move a weight up to ~6.5 x its rate (at lr: ~6.5 x lr)
    assert 0 < moved(conn) < 6.6 * args.whole_lr_scale * args.learning_rate
    lora.train(dataclasses.replace(args, adapter_path=str(slow), whole_lr_scale=0.1), quiet=True)
    assert 2.5 < moved(conn) / moved(mx.load(str(slow / "adapters.safetensors"))) < 3.5
    lora.train(dataclasses.replace(args, adapter_path=str(off), train_connector=False), quiet=True)
    assert not any(k.startswith("connector.") for k in mx.load(str(off / "adapters.safetensors")))


def test_vision_embeddings_training(tmp_path, tiny_checkpoint, data):
    """The ViT's embeddings train whole, as the connector does, are saved with the adapter,
    load back and resume (two optimizers' state); a resume without them names the flag."""
    out = tmp_path / "ad"
    args = small_args(tiny_checkpoint, data, out, iters=2, train_vision_embeddings=True)
    lora.train(args, quiet=True)
    saved = mx.load(str(out / "adapters.safetensors"))
    embeds = {k: v for k, v in saved.items() if k.startswith(adapters.VISION_EMBEDDINGS)}
    assert "vision_tower.embeddings.patch_embedding.weight" in embeds
    model, _ = checkpoint.load(str(tiny_checkpoint), adapter_path=str(out))
    plain, _ = checkpoint.load(str(tiny_checkpoint))
    params, base = dict(tree_flatten(model.parameters())), dict(tree_flatten(plain.parameters()))
    assert all(mx.array_equal(params[k], v) for k, v in embeds.items())
    moved = max(mx.abs(base[k] - v).max().item() for k, v in embeds.items())
    # 2 Adam steps (no bias correction: up to ~6.5 x the rate) at whole_lr_scale x lr, not at lr
    assert 0 < moved < 6.6 * args.whole_lr_scale * args.learning_rate
    lora.train(dataclasses.replace(args, iters=3, resume=True), quiet=True)
    assert json.loads((out / trainer.LOG_FILE).read_text())["step"] == 3
    with pytest.raises(MM1Error, match="trained with --train-vision-embeddings; pass it"):
        lora.train(dataclasses.replace(args, iters=4, resume=True, train_vision_embeddings=False),
                   quiet=True)


def _adapters(path):
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def assert_same_adapters(a, b, atol=1e-6):
    wa, wb = _adapters(a), _adapters(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint, data):
    """6 steps straight through (dropout on: resumed runs must replay the same masks)."""
    out = tmp_path_factory.mktemp("ref") / "ad"
    lora.train(small_args(tiny_checkpoint, data, out, dropout=0.1), quiet=True)
    return out


def test_resume_matches_uninterrupted(tmp_path, monkeypatch, tiny_checkpoint, data,
                                      uninterrupted):
    out = tmp_path / "ad"
    real_save = trainer.save

    def save_then_ctrl_c(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        lora.train(small_args(tiny_checkpoint, data, out, dropout=0.1), quiet=True)
    monkeypatch.setattr(trainer, "save", real_save)
    assert json.loads((out / "training_log.json").read_text())["step"] == 3
    log = lora.train(small_args(tiny_checkpoint, data, out, dropout=0.1, resume=True), quiet=True)
    assert log["step"] == 6 and [s for s, _ in log["train"]] == list(range(1, 7))
    assert_same_adapters(out, uninterrupted)
    with pytest.raises(MM1Error, match="other LoRA settings"):
        lora.train(small_args(tiny_checkpoint, data, out, rank=4, resume=True), quiet=True)


def test_crash_inside_a_save_keeps_the_last_complete_one(tmp_path, monkeypatch, tiny_checkpoint,
                                                         data, uninterrupted):
    out = tmp_path / "ad"
    real_plot, calls = trainer.plot_losses, []

    def crashing_plot(curves, path, *style):
        calls.append(curves["train"][-1][0])  # the step saved
        if calls[-1] > 3:  # the step-6 save dies half written (adapters already in the tmp dir)
            raise OSError(28, "No space left on device")
        real_plot(curves, path, *style)

    monkeypatch.setattr(trainer, "plot_losses", crashing_plot)
    with pytest.raises(OSError):
        lora.train(small_args(tiny_checkpoint, data, out, dropout=0.1), quiet=True)
    assert calls == [3, 6, 6]  # the rescue save of step 6 is tried once more, fails alike
    assert json.loads((out / "training_log.json").read_text())["step"] == 3
    assert not list(tmp_path.glob(".ad.*"))  # the partial save left nothing behind
    monkeypatch.setattr(trainer, "plot_losses", real_plot)
    lora.train(small_args(tiny_checkpoint, data, out, dropout=0.1, resume=True), quiet=True)
    assert_same_adapters(out, uninterrupted)


def test_kill_between_the_renames_of_a_save(tmp_path, monkeypatch, tiny_checkpoint, data,
                                            uninterrupted):
    out = tmp_path / "ad"
    real_replace, calls = atomic.os.replace, []
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # the two-rename fallback

    def killed_after_second_rename(src, dst):
        calls.append(dst)
        if len(calls) <= 2:  # step 3 saved; at step 6 the old directory moves aside...
            real_replace(src, dst)
        if len(calls) >= 2:  # ...and then the kill: no later rename happens
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed_after_second_rename)
    with pytest.raises(KeyboardInterrupt):
        lora.train(small_args(tiny_checkpoint, data, out, dropout=0.1), quiet=True)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not out.exists() and list(tmp_path.glob(".ad.old.*"))
    assert adapters.recover(out)
    assert json.loads((out / "training_log.json").read_text())["step"] == 3
    lora.train(small_args(tiny_checkpoint, data, out, dropout=0.1, resume=True), quiet=True)
    assert_same_adapters(out, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_refuses_to_overwrite_other_files(tmp_path, tiny_checkpoint, data):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MM1Error, match="not an adapter directory"):
        lora.train(small_args(tiny_checkpoint, data, tmp_path), quiet=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_error_mid_run_keeps_finished_steps(tmp_path, monkeypatch, tiny_checkpoint, data):
    """An image that disappears during training: a clear error, and the finished steps saved."""
    real, calls = finetune_data.prepare_pixels, []

    def vanishing(items, processor, seeds=None):
        calls.append(1)
        if len(calls) == 3:
            raise MM1Error(f"{items[0].where}: image not found: {items[0].images[0]}")
        return real(items, processor, seeds)

    monkeypatch.setattr(finetune_data, "prepare_pixels", vanishing)
    with pytest.raises(MM1Error, match=r"train\.jsonl:\d+: image not found"):
        lora.train(small_args(tiny_checkpoint, data, tmp_path / "ad", save_every=10), quiet=True)
    assert json.loads((tmp_path / "ad" / "training_log.json").read_text())["step"] == 2


def test_generate_cli_uses_the_adapter(tmp_path, capsys, tiny_checkpoint, data):
    import importlib

    generate = importlib.import_module("mm1_mlx.generate")  # the module, not the function

    out = tmp_path / "ad"
    lora.train(small_args(tiny_checkpoint, data, out, iters=10), quiet=True)
    image = str(data.parent / "img" / "0.png")
    argv = ["--model", str(tiny_checkpoint), "--image", image, "--prompt",
            "what color is the square ?", "--max-tokens", "4"]
    generate.main(argv + ["--adapter-path", str(out)])
    with_adapter = capsys.readouterr().out.strip()
    model, processor = checkpoint.load(str(tiny_checkpoint), adapter_path=str(out))
    assert with_adapter == generate.generate(model, processor, "what color is the square ?",
                                             [image], max_tokens=4).strip()
    assert with_adapter.startswith("it is")  # learned the answer's form


def test_data_directory_and_epochs_schedule(tmp_path, capsys, tiny_checkpoint, data):
    """--data DIR reads mlx-lm's layout (train.jsonl, valid.jsonl); without --iters the run takes
    --epochs passes over the data and says so before it starts."""
    import shutil

    folder = tmp_path / "dir"
    shutil.copytree(data.parent, folder)
    (folder / "valid.jsonl").write_text("".join(data.read_text().splitlines(True)[:4]))
    out = tmp_path / "ad"
    log = lora.main(["--model", str(tiny_checkpoint), "--data", str(folder), "--adapter-path",
                     str(out), "--epochs", "2", "--batch-size", "4", "--quiet"])
    assert log["step"] == 8 and log["args"]["iters"] == 8  # 2 x 16 samples / 4
    assert log["valid_samples"] == 4 and [s for s, _ in log["valid"]] == [8]
    assert "training 8 steps of batch 4 over 16 samples (2.0 epochs)" in capsys.readouterr().err
    with pytest.raises(MM1Error, match="without train.jsonl"):
        lora.train(small_args(tiny_checkpoint, tmp_path / "ad", out))
    default = lora.TrainingArgs(data=str(data)).schedule(300)
    assert default.iters == 300 and default.warmup == 15  # 8 epochs of batch 8; 5% warm-up


def test_progress_shows_small_losses_and_quiet_keeps_warnings(tmp_path, monkeypatch, capsys,
                                                              tiny_checkpoint, data):
    """Losses of 1e-4 show with significant digits (not 0.000); --quiet hides the bar only."""
    shown = []

    class Bar:  # records the progress bar's loss
        def __init__(self, *a, **k):
            pass

        def set_postfix(self, **k):
            shown.append(k["loss"])

        def update(self, n=1):
            pass

        def close(self):
            pass

    real = trainer.loss_fn
    monkeypatch.setattr(trainer, "tqdm", Bar)
    monkeypatch.setattr(trainer, "loss_fn", lambda *a: real(*a) * 1e-4)
    bad = tmp_path / "train.jsonl"
    bad.write_text(data.read_text().replace("img/", str(data.parent / "img") + "/")
                   + '{"image": "gone.png", "prompt": "what", "response": "it"}\n')
    log = lora.train(small_args(tiny_checkpoint, bad, tmp_path / "ad", iters=2), quiet=True)
    assert [float(x) for x in shown] == pytest.approx([v for _, v in log["train"]], rel=1e-2)
    assert all(1e-5 < float(x) < 1e-2 for x in shown)
    err = capsys.readouterr().err
    assert "skipped 1 bad record(s) in the training data" in err and "gone.png" in err


def teal_square(size=64) -> Image.Image:
    a = np.full((size, size, 3), 240, np.uint8)
    a[size // 2 - 12:size // 2 + 12, size // 2 - 12:size // 2 + 12] = (0, 128, 128)
    return Image.fromarray(a)


def test_augmentation_is_real_bounded_and_seeded():
    import colorsys

    from mm1_mlx.tuner.augment import augment

    img, diffs = teal_square(), []
    for seed in range(12):
        out = augment(img, random.Random(seed))
        assert out.size == img.size and out.mode == "RGB"
        assert out.tobytes() == augment(img, random.Random(seed)).tobytes()  # seeded
        a = np.asarray(out, np.float32)
        diffs.append(np.abs(a - np.asarray(img, np.float32)).mean())
        r, g, b = a[28:36, 28:36].mean((0, 1)) / 255  # the middle stays a teal square
        assert abs(colorsys.rgb_to_hsv(r, g, b)[0] - 0.5) < 0.04 and g > r + 0.2
        assert np.abs(a[:4, :4].mean() - 240) < 45  # and the corner background
    assert min(diffs) > 0.5 and max(diffs) < 40  # every draw changes pixels, none beyond recognition
    assert len({round(d, 3) for d in diffs}) == len(diffs)  # different seeds, different variations


def test_augmentation_keeps_colour_names():
    """Every shapes-world palette colour keeps its name: the nearest palette entry to the middle
    of an augmented patch is one of the same colour (97%+; teal, green and blue always)."""
    from mm1_mlx.shapes import world
    from mm1_mlx.tuner.augment import photometric

    entries = [(name, np.array(world._hex(c)) * 255) for name, cs in world.PALETTES.items()
               for c in cs]
    kept, flips = 0, set()
    for name, rgb in entries:
        a = np.full((64, 64, 3), 245, np.uint8)
        a[16:48, 16:48] = rgb.round()
        for seed in range(16):
            out = np.asarray(photometric(Image.fromarray(a), random.Random(seed)), np.float32)
            got = np.median(out[24:40, 24:40].reshape(-1, 3), 0)
            nearest = min(entries, key=lambda e: np.sum((e[1] - got) ** 2))[0]
            kept += nearest == name
            flips |= {name} if nearest != name else set()
    assert kept / (16 * len(entries)) > 0.97, kept
    assert not flips & {"teal", "green", "blue"}, flips


def test_augmentation_zoom_keeps_shapes_large_enough():
    """Zoom 0.85-1.1: a shape keeps at least ~0.85^2 of its area (at 0.7 a small hexagon became
    too few pixels to tell from a circle); zooming in never crops it away."""
    from mm1_mlx.tuner.augment import geometry

    img = teal_square(96)
    area = (np.asarray(img)[..., 0] < 120).sum()
    ratios = [(np.asarray(geometry(img, random.Random(s)))[..., 0] < 120).sum() / area
              for s in range(40)]
    assert 0.68 < min(ratios) < 0.8 and 1.1 < max(ratios) < 1.25, (min(ratios), max(ratios))


def test_augment_flag_and_training_pixels(data, processor):
    """On by default, --no-augment switches it off; the pixels of a training step are augmented
    (the same ones again for the same step and seed) and plain when off."""
    parse = lora.setup_arg_parser().parse_args
    assert lora.args_from(parse(["--data", str(data)])).augment
    off = lora.args_from(parse(["--data", str(data), "--no-augment", "--batch-size", "4"]))
    off = off.schedule(4)
    on = dataclasses.replace(off, augment=True)
    assert not off.augment and "image augmentation off" in trainer.describe_schedule(off, 4, 1)
    assert "image augmentation on" in trainer.describe_schedule(on, 4, 1)
    ds, _ = finetune_data.load_dataset(data, processor, max_length=512)

    def pixels(args, step=0):
        (batch,), _, _ = trainer.step_batches(ds, processor, args, step, 0, 1)
        return batch[2]

    idx = finetune_data.batch_order(len(ds), 0, 4, off.seed)
    assert np.array_equal(pixels(off), finetune_data.prepare_pixels([ds[i] for i in idx],
                                                                    processor))
    px = pixels(on)
    assert px.shape == pixels(off).shape and np.array_equal(px, pixels(on))
    assert 0 < np.abs(px - pixels(off)).mean() < 1.0  # normalized units: changed, not destroyed


def test_default_training_adapts_the_image_encoder(tmp_path, tiny_checkpoint, data, capsys):
    """The defaults train LoRA on every ViT layer (saved, reloaded, and changing the image
    features); --no-train-vision leaves the encoder as it was."""
    out, off = tmp_path / "ad", tmp_path / "off"
    lora.main(["--model", str(tiny_checkpoint), "--data", str(data), "--adapter-path", str(out),
               "--iters", "4", "--batch-size", "4", "--learning-rate", "3e-3", "--quiet"])
    assert "LoRA rank 16 alpha 32 on all decoder layers and 2 image-encoder layers, the " \
           f"connector whole at {3e-3 * trainer.TrainingArgs.whole_lr_scale:g}, images at 32 px, " \
           "image augmentation on" in capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["vision_layers"] == -1
    vit_b = {k: v for k, v in mx.load(str(out / "adapters.safetensors")).items()
             if k.startswith("vision_tower.") and k.endswith("lora_b")}
    assert len(vit_b) == 12 and all(mx.abs(v).max().item() > 0 for v in vit_b.values())
    model, proc = checkpoint.load(str(tiny_checkpoint), adapter_path=str(out))
    plain, _ = checkpoint.load(str(tiny_checkpoint))
    _, px, _ = proc("what color is the square ?", [Image.open(data.parent / "img" / "0.png")])
    px = mx.array(px)
    assert mx.abs(model.vision_tower(px) - plain.vision_tower(px)).max().item() > 1e-4
    lora.main(["--model", str(tiny_checkpoint), "--data", str(data), "--adapter-path", str(off),
               "--iters", "2", "--batch-size", "4", "--no-train-vision", "--quiet"])
    assert "and no image-encoder layers" in capsys.readouterr().err
    assert not any(k.startswith("vision_tower.") for k in mx.load(str(off / "adapters.safetensors")))
    model, _ = checkpoint.load(str(tiny_checkpoint), adapter_path=str(off))
    assert mx.array_equal(model.vision_tower(px), plain.vision_tower(px))


def test_adapters_train_and_run_at_their_image_size(tmp_path, capsys, tiny_checkpoint, data):
    """--image-size: the encoder trains at another resolution (the ViT's position embeddings
    interpolated; the C-Abstractor still makes the same tokens), the adapter records it, and
    everything that loads the adapter (generate, eval, server, fuse) then runs at that size."""
    out = tmp_path / "ad"
    lora.main(["--model", str(tiny_checkpoint), "--data", str(data), "--adapter-path", str(out),
               "--iters", "4", "--batch-size", "4", "--image-size", "48", "--quiet"])
    assert "images at 48 px" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["image_size"] == 48
    model, proc = checkpoint.load(str(tiny_checkpoint), adapter_path=str(out))
    plain, plain_proc = checkpoint.load(str(tiny_checkpoint))
    assert (proc.image.image_size, plain_proc.image.image_size) == (48, 32)
    image = Image.open(data.parent / "img" / "0.png")
    _, px, _ = proc("what color is the square ?", [image])
    assert px.shape[1:3] == (48, 48)
    # fused: the same model at the same size, the position embeddings still the base's 4x4 grid
    fused_dir = tmp_path / "fused"
    from mm1_mlx.fuse import fuse

    fuse(str(tiny_checkpoint), str(out), str(fused_dir), dtype="float32")
    fused, fused_proc = checkpoint.load(str(fused_dir))
    vc = fused.config.vision_config
    assert (fused_proc.image.image_size, vc.image_size, vc.pretrain_image_size) == (48, 48, 32)
    a, b = logits_of(model, proc, image), logits_of(fused, fused_proc, image)
    assert mx.abs(a - b).max().item() < 1e-3 * mx.abs(a).max().item()
    assert not mx.allclose(a, logits_of(plain, plain_proc, image), atol=1e-3).item()
    # --resume at another size is refused: the saved steps saw other pixels
    with pytest.raises(MM1Error, match="trained on images of 48 px, not 40"):
        lora.train(small_args(tiny_checkpoint, data, out, iters=6, image_size=40, resume=True))


def test_default_image_size_is_the_models_finetune_size(tmp_path, tiny_checkpoint, data):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    pre = ckpt / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "finetune_image_size": 40}))
    log = lora.train(small_args(ckpt, data, tmp_path / "ad", iters=1), quiet=True)
    assert log["args"]["image_size"] == 40
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["image_size"] == 40
    _, proc = checkpoint.load(str(ckpt))
    assert proc.image.image_size == 32  # the model alone still runs at its own size
    log = lora.train(small_args(tiny_checkpoint, data, tmp_path / "plain", iters=1), quiet=True)
    assert log["args"]["image_size"] == 32  # no finetune size: its own


def test_image_size_that_cannot_work_is_one_clear_error(tmp_path, capsys, tiny_checkpoint, data,
                                                        processor):
    with pytest.raises(SystemExit) as e:
        lora.main(["--model", str(tiny_checkpoint), "--data", str(data), "--adapter-path",
                   str(tmp_path / "a"), "--image-size", "44"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "multiple of the encoder's patch size 8, got 44" in err
    assert "Traceback" not in err and not (tmp_path / "a").exists()
    mlp = tmp_path / "mlp"  # one image token per patch: another size changes the prompt
    per_patch = make_processor(num_image_tokens=16)  # 32 px / patch 8: a 4x4 grid
    checkpoint.save(make_model(make_config(per_patch, connector="mlp")), per_patch, mlp)
    with pytest.raises(MM1Error, match="one image token per patch"):
        lora.train(small_args(mlp, data, tmp_path / "b", image_size=48))
    ad = tmp_path / "c"  # a damaged adapter_config.json image_size
    lora.train(small_args(tiny_checkpoint, data, ad, iters=1), quiet=True)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "image_size": "big"}))
    with pytest.raises(MM1Error, match="image_size"):
        checkpoint.load(str(tiny_checkpoint), adapter_path=str(ad))
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "image_size": 44}))
    with pytest.raises(MM1Error, match="multiple of the encoder's patch size"):
        checkpoint.load(str(tiny_checkpoint), adapter_path=str(ad))
