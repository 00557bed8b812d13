"""LoRA / QLoRA fine-tuning of an MM1 model on image conversations, on one machine or several.

    python -m mm1_mlx.lora --model M --data DIR --adapter-path OUT   # DIR/train.jsonl, valid.jsonl
    python -m mm1_mlx.lora --model M --data train.jsonl [--valid valid.jsonl] --adapter-path OUT
    python -m mm1_mlx.lora --config lora.yaml          # same keys as the flags (dashes or underscores)
    mlx.launch --backend ring -n 2 --python python -- -m mm1_mlx.lora ...   # data parallel

LoRA wraps the decoder's attention and MLP projections (MoE expert stacks included); a quantized base
gives QLoRA. By default LoRA also wraps every layer of a ViT image encoder (``--train-vision``;
an encoder that never saw a new shape or colour may not tell it apart) and each training image is
a fresh random variation at every step (``--augment``, ``mm1_mlx/tuner/augment.py``: without it an
adapted encoder learns the training pictures' pixels). ``--train-connector`` also trains the whole
connector. The loss falls on the assistant's tokens (``--mask-prompt``, the default);
``--no-mask-prompt`` trains on every text token, prompts included (never on image tokens). Bad
records are reported as FILE:LINE and left out (``--on-bad-data skip``, the default) or stop the
run before it starts (``fail``).

Every ``--save-every`` steps the adapter directory is rewritten atomically: adapters.safetensors,
adapter_config.json, training_state.safetensors (optimizer state, step, losses), training_log.json
and loss.png. ``--resume`` continues from the last complete save, even after a kill mid-save. The
data order, image variations and dropout masks are pure functions of (seed, step), so a resumed
run takes the same steps as an uninterrupted one. With several processes, each takes its share of
every global batch, gradients are averaged with ``mx.distributed`` and rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from .cli import args as cli_args
from .cli.signals import sigterm_interrupts
from .errors import MM1Error, cli_errors
from .io import atomic
from .tuner import adapters, datasets
from .tuner.batching import collate, prefetch

STATE_FILE = "training_state.safetensors"
LOG_FILE = "training_log.json"
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
    train_connector: bool = False
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
        """(training, validation) files; ``--data DIR`` is mlx-lm's layout, DIR/train.jsonl and
        DIR/valid.jsonl (used unless ``--valid`` names another)."""
        if not self.data:
            raise MM1Error("no training data: pass --data FILE or a directory with train.jsonl")
        data, valid = Path(self.data).expanduser(), self.valid and Path(self.valid).expanduser()
        if data.is_dir():
            if not (data / "train.jsonl").is_file():
                raise MM1Error(f"--data {data} is a directory without train.jsonl (mlx-lm's "
                               "layout: train.jsonl, optionally valid.jsonl)")
            if valid is None and (data / "valid.jsonl").is_file():
                valid = data / "valid.jsonl"
            data = data / "train.jsonl"
        for name, f in (("data", data), ("valid", valid)):
            if f and not f.is_file():  # before the (slow) model load
                raise MM1Error(f"--{name} file not found (or not a regular file): {f}")
        return data, valid

    def check(self) -> None:
        """Every setting's range, one line naming the flag / YAML key and what is allowed."""
        self.data_files()
        for k, lo, hi in (("iters", 1, 10**9), ("batch_size", 1, 10**6),
                          ("grad_accumulation", 1, 10**6), ("rank", 1, 4096),
                          ("save_every", 1, 10**9), ("steps_per_eval", 1, 10**9),
                          ("warmup", 0, 10**9), ("seed", 0, 2**32 - 1)):
            if getattr(self, k) is not None:  # iters, warmup: None means derived
                _in_range(k, getattr(self, k), lo, hi)
        for k in ("learning_rate", "alpha", "epochs"):
            if not 0 < getattr(self, k) < math.inf:
                raise MM1Error(f"--{_flag(k)} must be a positive number, got {getattr(self, k)}")
        for k in ("weight_decay", "max_grad_norm"):
            if not 0 <= getattr(self, k) < math.inf:
                raise MM1Error(f"--{_flag(k)} must be a number >= 0, got {getattr(self, k)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise MM1Error(f"--lr-schedule takes cosine or constant, got {self.lr_schedule!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise MM1Error(f"--dtype takes float32, bfloat16 or float16, got {self.dtype!r}")
        if self.on_bad_data not in ("skip", "fail"):
            raise MM1Error(f"--on-bad-data takes skip or fail, got {self.on_bad_data!r}")
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


def coerce(key: str, value, typ, where: str):
    """A YAML value -> the type of the TrainingArgs field (YAML 1.1 reads ``1e-3`` as a string),
    or an MM1Error naming the file, key, value and the type wanted."""
    args = typing.get_args(typ)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    base = typing.get_origin(base) or base
    if value is None:
        if optional:
            return None
        raise MM1Error(f"{where}: {key} is empty; it needs a {base.__name__}")
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of strings"}[base]
    try:
        if base is bool and isinstance(value, bool):
            return value
        if base is int and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            f = float(value)
            if f.is_integer() and abs(f) < 2**63:
                return int(f)
        if base is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            f = float(value)
            if math.isfinite(f):
                return f
        if base is str and isinstance(value, str):
            return value
        if base is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    except (ValueError, OverflowError):
        pass
    raise MM1Error(f"{where}: {key} = {str(value)[:60]!r}: must be {want}")


# ---- model ----
def setup_model(args: TrainingArgs):
    """(model with LoRA layers, processor, LoRA parameters); only adapters (+ connector) train."""
    from .checkpoint import load
    from .models.quantization import QUANTIZED, dequantize_model, is_quantized

    model, processor = load(args.model)
    if args.dequantize_base and is_quantized(model):
        dequantize_model(model)  # same values as the 4-bit weights; adapters still fit the base
    model.set_dtype(getattr(mx, args.dtype))  # float params; quantized weights stay packed
    model.freeze()
    mx.random.seed(args.seed)  # the same LoRA initialisation on every process
    vision = -1 if args.train_vision and adapters.vision_layers(model) else 0  # FastViT: none
    params = adapters.lora_config(args.rank, args.alpha, args.dropout, args.lora_layers,
                                  list(args.lora_keys or adapters.LORA_KEYS), vision)
    adapters.apply_lora(model, params)
    if args.train_connector:
        if any(isinstance(m, QUANTIZED) for _, m in model.connector.named_modules()):
            raise MM1Error("--train-connector needs a float connector; this one is quantized")
        model.connector.unfreeze()
    if args.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.layers[0])  # recompute each layer in the backward
    model.train()
    return model, processor, params


def loss_fn(model, ids, mask, pixels, ntok: float, aux_weight: float):
    """Summed token cross-entropy / ``ntok`` (the global batch's loss tokens) + weighted MoE aux."""
    logits, aux = model(ids[:, :-1], pixels, return_aux=True)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:]) * mask[:, 1:]
    return ce.sum() / ntok + aux_weight * aux


