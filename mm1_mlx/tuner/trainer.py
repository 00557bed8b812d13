"""The LoRA / QLoRA training loop, on one machine or several (``python -m mm1_mlx.lora`` is its
command line).

``TrainingArgs`` holds every setting; ``train(args)`` checks them, claims the adapter directory and
runs: the model with LoRA layers (``setup_model``), the data, the optimizer and schedule, a resumed
state if asked, then ``train_loop``. Every ``save_every`` steps the adapter directory is rewritten
atomically: adapters.safetensors, adapter_config.json, training_state.safetensors (optimizer state,
step), training_log.json and loss.png; ``load_state`` continues from the last complete save. The
data order, image variations (``augment``) and dropout masks are pure functions of (seed, step), so
a resumed run takes the same steps as an uninterrupted one. With several processes each takes its
share of every global batch, gradients are averaged with ``mx.distributed`` and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from ..errors import MM1Error
from ..io import atomic
from ..processor import Processor
from . import adapters, datasets
from .batching import encoded_batch, prefetch
from .losses import masked_ce
from .plots import plot_losses

STATE_FILE = "training_state.safetensors"
LOG_FILE = "training_log.json"
LOSS_STYLES = {"train": dict(linewidth=0.8), "valid": dict(marker="o")}  # loss.png
DAMAGED = "; start over with --force or use another --adapter-path"
# chosen by measurement (README, "Fine-tuning"): 300 examples teaching a new shape and colour
DEFAULT_EPOCHS = 8.0
MAX_DEFAULT_ITERS = 1000  # mlx-lm's default: a large data set is not run for epochs by default


@dataclass
class TrainingArgs:
    data: str | None = None  # training data (.json LLaVA / .jsonl)
    model: str | None = None  # base checkpoint (default mm1-tiny); quantized -> QLoRA
    valid: str | None = None
    adapter_path: str = "adapters"
    iters: int | None = None  # optimizer steps; None: ``epochs`` passes over the data
    epochs: float = DEFAULT_EPOCHS  # used when iters is None (at most MAX_DEFAULT_ITERS steps)
    batch_size: int = 8  # global: split across processes
    grad_accumulation: int = 1
    learning_rate: float = 1e-3  # suits alpha = 2 x rank (scale 2); see the README's measurements
    lr_schedule: str = "cosine"  # cosine (to 10%) | constant
    warmup: int | None = None  # linear warm-up steps; None: 5% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rank: int = 16
    alpha: float = 32.0  # LoRA scale = alpha / rank
    dropout: float = 0.0
    lora_layers: int = -1  # the last N decoder layers; -1 = all
    lora_keys: list | None = None  # decoder-layer modules to wrap (default adapters.LORA_KEYS)
    train_vision: bool = True  # LoRA on every ViT layer of the image encoder too
    augment: bool = True  # a fresh random variation of each training image at every step
    train_connector: bool | None = None  # the whole connector; None: when it is float
    train_vision_embeddings: bool = False  # the ViT's patch/position embeddings, trained whole
    # weights trained whole (connector, ViT embeddings) move at this fraction of the learning rate:
    # Adam moves every weight ~lr a step, and 1e-3 is 1-2% of a typical connector weight here;
    # 0.3 measured against 0.1 on eight data seeds (README, "Fine-tuning")
    whole_lr_scale: float = 0.3
    image_size: int | None = None  # px; None: the model's finetune_image_size, else its own
    grad_checkpoint: bool = False
    mask_prompt: bool = True
    max_length: int | None = None  # default: the decoder's max_position_embeddings
    save_every: int = 100
    steps_per_eval: int = 50
    val_batches: int = 8  # -1 = the whole validation set
    resume: bool = False
    force: bool = False  # replace an existing adapter directory (start over)
    on_bad_data: str = "skip"  # skip | fail
    dtype: str = "float32"  # compute dtype of the float parameters (float32 is fastest on CPU)
    dequantize_base: bool = False  # compute with float copies of a quantized base (see --help)
    seed: int = 0

    def data_files(self) -> tuple[Path, Path | None]:
        """(training, validation) files (see ``datasets.data_files``)."""
        return datasets.data_files(self.data, self.valid)

    def check(self) -> None:
        """Every setting's range, one line naming the flag / YAML key and what is allowed."""
        self.data_files()
        for k, lo, hi in (("iters", 1, 10**9), ("batch_size", 1, 10**6), ("image_size", 1, 8192),
                          ("grad_accumulation", 1, 10**6), ("rank", 1, 4096),
                          ("save_every", 1, 10**9), ("steps_per_eval", 1, 10**9),
                          ("warmup", 0, 10**9), ("seed", 0, 2**32 - 1)):
            if getattr(self, k) is not None:  # iters, warmup: None means derived
                _in_range(k, getattr(self, k), lo, hi)
        for k in ("learning_rate", "alpha", "epochs", "whole_lr_scale"):
            if not 0 < getattr(self, k) < math.inf:
                raise MM1Error(f"--{_flag(k)} must be a positive number, got {getattr(self, k)}")
        for k in ("weight_decay", "max_grad_norm"):
            if not 0 <= getattr(self, k) < math.inf:
                raise MM1Error(f"--{_flag(k)} must be a number >= 0, got {getattr(self, k)}")
        self._check_choices()
        self._check_limits()

    def _check_choices(self) -> None:
        if self.lr_schedule not in ("cosine", "constant"):
            raise MM1Error(f"--lr-schedule takes cosine or constant, got {self.lr_schedule!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise MM1Error(f"--dtype takes float32, bfloat16 or float16, got {self.dtype!r}")
        if self.on_bad_data not in ("skip", "fail"):
            raise MM1Error(f"--on-bad-data takes skip or fail, got {self.on_bad_data!r}")

    def _check_limits(self) -> None:
        if not 0 <= self.dropout < 1:
            raise MM1Error(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lora_layers != -1:
            _in_range("lora_layers", self.lora_layers, 1, 10**6, " (or -1 for all)")
        if self.val_batches != -1:
            _in_range("val_batches", self.val_batches, 1, 10**9, " (or -1 for all)")
        if self.max_length is not None:
            _in_range("max_length", self.max_length, 2, 10**8)
        if not self.adapter_path:
            raise MM1Error("--adapter-path must not be empty")
        if self.lora_keys is not None and not self.lora_keys:
            raise MM1Error("lora_keys must list at least one module name")

    @property
    def whole_learning_rate(self) -> float:
        """Peak learning rate of the weights trained whole."""
        return self.whole_lr_scale * self.learning_rate

    def schedule(self, samples: int) -> TrainingArgs:
        """These settings with the steps and warm-up fixed for ``samples`` training samples."""
        iters = self.iters or max(1, min(MAX_DEFAULT_ITERS,
                                         math.ceil(self.epochs * samples / self.batch_size)))
        warmup = self.warmup if self.warmup is not None else round(0.05 * iters)
        return dataclasses.replace(self, iters=iters, warmup=min(warmup, iters - 1))


def _flag(key: str) -> str:
    return key.replace("_", "-")


def _in_range(key: str, value: int, lo: int, hi: int, extra: str = "") -> None:
    if not lo <= value <= hi:
        raise MM1Error(f"--{_flag(key)} must be between {lo} and {hi}{extra}, got {value}")


# ---- model, loss, optimizer ----
def setup_model(args: TrainingArgs):
    """(model with LoRA layers, processor, LoRA parameters, ``args`` with ``image_size``,
    ``train_connector`` and ``train_vision_embeddings`` decided for this model); only adapters (+
    connector, ViT embeddings) train."""
    from ..checkpoint import load
    from ..models.quantization import dequantize_model, is_quantized

    model, processor = load(args.model)
    size = args.image_size or adapters.finetune_image_size(processor)
    adapters.set_image_size(model, processor, size)
    args = dataclasses.replace(args, image_size=size)
    if args.dequantize_base and is_quantized(model):
        dequantize_model(model)  # same values as the 4-bit weights; adapters still fit the base
    model.set_dtype(getattr(mx, args.dtype))  # float params; quantized weights stay packed
    model.freeze()
    mx.random.seed(args.seed)  # the same LoRA initialisation on every process
    vision = -1 if args.train_vision and adapters.vision_layers(model) else 0  # FastViT: none
    params = adapters.lora_config(args.rank, args.alpha, args.dropout, args.lora_layers,
                                  list(args.lora_keys or adapters.LORA_KEYS), vision)
    adapters.apply_lora(model, params)
    args = unfreeze_whole(model, args, vision != 0)
    if args.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.layers[0])  # recompute each layer in the backward
    model.train()
    return model, processor, params, args


def unfreeze_whole(model: nn.Module, args: TrainingArgs, vit: bool) -> TrainingArgs:
    """Unfreeze the parts trained whole; returns ``args`` with ``train_connector`` (None: when the
    connector is float) and ``train_vision_embeddings`` (only with a ViT's LoRA) decided."""
    from ..models.quantization import QUANTIZED

    float_connector = not any(isinstance(m, QUANTIZED) for _, m in model.connector.named_modules())
    if args.train_connector and not float_connector:
        raise MM1Error("--train-connector needs a float connector; this one is quantized")
    args = dataclasses.replace(
        args, train_connector=float_connector if args.train_connector is None
        else args.train_connector, train_vision_embeddings=args.train_vision_embeddings and vit)
    if args.train_connector:
        model.connector.unfreeze()
    if args.train_vision_embeddings:
        adapters.unfreeze_vision_embeddings(model)
    return args


def loss_fn(model, ids, mask, pixels, ntok: float, aux_weight: float):
    """Summed token cross-entropy / ``ntok`` (the global batch's loss tokens) + weighted MoE aux."""
    logits, aux = model(ids[:, :-1], pixels, return_aux=True)
    ce, _ = masked_ce(logits, ids, mask)
    return ce / ntok + aux_weight * aux


def lr_schedule(args: TrainingArgs, peak: float):
    """Warm-up to ``peak``, then cosine to 10% of it or constant."""
    lr = peak
    if args.lr_schedule == "cosine":
        lr = optim.cosine_decay(peak, max(1, args.iters - args.warmup), end=0.1 * peak)
    if args.warmup:
        warm = optim.linear_schedule(0.0, peak, args.warmup)
        lr = optim.join_schedules([warm, lr if callable(lr) else (lambda _: peak)], [args.warmup])
    return lr


def make_optimizer(args: TrainingArgs, whole_weights: bool = False):
    """AdamW for the LoRA matrices; when ``whole_weights`` train too (the connector, the ViT's
    embeddings) a second AdamW for them at ``whole_learning_rate``."""
    opt = optim.AdamW(learning_rate=lr_schedule(args, args.learning_rate),
                      weight_decay=args.weight_decay)
    if not whole_weights:
        return opt
    whole = optim.AdamW(learning_rate=lr_schedule(args, args.whole_learning_rate),
                        weight_decay=args.weight_decay)
    return optim.MultiOptimizer([opt, whole], [lambda k, _: adapters.is_lora(k)])


# ---- batches ----
def step_batches(ds, processor, args: TrainingArgs, step: int, rank: int, size: int):
    """This process's micro-batches of global step ``step``, and the global counts of loss tokens
    and of all tokens (every process computes them alike from the pre-tokenized data)."""
    out, ntok, ntotal = [], 0, 0
    share = args.batch_size // size
    for k in range(args.grad_accumulation):
        idx = datasets.batch_order(len(ds), step * args.grad_accumulation + k,
                                   args.batch_size, args.seed)
        ntok += sum(sum(ds[i].mask[1:]) for i in idx)
        ntotal += sum(len(ds[i].ids) for i in idx)
        # seeded by global position: the same variations whatever the number of processes
        seeds = [f"{args.seed}:{step}:{k}:{i}" for i in range(rank * share, (rank + 1) * share)]
        out.append(encoded_batch([ds[i] for i in idx[rank * share:(rank + 1) * share]], processor,
                                 seeds if args.augment else None))
    return out, ntok, ntotal


def to_mx(ids, mask, px):
    return mx.array(ids), mx.array(mask), None if px is None else mx.array(px)


def validation_loss(model, ds, processor, args: TrainingArgs, group) -> float:
    """Mean token cross-entropy over (the first ``val_batches`` batches of) the validation set."""
    model.eval()
    rank, size = group.rank(), group.size()
    n = len(ds) if args.val_batches < 0 else min(len(ds), args.val_batches * args.batch_size)
    total = mx.zeros((2,))
    for start in range(0, n, args.batch_size):
        part = list(range(start, min(n, start + args.batch_size)))[rank::size]
        if not part:
            continue
        ids, mask, px = to_mx(*encoded_batch([ds[i] for i in part], processor))
        ce, ntok = masked_ce(model(ids[:, :-1], px), ids, mask)
        total = total + mx.stack([ce, ntok.astype(mx.float32)])
        mx.eval(total)
    if size > 1:
        total = mx.distributed.all_sum(total, group=group)
    model.train()
    return (total[0] / mx.maximum(total[1], 1)).item()


# ---- saving and resuming ----
def save(args: TrainingArgs, model, opt, adapter_cfg: dict, log: dict) -> None:
    """Rewrite the adapter directory atomically (a kill leaves the previous save intact)."""
    with adapters.save_dir(args.adapter_path) as tmp:
        adapters.write_adapters(tmp, model, adapter_cfg)
        state = {f"optimizer.{k}": v for k, v in tree_flatten(opt.state)}
        meta = {"step": log["step"], "seed": args.seed, "rng": "mx.random.seed per step"}
        mx.save_safetensors(str(tmp / STATE_FILE), state, metadata={"state": json.dumps(meta)})
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=1))
        plot_losses({k: log[k] for k in ("train", "valid")}, tmp / "loss.png",
                    f"LoRA on {log['base_model']}", LOSS_STYLES)


