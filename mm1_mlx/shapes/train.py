"""Train an MM1-style model from scratch on shapes world: encoder, pre-training, then SFT.

``python -m mm1_mlx.train --recipe tiny`` reproduces the shipped ``mm1-tiny`` (``tiny-moe`` the MoE
one). MM1 starts from a contrastively pre-trained image encoder; with no such encoder for shapes
world, stage 0 pre-trains ours (ViT + connector) with a supervised objective instead: a throw-away
linear head reads every position slot's shape and colour from the connector's tokens (as ViTs were
first pre-trained on labelled images). The ViT is then frozen, as in LLaVA. MM1 also starts from a
pre-trained LLM: an optional ``text`` stage trains the decoder alone on text-only samples, and
``decoder_init`` starts pre-training from such a decoder (MM1's ablations share one). Pre-training uses MM1's
data mix (45% interleaved, 45% captions, 10% text-only) with loss on text tokens only (plus MoE
auxiliary losses); SFT trains on chat conversations with loss on the assistant's tokens. State is
saved atomically every ``--save-every`` steps and after the current step on Ctrl-C or SIGTERM (a
second one stops at once); rerunning the same command resumes where it stopped, and says where.
Data is a pure function of (seed, stage, step), so a resumed run sees exactly the batches an
uninterrupted one would.

``train`` builds the model (``build``) and runs each stage with ``run_stage``; the language loss and
the loss figure are the fine-tuner's (``tuner.losses.masked_ce``, ``tuner.plots.plot_losses``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from ..checkpoint import save
from ..errors import MM1Error
from ..io.atomic import atomic_dir, check_output, claim_output
from ..models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from ..models.connector import grid_side
from ..models.model import Model
from ..processor import ImageSettings, Processor
from ..tuner.batching import collate, prefetch
from ..tuner.losses import masked_ce
from ..tuner.plots import plot_losses
from . import world
from .tokenizer import train_tokenizer


def shapes_images(finetune_image_size: int | None = None) -> ImageSettings:
    """96-px images padded white; ``finetune_image_size``: the size LoRA trains at by default."""
    return ImageSettings(image_size=96, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                         resize_mode="pad", pad_color=[255, 255, 255],
                         finetune_image_size=finetune_image_size)


@dataclass
class Recipe:
    name: str
    model: ModelConfig
    pretrain_steps: int
    sft_steps: int
    batch_size: int = 16
    learning_rate: float = 4e-4  # above ~1e-3 the from-scratch ViT + C-Abstractor never learn
    sft_learning_rate: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    mix: tuple = (0.45, 0.45, 0.10)  # interleaved, captions, text-only
    image: ImageSettings = field(default_factory=shapes_images)
    encoder_steps: int = 0  # stage 0: supervised image-encoder pre-training (0: skip)
    text_steps: int = 0  # the decoder alone on text-only samples: a stand-in for a pre-trained LLM
    decoder_init: str | None = None  # decoder weights pre-training starts from (a text stage's)
    encoder_batch_size: int = 32
    encoder_learning_rate: float = 1e-3
    freeze_vision: bool = True  # keep the stage-0 ViT fixed afterwards (the connector trains on)
    seed: int = 0
    vocab_size: int = 640
    tokenizer_corpus: int = 1500  # samples of each kind the tokenizer is trained on


def tiny_config(moe: bool = False) -> ModelConfig:
    text = dict(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                tie_word_embeddings=True, rope_theta=10000.0)
    if moe:  # same active FFN size: top-2 of 4 experts of half width, every other layer
        text.update(num_experts=4, num_experts_per_tok=2, moe_every=2, moe_intermediate_size=256)
    return ModelConfig(
        vision_config=VisionConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                                   num_attention_heads=4, image_size=96, patch_size=12,
                                   hidden_act="quick_gelu", feature_layer=-2),
        connector_config=ConnectorConfig(type="c-abstractor", num_image_tokens=16,
                                         hidden_size=128, depth=1, mlp_depth=2),
        text_config=TextConfig(**text),
        name="mm1-tiny-moe" if moe else "mm1-tiny",
    )


RECIPES = {
    # LoRA at 144 px: a 96-px patch grid hardly tells a hexagon's corners from a circle (README)
    "tiny": lambda: Recipe("mm1-tiny", tiny_config(), encoder_steps=2000, pretrain_steps=500,
                           sft_steps=2400, image=shapes_images(finetune_image_size=144)),
    "tiny-moe": lambda: Recipe("mm1-tiny-moe", tiny_config(True), encoder_steps=2000,
                               pretrain_steps=400, sft_steps=2000),
    "smoke": lambda: Recipe("mm1-smoke", tiny_config(), pretrain_steps=24, sft_steps=16,
                            batch_size=8, warmup=4, learning_rate=3e-3, tokenizer_corpus=150,
                            encoder_steps=24, encoder_batch_size=8, encoder_learning_rate=5e-4),
}


STAGES = ("text", "encoder", "pretrain", "sft")


# ---- batches ----
def example(processor: Processor, rng: random.Random, stage: str, mix) -> tuple[list, list, list]:
    """(ids, loss mask, prepared images) of one sample."""
    if stage == "pretrain":
        _, text, imgs = world.pretrain_sample(rng, mix)
        prepared = [processor.prepare_image(im, max_tiles=1) for im in imgs]
        ids = processor.tokenize(text, prepared) + [processor.tokenizer.eos_token_id]
        mask = [i != processor.image_token_id for i in ids]
        return ids, mask, prepared
    msgs, imgs = world.sft_sample(rng)
    prepared = [processor.prepare_image(im, max_tiles=1) for im in imgs]
    ids, mask = processor.encode_conversation(msgs, prepared)
    return ids, mask, prepared


def make_batch(processor: Processor, recipe: Recipe, stage: str, step: int):
    """(ids, loss mask, pixels or None) of step ``step`` of ``stage`` (text, pretrain or sft)."""
    rng = random.Random(f"{recipe.seed}:{stage}:{step}")
    kind, mix = ("pretrain", (0.0, 0.0, 1.0)) if stage == "text" else (stage, recipe.mix)
    samples = [example(processor, rng, kind, mix) for _ in range(recipe.batch_size)]
    ids, mask = collate([(i, m) for i, m, _ in samples], processor.tokenizer.pad_token_id)
    pixels = [p.pixels for _, _, prepared in samples for p in prepared]
    px = np.concatenate(pixels) if pixels else None
    return ids, mask, px


class SlotHead(nn.Module):
    """Stage 0's throw-away heads on the image tokens: every position slot's shape and colour read
    from all tokens at once, and each token's own cell (so a token carries what it covers, which
    the decoder's attention can then find by shape as well as by colour)."""

    def __init__(self, num_tokens: int, dims: int):
        super().__init__()
        self.sizes = (1 + len(world.SHAPES), 1 + len(world.COLORS))
        self.proj = nn.Linear(num_tokens * dims, len(world.POSITIONS) * sum(self.sizes))
        self.token_proj = nn.Linear(dims, sum(self.sizes))

    def __call__(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """(N, slots, shapes+colours) and (N, tokens, shapes+colours) logits."""
        N = tokens.shape[0]
        return (self.proj(tokens.reshape(N, -1)).reshape(N, len(world.POSITIONS), -1),
                self.token_proj(tokens))


class EncoderTrainer(nn.Module):
    """The model's image encoder (ViT + connector) with the stage-0 head on top."""

    def __init__(self, model: Model, head: SlotHead):
        super().__init__()
        self.model, self.head = model, head
        self.freeze()
        for m in (model.vision_tower, model.connector, head):
            m.unfreeze()


def make_encoder_batch(processor: Processor, recipe: Recipe, step: int):
    """Pixels, (N, slots, 2) slot labels and (N, tokens, 2) token-cell labels (shape, colour)."""
    rng = random.Random(f"{recipe.seed}:encoder:{step}")
    scenes = [world.random_scene(rng) for _ in range(recipe.encoder_batch_size)]
    px = np.concatenate([processor.prepare_image(sc.image, max_tiles=1).pixels for sc in scenes])
    side = grid_side(recipe.model.num_image_tokens)
    slots = np.array([world.slot_labels(sc) for sc in scenes], np.int32).transpose(0, 2, 1)
    cells = np.array([world.token_labels(sc, side) for sc in scenes], np.int32).transpose(0, 2, 1)
    return px, slots, cells


def _shape_color_ce(logits: mx.array, labels: mx.array, split: int) -> mx.array:
    return (nn.losses.cross_entropy(logits[..., :split], labels[..., 0]).mean()
            + nn.losses.cross_entropy(logits[..., split:], labels[..., 1]).mean())


def encoder_loss(trainer: EncoderTrainer, pixels, slots, cells):
    slot_logits, token_logits = trainer.head(trainer.model.encode_images(pixels))
    split = trainer.head.sizes[0]
    loss = (_shape_color_ce(slot_logits, slots, split)
            + _shape_color_ce(token_logits, cells, split))
    return loss, mx.array(slots.shape[0])


def loss_fn(model: Model, ids, mask, pixels):
    """(mean cross-entropy of the loss tokens + MoE auxiliary loss, number of loss tokens)."""
    logits, aux = model(ids[:, :-1], pixels, return_aux=True)
    ce, ntok = masked_ce(logits, ids, mask)
    return ce / ntok + aux, ntok


def schedule(recipe: Recipe, stage: str, total: int):
    peak = {"text": recipe.learning_rate, "encoder": recipe.encoder_learning_rate,
            "pretrain": recipe.learning_rate, "sft": recipe.sft_learning_rate}[stage]
    warm = optim.linear_schedule(0.0, peak, recipe.warmup)
    cos = optim.cosine_decay(peak, max(1, total - recipe.warmup), end=0.1 * peak)
    return optim.join_schedules([warm, cos], [recipe.warmup])


# ---- state ----
def save_state(run: Path, model: Model, opt, stage: str, step: int, losses: list,
               head: nn.Module | None = None) -> None:
    with atomic_dir(run / "state", "train-state", force=True) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
        if head is not None:
            mx.save_safetensors(str(tmp / "head.safetensors"), dict(tree_flatten(head.parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
        (tmp / "progress.json").write_text(json.dumps({"stage": stage, "step": step,
                                                       "losses": losses}))


def load_state(run: Path, model: Model, head: nn.Module | None = None
               ) -> tuple[str, int, list, dict | None]:
    """(stage, step, losses, optimizer state) of the last complete save, or a fresh start."""
    state = run / "state"
    if not (state / "progress.json").exists():
        return STAGES[0], 0, [], None
    try:
        model.load_weights(str(state / "model.safetensors"))
        if head is not None and (state / "head.safetensors").exists():
            head.load_weights(str(state / "head.safetensors"))
        opt_state = tree_unflatten(list(mx.load(str(state / "optimizer.safetensors")).items()))
        p = json.loads((state / "progress.json").read_text(encoding="utf-8"))
        stage, step, losses = p["stage"], p["step"], [tuple(x) for x in p["losses"]]
        if stage not in STAGES or not isinstance(step, int) or step < 0:
            raise ValueError(f"progress.json has stage {stage!r}, step {step!r}")
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as e:
        raise MM1Error(f"cannot resume from {state}: {str(e).splitlines()[0][:200]}; move it "
                       "away or use another --run-dir") from None
    return stage, step, losses, opt_state


STAGE_STYLES = {"text": dict(color="tab:gray", linewidth=0.8),
                "encoder": dict(color="tab:green", linewidth=0.8),
                "pretrain": dict(color="tab:blue", linewidth=0.8),
                "sft": dict(color="tab:orange", linewidth=0.8)}


def stage_curves(losses: list) -> dict[str, list]:
    """[(stage, loss)] of every step so far -> stage -> [(step counted over all stages, loss)]."""
    return {stage: [(i, loss) for i, (s, loss) in enumerate(losses) if s == stage]
            for stage in STAGES}


def setup_processor(run: Path, recipe: Recipe) -> Processor:
    tok_dir = run / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        texts = world.corpus_text(random.Random(f"{recipe.seed}:tokenizer"), recipe.tokenizer_corpus)
        tok = train_tokenizer(texts, recipe.vocab_size)
        with atomic_dir(tok_dir, "tokenizer", force=True) as tmp:
            tok.save_pretrained(str(tmp))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return Processor(tok, recipe.image, recipe.model.num_image_tokens)


def train(recipe: Recipe, run: Path, save_every: int = 100, out: Path | None = None,
          quiet: bool = False, max_steps: int | None = None,
          stop: Callable[[], bool] | None = None, force: bool = False
          ) -> tuple[Model, Processor, list]:
    """Run (or resume) the recipe in ``run``; ``max_steps`` stops this call early, and so does
    ``stop()`` turning true (checked after every step, which is then saved); both resume.

    ``run`` must be new, empty or a run directory (it is locked while training); ``out`` is
    replaced only with ``force`` or when it is the run's own ``model``."""
    with claim_output(run, "run", force=True, flag="--run-dir"):
        if out is not None:
            check_output(out, "checkpoint", force=force or Path(out) == run / "model")
        return _train(recipe, run, save_every, out, quiet, max_steps, stop, force)


@dataclass
class Run:
    """One call of ``train``: the model being trained, where its state goes, when it stops."""
    recipe: Recipe
    dir: Path  # the run directory: tokenizer, state, loss.png
    model: Model
    head: SlotHead  # stage 0's
    processor: Processor
    losses: list  # (stage, loss) of every step so far
    save_every: int
    quiet: bool
    stop: Callable[[], bool]


def _train(recipe: Recipe, run: Path, save_every: int, out: Path | None, quiet: bool,
           max_steps: int | None, stop: Callable[[], bool] | None, force: bool
           ) -> tuple[Model, Processor, list]:
    model, processor, head = build(recipe, run)
    stage, start, losses, opt_state = load_state(run, model, head)
    steps = stage_steps(recipe)
    if opt_state is not None:
        print(f"resuming {recipe.name} from {run / 'state'}: stage {stage}, step {start} of "
              f"{steps[stage]}", file=sys.stderr)
    r = Run(recipe, run, model, head, processor, losses, save_every, quiet,
            stop or (lambda: False))
    stopped = False
    for name in STAGES[STAGES.index(stage):]:
        if steps[name] == 0:
            continue
        opt = optim.AdamW(learning_rate=schedule(recipe, name, steps[name]),
                          weight_decay=recipe.weight_decay)
        if name == stage and opt_state is not None:
            opt.state = opt_state
        else:
            start = 0
            if name == "pretrain" and recipe.decoder_init:
                model.language_model.load_weights(recipe.decoder_init)
        end = steps[name] if max_steps is None else min(steps[name], start + max_steps)
        stopped = run_stage(r, name, opt, start, end)
        if stopped:  # by max_steps or stop(): the next call resumes
            break
    model.unfreeze()
    model.eval()
    if out is not None and not stopped:
        save(model, processor, out, extra_files={"loss.png": str(run / "loss.png")},
             force=force or Path(out) == run / "model")
    return model, processor, losses


def build(recipe: Recipe, run: Path) -> tuple[Model, Processor, SlotHead]:
    """A fresh model for ``recipe`` (seeded), its processor and stage 0's head."""
    mx.random.seed(recipe.seed)
    run.mkdir(parents=True, exist_ok=True)
    processor = setup_processor(run, recipe)
    cfg = recipe.model
    cfg.image_token_id = processor.image_token_id
    cfg.text_config.vocab_size = max(cfg.text_config.vocab_size, len(processor.tokenizer))
    model = Model(cfg)
    return model, processor, SlotHead(cfg.num_image_tokens, cfg.text_config.hidden_size)


def stage_steps(recipe: Recipe) -> dict[str, int]:
    return dict(zip(STAGES, (recipe.text_steps, recipe.encoder_steps, recipe.pretrain_steps,
                             recipe.sft_steps)))


def prepare_stage(r: Run, name: str):
    """(the module that trains, its loss-and-gradient function, step -> batch) of stage ``name``."""
    r.model.train()
    if name == "encoder":
        trained = EncoderTrainer(r.model, r.head)
        return (trained, nn.value_and_grad(trained, encoder_loss),
                lambda s: make_encoder_batch(r.processor, r.recipe, s))
    r.model.unfreeze()
    if name == "text":  # the decoder alone
        r.model.vision_tower.freeze()
        r.model.connector.freeze()
    elif r.recipe.freeze_vision and r.recipe.encoder_steps:
        r.model.vision_tower.freeze()
    return (r.model, nn.value_and_grad(r.model, loss_fn),
            lambda s: make_batch(r.processor, r.recipe, name, s))


def run_stage(r: Run, name: str, opt, start: int, end: int) -> bool:
    """Steps ``start`` to ``end`` of stage ``name``, saved every ``save_every`` steps, at the
    stage's end and when ``stop()`` turns true; whether the stage stopped before its end."""
    total = stage_steps(r.recipe)[name]
    trained, step_fn, batches = prepare_stage(r, name)
    bar = tqdm(total=total, initial=start, desc=f"{r.recipe.name} {name}", disable=r.quiet,
               dynamic_ncols=True)
    t0, count = time.perf_counter(), 0
    unit = "img_s" if name == "encoder" else "tok_s"
    for step, arrays in prefetch(batches, range(start, end)):
        loss, n = optimizer_step(trained, step_fn, opt, arrays)
        r.losses.append((name, loss))
        count += n
        bar.set_postfix({"loss": f"{loss:.4g}", "lr": f"{opt.learning_rate.item():.1e}",
                         unit: f"{count / (time.perf_counter() - t0):.0f}"})
        bar.update(1)
        asked = r.stop()
        if (step + 1) % r.save_every == 0 or step + 1 == total or asked:
            save_state(r.dir, r.model, opt, name, step + 1, r.losses,
                       r.head if name == "encoder" else None)
            write_plot(r)
        if asked:
            bar.write(f"stopped: {name} step {step + 1} saved in {r.dir / 'state'}; the same "
                      "command resumes from there", file=sys.stderr)
            end = step + 1
            break
    bar.close()
    return end < total or r.stop()


def write_plot(r: Run) -> None:
    """``loss.png`` of the run so far, replaced atomically (a reader never sees half a figure)."""
    tmp = r.dir / "loss.tmp.png"
    plot_losses(stage_curves(r.losses), tmp, r.recipe.name, STAGE_STYLES)
    tmp.replace(r.dir / "loss.png")


def optimizer_step(trained: nn.Module, step_fn, opt, arrays) -> tuple[float, int]:
    """One clipped AdamW step on a batch; (loss, tokens or images it counted)."""
    (loss, n), grads = step_fn(trained, *(None if a is None else mx.array(a) for a in arrays))
    grads, _ = optim.clip_grad_norm(grads, 1.0)
    opt.update(trained, grads)
    mx.eval(trained.trainable_parameters(), opt.state, loss)
    return loss.item(), int(n.item())