def make_optimizer(args: TrainingArgs):
    lr = args.learning_rate
    if args.lr_schedule == "cosine":
        lr = optim.cosine_decay(lr, max(1, args.iters - args.warmup), end=0.1 * lr)
    if args.warmup:
        warm = optim.linear_schedule(0.0, args.learning_rate, args.warmup)
        lr = optim.join_schedules([warm, lr if callable(lr) else (lambda _: args.learning_rate)],
                                  [args.warmup])
    return optim.AdamW(learning_rate=lr, weight_decay=args.weight_decay)


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
        mine = [ds[i] for i in idx[rank * share:(rank + 1) * share]]
        ids, mask = collate([(e.ids, e.mask) for e in mine], processor.tokenizer.pad_token_id)
        # seeded by global position: the same variations whatever the number of processes
        seeds = [f"{args.seed}:{step}:{k}:{i}" for i in range(rank * share, (rank + 1) * share)]
        out.append((ids, mask, datasets.prepare_pixels(mine, processor,
                                                       seeds if args.augment else None)))
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
        mine = [ds[i] for i in part]
        ids, mask = collate([(e.ids, e.mask) for e in mine], processor.tokenizer.pad_token_id)
        ids, mask, px = to_mx(ids, mask, datasets.prepare_pixels(mine, processor))
        logits = model(ids[:, :-1], px)
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:]) * mask[:, 1:]
        total = total + mx.stack([ce.sum(), mask[:, 1:].sum().astype(mx.float32)])
        mx.eval(total)
    if size > 1:
        total = mx.distributed.all_sum(total, group=group)
    model.train()
    return (total[0] / mx.maximum(total[1], 1)).item()