def load_state(args: TrainingArgs, model, opt, adapter_cfg: dict) -> dict | None:
    """Restore adapters, optimizer state and log from the last complete save (None: nothing)."""
    path = Path(args.adapter_path).expanduser()
    adapters.recover(path)
    if not (path / STATE_FILE).exists():
        return None
    saved = adapters.read_config(path)
    adapters.check_base(model, saved, path)
    if saved.get("lora_parameters") != adapter_cfg["lora_parameters"]:
        raise MM1Error(f"--resume: {path} was trained with other LoRA settings "
                       f"({saved.get('lora_parameters')}); use the same ones or a new --adapter-path")
    for key in ("train_connector", "train_vision_embeddings"):
        was = saved.get(key, False)
        if was != adapter_cfg[key]:  # e.g. saved before a default changed
            raise MM1Error(f"--resume: {path} was trained with --{'' if was else 'no-'}"
                           f"{_flag(key)}; pass it or use a new --adapter-path")
    trained_at = saved.get("image_size", model.config.vision_config.image_size)  # older saves
    if trained_at != adapter_cfg["image_size"]:
        raise MM1Error(f"--resume: {path} was trained on images of {trained_at} px, not "
                       f"{adapter_cfg['image_size']}; pass --image-size {trained_at} or use a "
                       "new --adapter-path")
    try:
        weights = mx.load(str(path / adapters.ADAPTERS_FILE))
        model.load_weights(list(weights.items()), strict=False)
        state = mx.load(str(path / STATE_FILE))
        opt.state = tree_unflatten([(k[len("optimizer."):], v) for k, v in state.items()
                                    if k.startswith("optimizer.")])
        log = json.loads((path / LOG_FILE).read_text(encoding="utf-8"))
    except (ValueError, RuntimeError, OSError) as e:  # JSONDecodeError, UnicodeError are ValueErrors
        raise MM1Error(f"--resume: cannot read the save in {path}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{DAMAGED}") from None
    if not _is_log(log):
        raise MM1Error(f"--resume: {path / LOG_FILE} is not a training log (step, train, valid)"
                       + DAMAGED)
    return log


def _is_log(log) -> bool:
    """Whether ``log`` has a step count and (step, loss) pairs, as ``save`` writes them."""
    pairs = lambda v: isinstance(v, list) and all(  # noqa: E731
        isinstance(p, list) and len(p) == 2 and all(_number(x) for x in p) for p in v)
    return (isinstance(log, dict) and isinstance(log.get("step"), int) and log["step"] >= 0
            and all(pairs(log.get(k, [])) for k in ("train", "valid"))
            and _number(log.get("seconds", 0)))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def max_rss_bytes() -> int:
    """Peak resident memory of this process (MLX's peak counts only its own buffers): Linux's
    ``VmHWM``, which starts afresh at exec (``ru_maxrss`` carries a parent's peak into a child)."""
    import re
    import resource

    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ---- training ----
def describe_schedule(args: TrainingArgs, samples: int, size: int, vision_layers: int = 0) -> str:
    """One line saying what the run will do (printed before it starts); ``vision_layers``: how
    many image-encoder layers get LoRA."""
    epochs = args.iters * args.batch_size * args.grad_accumulation / samples
    lr = f"{args.learning_rate:g}" + (f" cosine to {0.1 * args.learning_rate:g}"
                                      if args.lr_schedule == "cosine" else " constant")
    layers = "all" if args.lora_layers < 0 else f"the last {args.lora_layers}"
    return (f"training {args.iters} steps of batch {args.batch_size * args.grad_accumulation} "
            f"over {samples} samples ({epochs:.1f} epochs), learning rate {lr} after "
            f"{args.warmup} warm-up steps, LoRA rank {args.rank} alpha {args.alpha:g} on {layers} "
            f"decoder layers and {vision_layers or 'no'} image-encoder layers{whole_parts(args)}, "
            f"images at {args.image_size} px, image augmentation {'on' if args.augment else 'off'}"
            + (f", {size} processes" if size > 1 else ""))