# ---- saving ----
def save(args: TrainingArgs, model, opt, adapter_cfg: dict, log: dict) -> None:
    """Rewrite the adapter directory atomically (a kill leaves the previous save intact)."""
    with adapters.save_dir(args.adapter_path) as tmp:
        adapters.write_adapters(tmp, model, adapter_cfg)
        state = {f"optimizer.{k}": v for k, v in tree_flatten(opt.state)}
        meta = {"step": log["step"], "seed": args.seed, "rng": "mx.random.seed per step"}
        mx.save_safetensors(str(tmp / STATE_FILE), state, metadata={"state": json.dumps(meta)})
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=1))
        plot_losses(log, tmp / "loss.png")


def load_state(args: TrainingArgs, model, opt, adapter_cfg: dict) -> dict | None:
    """Restore adapters, optimizer state and log from the last complete save (None: nothing)."""
    path = Path(args.adapter_path).expanduser()
    adapters.recover(path)
    if not (path / STATE_FILE).exists():
        return None
    saved = adapters.read_config(path)
    adapters.check_base(model, saved, path)
    if saved.get("lora_parameters") != adapter_cfg["lora_parameters"] or \
            saved.get("train_connector") != adapter_cfg["train_connector"]:
        raise MM1Error(f"--resume: {path} was trained with other LoRA settings "
                       f"({saved.get('lora_parameters')}); use the same ones or a new --adapter-path")
    damaged = "; start over with --force or use another --adapter-path"
    try:
        weights = mx.load(str(path / adapters.ADAPTERS_FILE))
        model.load_weights(list(weights.items()), strict=False)
        state = mx.load(str(path / STATE_FILE))
        opt.state = tree_unflatten([(k[len("optimizer."):], v) for k, v in state.items()
                                    if k.startswith("optimizer.")])
        log = json.loads((path / LOG_FILE).read_text(encoding="utf-8"))
    except (ValueError, RuntimeError, OSError) as e:  # JSONDecodeError, UnicodeError are ValueErrors
        raise MM1Error(f"--resume: cannot read the save in {path}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{damaged}") from None
    pairs = lambda v: isinstance(v, list) and all(  # noqa: E731
        isinstance(p, list) and len(p) == 2 and all(_number(x) for x in p) for p in v)
    if not (isinstance(log, dict) and isinstance(log.get("step"), int) and log["step"] >= 0
            and all(pairs(log.get(k, [])) for k in ("train", "valid"))
            and _number(log.get("seconds", 0))):
        raise MM1Error(f"--resume: {path / LOG_FILE} is not a training log (step, train, valid)"
                       + damaged)
    return log


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train", dict(linewidth=0.8)), ("valid", dict(marker="o"))):
        if log[key]:
            x, y = zip(*log[key])
            ax.plot(x, y, label=key, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"LoRA on {log['base_model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def report_problems(problems: list[str], name: str) -> None:
    if not problems:
        return
    print(f"skipped {len(problems)} bad record(s) in the {name} data:", file=sys.stderr)
    for p in problems[:10]:
        print(f"  {p}", file=sys.stderr)
    if len(problems) > 10:
        print(f"  ... and {len(problems) - 10} more (all listed in {LOG_FILE})", file=sys.stderr)


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
            f"decoder layers and {vision_layers or 'no'} image-encoder layers, image augmentation "
            f"{'on' if args.augment else 'off'}" + (f", {size} processes" if size > 1 else ""))


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
        from .checkpoint import resolve

        inputs = [resolve(args.model), args.data, args.valid]
        claim = atomic.claim_output(args.adapter_path, "adapter", inputs,
                                    force=args.resume or args.force, flag="--adapter-path")
    with claim:
        return run(args, group, quiet)