def whole_parts(args: TrainingArgs) -> str:
    """The schedule line's words for the weights trained whole (or "")."""
    parts = [name for on, name in ((args.train_connector, "the connector"),
                                   (args.train_vision_embeddings, "the image-encoder embeddings"))
             if on]
    if not parts:
        return ""
    return f", {' and '.join(parts)} whole at {args.whole_learning_rate:g}"


def one_host(group) -> bool:
    """Whether every process of ``group`` runs on this machine."""
    import socket
    import zlib

    here = mx.array([zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF], dtype=mx.int32)
    return bool(mx.all(mx.distributed.all_gather(here, group=group) == here).item())


# measured on one 2-core machine (README, "Fine-tuning"): the same 8 steps of batch 8 on mm1-tiny
ONE_HOST_NOTE = ("note: {n} processes on one machine: ring data parallel pays across machines, "
                 "not within one (each process already uses every core; on a 2-core machine 2 "
                 "processes trained 4x slower than 1, 162 s vs 37 s); run one process instead")


def train(args: TrainingArgs, quiet: bool = False) -> dict:
    """Fine-tune; returns the training log (losses, timing, peak memory, skipped records).
    ``quiet`` hides the progress bar, never the skipped records or the schedule.

    Rank 0 holds the adapter path's lock for the whole run: a second run on it is refused."""
    args.check()
    group = mx.distributed.init()
    if args.batch_size % group.size():
        raise MM1Error(f"--batch-size {args.batch_size} must be a multiple of the "
                       f"{group.size()} processes")
    rank, size = group.rank(), group.size()
    if size > 1 and one_host(group) and rank == 0:  # every process takes part in the gather
        print(ONE_HOST_NOTE.format(n=size), file=sys.stderr)
    claim = contextlib.nullcontext()
    if rank == 0:
        from ..checkpoint import resolve

        inputs = [resolve(args.model), args.data, args.valid]
        claim = atomic.claim_output(args.adapter_path, "adapter", inputs,
                                    force=args.resume or args.force, flag="--adapter-path")
    with claim:
        return run(args, group, quiet)


@dataclass
class Session:
    """What one run trains and on which data (built by ``setup``); ``log`` grows as it goes."""
    args: TrainingArgs  # with the schedule fixed for the data
    model: nn.Module
    processor: Processor
    opt: optim.Optimizer
    adapter_cfg: dict
    train_ds: list
    valid_ds: list
    group: object  # mx.distributed.Group
    log: dict


def run(args: TrainingArgs, group, quiet: bool) -> dict:
    """Set up, resume if asked, then train to ``args.iters`` steps; returns the training log."""
    s = setup(args, group, quiet)
    if s.args.resume:
        resume(s)
    if group.rank() == 0:  # after a resumed state was read: a damaged one is the only line printed
        vision = adapters.lora_vision_layers(s.model)
        print(describe_schedule(s.args, len(s.train_ds), group.size(), vision), file=sys.stderr)
        if s.log["step"]:
            print(f"resuming at step {s.log['step']} from {args.adapter_path}", file=sys.stderr)
    mx.eval(s.model.parameters(), s.opt.state)
    start = s.log["step"]
    train_loop(s, quiet)
    if s.log["step"] == start and group.rank() == 0:
        print(f"already trained for {start} steps (--iters {s.args.iters})", file=sys.stderr)
    return s.log


def setup(args: TrainingArgs, group, quiet: bool) -> Session:
    """The model with adapters, the data (bad records reported), the optimizer, a fresh log."""
    model, processor, params, args = setup_model(args)
    train_ds, valid_ds, skipped = load_data(args, processor, model, group.rank(), quiet)
    args = args.schedule(len(train_ds))
    log = {"base_model": model.config.name, "args": dataclasses.asdict(args),
           "processes": group.size(), "step": 0, "train": [], "valid": [], "skipped": skipped,
           "trainable_parameters": sum(v.size for v in adapters.trainable_weights(model).values()),
           "train_samples": len(train_ds), "valid_samples": len(valid_ds)}
    whole = args.train_vision_embeddings or args.train_connector
    return Session(args, model, processor, make_optimizer(args, whole),
                   adapters.adapter_config(model, params, args.train_connector,
                                           args.train_vision_embeddings, args.image_size),
                   train_ds, valid_ds, group, log)