def run(args: TrainingArgs, group, quiet: bool) -> dict:
    rank, size = group.rank(), group.size()
    model, processor, params = setup_model(args)
    max_length = args.max_length or model.config.text_config.max_position_embeddings
    data, valid = args.data_files()
    show = not quiet and rank == 0
    train_ds, problems = datasets.load_dataset(data, processor, max_length,
                                                    args.mask_prompt, args.on_bad_data, show)
    valid_ds, vproblems = [], []
    if valid:
        valid_ds, vproblems = datasets.load_dataset(valid, processor, max_length,
                                                         args.mask_prompt, args.on_bad_data, show)
    if rank == 0:  # even when quiet (no progress bar): skipped data must never be silent
        report_problems(problems, "training")
        report_problems(vproblems, "validation")
    args = args.schedule(len(train_ds))
    opt = make_optimizer(args)
    adapter_cfg = adapters.adapter_config(model, params, args.train_connector)
    log = {"base_model": model.config.name, "args": dataclasses.asdict(args), "processes": size,
           "step": 0, "train": [], "valid": [], "skipped": problems + vproblems,
           "trainable_parameters": sum(v.size for v in adapters.trainable_weights(model).values()),
           "train_samples": len(train_ds), "valid_samples": len(valid_ds)}
    if args.resume:
        saved = load_state(args, model, opt, adapter_cfg)
        if saved is not None:
            log.update({k: saved[k] for k in ("step", "train", "valid", "seconds") if k in saved})
        elif rank == 0:
            print(f"nothing to resume in {args.adapter_path}; starting at step 0", file=sys.stderr)
    if rank == 0:  # after a resumed state was read: a damaged one is the only line printed
        vision = len(adapters.vision_layers(model)) if params["vision_layers"] else 0
        print(describe_schedule(args, len(train_ds), size, vision), file=sys.stderr)
    if rank == 0 and log["step"]:
        print(f"resuming at step {log['step']} from {args.adapter_path}", file=sys.stderr)
    mx.eval(model.parameters(), opt.state)
    step_fn = nn.value_and_grad(model, loss_fn)
    start, saved_step = log["step"], log["step"]
    mx.reset_peak_memory()
    bar = tqdm(total=args.iters, initial=start, desc="lora", disable=quiet or rank != 0,
               dynamic_ncols=True)
    t0, tokens, run_s = time.perf_counter(), 0, log.get("seconds", 0.0)
    step = start
    try:
        # prefetch re-raises here anything raised while building a batch in its thread
        for step, batch in prefetch(lambda s: step_batches(train_ds, processor, args, s, rank, size),
                                    range(start, args.iters)):
            micro, ntok, ntotal = batch
            mx.random.seed(args.seed * 1_000_003 + step * 101 + rank)  # dropout masks by step
            grads, loss = None, mx.array(0.0)
            for ids, mask, px in micro:
                lval, g = step_fn(model, *to_mx(ids, mask, px), max(ntok, 1) / size,
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
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            log["step"] = step + 1
            log["train"].append((step + 1, float(f"{lv:.5g}")))
            tokens += ntotal
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{lv:.3g}", tok_s=f"{tokens / dt:.0f}",
                            lr=f"{opt.learning_rate.item():.1e}",
                            mem=f"{mx.get_peak_memory() / 2**20:.0f}MB")
            bar.update(1)
            last = step + 1 == args.iters
            if valid_ds and ((step + 1) % args.steps_per_eval == 0 or last):
                vl = validation_loss(model, valid_ds, processor, args, group)
                log["valid"].append((step + 1, float(f"{vl:.5g}")))
                if rank == 0 and not quiet:
                    bar.write(f"step {step + 1}: validation loss {vl:.4f}")
            if (step + 1) % args.save_every == 0 or last:
                log.update(seconds=round(run_s + time.perf_counter() - t0, 2),
                           peak_memory_gb=round(mx.get_peak_memory() / 1e9, 4),
                           max_rss_gb=round(max_rss_bytes() / 1e9, 4),
                           tokens_per_second=round(tokens / dt, 1))
                if rank == 0:
                    save(args, model, opt, adapter_cfg, log)
                saved_step = step + 1
    except BaseException:
        # a crash or Ctrl-C mid-run keeps every finished step (never NaN weights: checked above)
        if rank == 0 and log["step"] > saved_step:
            save(args, model, opt, adapter_cfg, log)
            print(f"\nstopped: adapters of step {log['step']} saved in {args.adapter_path}",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
    if log["step"] == start and rank == 0:
        print(f"already trained for {start} steps (--iters {args.iters})", file=sys.stderr)
    return log


# ---- command line ----
def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m mm1_mlx.lora",
                                description="LoRA / QLoRA fine-tuning of an MM1 model.")
    p.add_argument("--config", "-c", default=None,
                   help="YAML file of TrainingArgs (flags override it)")
    p.add_argument("--model", help="base checkpoint (default mm1-tiny); a quantized one = QLoRA")
    p.add_argument("--train", action="store_true",
                   help="accepted for mlx-lm's habit (this tool always trains)")
    p.add_argument("--data", help="training data: a directory with train.jsonl [and valid.jsonl] "
                                  "(mlx-lm's layout), or a file: LLaVA .json, or .jsonl of "
                                  "messages+images / image+prompt+response")
    p.add_argument("--valid", help="validation data (same formats; default DATA_DIR/valid.jsonl)")
    p.add_argument("--adapter-path", help="output adapter directory (default ./adapters)")
    p.add_argument("--iters", type=int,
                   help=f"optimizer steps (default: --epochs passes, at most {MAX_DEFAULT_ITERS})")
    p.add_argument("--epochs", type=float,
                   help=f"passes over the data when --iters is not given (default "
                        f"{DEFAULT_EPOCHS:g})")
    p.add_argument("--batch-size", type=int, help="global batch size (default 8)")
    p.add_argument("--grad-accumulation", "--grad-accumulation-steps", dest="grad_accumulation",
                   type=int, help="micro-batches per step (default 1)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"])
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float, help="clip gradients (0 = off; default 1)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default 32)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default 0)")
    p.add_argument("--lora-layers", "--num-layers", dest="lora_layers", type=int,
                   help="LoRA on the last N decoder layers (-1 = all)")
    p.add_argument("--train-vision", action=argparse.BooleanOptionalAction,
                   help="LoRA on every layer of a ViT image encoder too (default on; "
                        "--no-train-vision: the decoder alone)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="a random zoom/shift/rotation, colour, noise and JPEG variation of each "
                        "training image at every step (default on; --no-augment: off)")
    p.add_argument("--train-connector", action=argparse.BooleanOptionalAction,
                   help="also train the whole connector")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass (less memory)")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction,
                   help="loss on assistant tokens only (default); --no-mask-prompt: all text")
    p.add_argument("--max-length", "--max-seq-length", dest="max_length", type=int,
                   help="longest sample in tokens (default: context)")
    p.add_argument("--save-every", type=int, help="save adapters every N steps (default 100)")
    p.add_argument("--steps-per-eval", type=int, help="validation every N steps (default 50)")
    p.add_argument("--val-batches", type=int, help="validation batches (-1 = all; default 8)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction,
                   help="continue from the last complete save in --adapter-path")
    p.add_argument("--force", action=argparse.BooleanOptionalAction,
                   help="replace an existing adapter directory (start over)")
    p.add_argument("--on-bad-data", choices=["skip", "fail"],
                   help="skip bad records and report them (default) or stop before training")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dequantize-base", action=argparse.BooleanOptionalAction,
                   help="train over float copies of a quantized base's weights: the same "
                        "values, more memory, far faster on Linux CPU (MLX's CPU quantized "
                        "matmul is ~20x slower than float); the adapters fit the quantized base")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (skipped records and warnings are still reported)")
    return p