def load_data(args: TrainingArgs, processor, model, rank: int, quiet: bool):
    """(training samples, validation samples, every skipped record's problem)."""
    max_length = args.max_length or model.config.text_config.max_position_embeddings
    data, valid = args.data_files()
    load = lambda f: datasets.load_dataset(  # noqa: E731
        f, processor, max_length, args.mask_prompt, args.on_bad_data, not quiet and rank == 0)
    train_ds, problems = load(data)
    valid_ds, vproblems = load(valid) if valid else ([], [])
    if rank == 0:  # even when quiet (no progress bar): skipped data must never be silent
        datasets.report_problems(problems, "training", LOG_FILE)
        datasets.report_problems(vproblems, "validation", LOG_FILE)
    return train_ds, valid_ds, problems + vproblems


def resume(s: Session) -> None:
    """Continue from the adapter directory's last complete save, if there is one."""
    saved = load_state(s.args, s.model, s.opt, s.adapter_cfg)
    if saved is not None:
        s.log.update({k: saved[k] for k in ("step", "train", "valid", "seconds") if k in saved})
    elif s.group.rank() == 0:
        print(f"nothing to resume in {s.args.adapter_path}; starting at step 0", file=sys.stderr)


def train_loop(s: Session, quiet: bool) -> None:
    """The steps from the log's to ``args.iters``: validated every ``steps_per_eval`` and saved
    every ``save_every``; a crash or Ctrl-C mid-run still saves every finished step."""
    args, log, rank, size = s.args, s.log, s.group.rank(), s.group.size()
    step_fn = nn.value_and_grad(s.model, loss_fn)
    saved = log["step"]
    mx.reset_peak_memory()
    bar = tqdm(total=args.iters, initial=log["step"], desc="lora", disable=quiet or rank != 0,
               dynamic_ncols=True)
    t0, tokens, before = time.perf_counter(), 0, log.get("seconds", 0.0)
    batches = lambda step: step_batches(s.train_ds, s.processor, args, step, rank, size)  # noqa: E731
    try:
        # prefetch re-raises here anything raised while building a batch in its thread
        for step, (micro, ntok, ntotal) in prefetch(batches, range(log["step"], args.iters)):
            loss = train_step(s, step_fn, step, micro, ntok)
            log["step"] = step + 1
            log["train"].append((step + 1, float(f"{loss:.5g}")))
            tokens += ntotal
            speed = tokens / (time.perf_counter() - t0)
            show_progress(bar, loss, speed, s.opt)
            last = step + 1 == args.iters
            if s.valid_ds and ((step + 1) % args.steps_per_eval == 0 or last):
                validate(s, bar, quiet)
            if (step + 1) % args.save_every == 0 or last:
                log.update(measurements(before + time.perf_counter() - t0, speed))
                if rank == 0:
                    save(args, s.model, s.opt, s.adapter_cfg, log)
                saved = step + 1
    except BaseException:
        rescue(s, saved)
        raise
    finally:
        bar.close()