# mlx-lm's names for the same settings, as YAML keys (the flags take them too)
YAML_ALIASES = {"num_layers": "lora_layers", "max_seq_length": "max_length",
                "grad_accumulation_steps": "grad_accumulation"}


def args_from(ns: argparse.Namespace) -> TrainingArgs:
    """TrainingArgs from defaults <- YAML config <- command-line flags."""
    values = {}
    if ns.config:
        values = read_yaml(ns.config)
    for f in dataclasses.fields(TrainingArgs):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainingArgs(**values)


def read_yaml(path: str) -> dict:
    """The YAML settings file, each value coerced to its TrainingArgs field's type."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise MM1Error(f"bad YAML in {path}: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise MM1Error(f"{path} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise MM1Error(f"{path} is nested too deeply") from None
    if not isinstance(cfg, dict):
        raise MM1Error(f"{path} must hold a mapping of training settings, not a "
                       f"{type(cfg).__name__}")
    types = typing.get_type_hints(TrainingArgs)
    values = {}
    for k, v in cfg.items():
        key = str(k).replace("-", "_")
        key = YAML_ALIASES.get(key, key)
        if key == "train":  # mlx-lm's "train: true"; this tool always trains
            continue
        if key not in types:
            raise MM1Error(f"{path}: unknown setting {str(k)[:60]!r}")
        values[key] = coerce(str(k), v, types[key], path)
    return values


@cli_errors
def main(argv=None) -> dict:
    ns = setup_arg_parser().parse_args(argv)
    args = args_from(ns)
    with sigterm_interrupts():
        log = train(args, quiet=ns.quiet)
    if mx.distributed.init().rank() == 0:
        last = log["train"][-1][1] if log["train"] else float("nan")
        val = f", validation loss {log['valid'][-1][1]:.4f}" if log["valid"] else ""
        print(f"saved {args.adapter_path}: step {log['step']}, loss {last:.4f}{val}, "
              f"{log.get('seconds', 0):.0f} s, peak memory {log.get('peak_memory_gb', 0):.3f} GB")
    return log


if __name__ == "__main__":
    main()