def train_step(s: Session, step_fn, step: int, micro: list, ntok: int) -> float:
    """One optimizer step over this process's micro-batches; the loss averaged over processes."""
    args, group, size = s.args, s.group, s.group.size()
    mx.random.seed(args.seed * 1_000_003 + step * 101 + group.rank())  # dropout masks by step
    grads, loss = None, mx.array(0.0)
    for ids, mask, px in micro:
        lval, g = step_fn(s.model, *to_mx(ids, mask, px), max(ntok, 1) / size,
                          1.0 / args.grad_accumulation)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss = loss + lval
        mx.eval(grads, loss)
    grads = nn.average_gradients(grads, group=group)
    if size > 1:
        loss = mx.distributed.all_sum(loss, group=group) / size
    lv = loss.item()
    if not math.isfinite(lv):  # before the update: the adapters never hold NaNs
        raise MM1Error(f"the loss became {lv} at step {step + 1}; stopping "
                       "(lower --learning-rate?)")
    if args.max_grad_norm > 0:
        grads, _ = optim.clip_grad_norm(grads, args.max_grad_norm)
    s.opt.update(s.model, grads)
    mx.eval(s.model.parameters(), s.opt.state)
    return lv


def show_progress(bar, loss: float, tokens_per_second: float, opt) -> None:
    bar.set_postfix(loss=f"{loss:.3g}", tok_s=f"{tokens_per_second:.0f}",
                    lr=f"{opt.learning_rate.item():.1e}",
                    mem=f"{mx.get_peak_memory() / 2**20:.0f}MB")
    bar.update(1)


def validate(s: Session, bar, quiet: bool) -> None:
    vl = validation_loss(s.model, s.valid_ds, s.processor, s.args, s.group)
    s.log["valid"].append((s.log["step"], float(f"{vl:.5g}")))
    if s.group.rank() == 0 and not quiet:
        bar.write(f"step {s.log['step']}: validation loss {vl:.4f}")


def measurements(seconds: float, tokens_per_second: float) -> dict:
    """The log's timing and memory figures, as of now."""
    return dict(seconds=round(seconds, 2), peak_memory_gb=round(mx.get_peak_memory() / 1e9, 4),
                max_rss_gb=round(max_rss_bytes() / 1e9, 4),
                tokens_per_second=round(tokens_per_second, 1))


def rescue(s: Session, saved: int) -> None:
    """After a crash or Ctrl-C: save the steps finished since the last save (never NaN weights:
    ``train_step`` stops before such an update)."""
    if s.group.rank() == 0 and s.log["step"] > saved:
        save(s.args, s.model, s.opt, s.adapter_cfg, s.log)
        print(f"\nstopped: adapters of step {s.log['step']} saved in {s.args.adapter_path}",
              file=sys.stderr)
