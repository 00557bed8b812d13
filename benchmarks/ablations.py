"""MM1's ablations at shapes-world scale: encoder, connector and pre-training data.

    python -m benchmarks.ablations [--axis encoder|connector|data|all] [--seeds 0,1]
        [--budget standard] [--out benchmarks/results/ablations] [--work runs/ablations]
        [--summarize-only] [--readme README.md]

Each run is a reduced-budget MM1 recipe (``mm1_mlx.shapes.train``: stage-0 encoder training, then
pre-training on a caption / interleaved / text mix, no SFT: MM1's ablations score pre-trained
models), then scored on held-out scenes (drawn from ``--eval-seed``, a stream training never
uses) 0-, 4- and 8-shot as raw interleaved prompts (``mm1_mlx.shapes.fewshot``): captioning
(F1 of colour-shape pairs), short-answer questions (format shown only by the examples) and a
text-only task from the corpus. Every finished run writes its own JSON under ``WORK/results``
(atomically); a rerun skips those and resumes an interrupted one from its saved state (a finished
run scored at fewer shots than ``SHOTS`` is scored at the missing ones from its saved model).
Then each axis gets ``results.json`` (pooled means, 95% intervals, paired differences for the
paper's claims and a verdict computed from them) and a figure under ``--out``.

Sharing (fair by construction): MM1's ablations start from a pre-trained LLM; here (budget
``standard``) a text stage trains the decoder alone on the corpus's text-only samples once per
seed, and every run of the seed starts pre-training from that decoder. Stage 0 (the ViT and the
run's connector, trained with the slot heads, as the shipped recipe does) is trained once per
(encoder, connector, seed), and every run that differs from it only downstream (the data axis)
continues from that same state: within an axis runs differ only in the factor compared, and the
base run (96 px, width 128, C-Abstractor 16 tokens, 45/45/10) serves every axis it belongs to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mm1_mlx.cli import args as cli_args
from mm1_mlx.errors import MM1Error, cli_errors
from mm1_mlx.models.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from mm1_mlx.shapes import fewshot, world
from mm1_mlx.shapes.train import Recipe, build, load_state, train

SHOTS = (0, 4, 8)  # as MM1 reports its ablations; an 8-shot prompt holds 9 images
VQA_KINDS = ("color", "shape", "where")
EVAL_KINDS = ("caption",) + VQA_KINDS


@dataclass
class Budget:
    encoder_steps: int
    pretrain_steps: int
    batch_size: int
    encoder_batch_size: int
    eval_n: int  # held-out scenes (a caption and one short-answer question each)
    text_n: int
    learning_rate: float = 1e-3
    warmup: int = 20
    max_tokens: int = 20  # per caption (10-20 tokens); short answers get 6
    tokenizer_corpus: int = 300
    text_steps: int = 0  # a text-only decoder stage shared by a seed's runs (MM1's pre-trained LLM)


BUDGETS = {
    "smoke": Budget(encoder_steps=2, pretrain_steps=2, batch_size=2, encoder_batch_size=2,
                    eval_n=1, text_n=2, warmup=1, max_tokens=4, tokenizer_corpus=40),
    "small": Budget(encoder_steps=100, pretrain_steps=48, batch_size=8, encoder_batch_size=16,
                    eval_n=20, text_n=48),
    "medium": Budget(encoder_steps=400, pretrain_steps=500, batch_size=16, encoder_batch_size=32,
                     eval_n=100, text_n=200),
    # MM1's ablations start from a pre-trained LLM and image encoder: a shared text stage and a
    # shared stage 0 per seed, then a short multimodal pre-training per configuration
    "standard": Budget(encoder_steps=400, pretrain_steps=250, batch_size=16, encoder_batch_size=32,
                       eval_n=60, text_n=100, text_steps=300),
}


@dataclass(frozen=True)
class Spec:
    """One ablation model: its encoder (stage 0 shared by equal encoders), connector and mix."""

    image_size: int = 96
    vit_width: int = 128
    connector: str = "c-abstractor"
    tokens: int = 16
    mix: tuple = (0.45, 0.45, 0.10)  # interleaved, captions, text-only (Recipe's order)

    @property
    def name(self) -> str:
        mix = "-".join(f"{round(100 * m)}" for m in self.mix)
        return f"r{self.image_size}-w{self.vit_width}-{self.connector}{self.tokens}-mix{mix}"

    @property
    def encoder_name(self) -> str:
        """What stage 0 trains (ViT and connector): runs that differ only in data share it."""
        return f"r{self.image_size}-w{self.vit_width}-{self.connector}{self.tokens}"


BASE = Spec()
MIXES = {"45/45/10": (0.45, 0.45, 0.10), "caption-only": (0.0, 1.0, 0.0),  # the base run first
         "interleaved-only": (1.0, 0.0, 0.0), "text-heavy": (0.2, 0.2, 0.6)}
AXES = {  # cheapest first: the data and connector axes share one stage-0 encoder per seed
    "data": {label: Spec(mix=mix) for label, mix in MIXES.items()},
    "connector": {f"{c}, {t} tokens": Spec(connector=c, tokens=t)
                  for c in ("c-abstractor", "avg-pool", "attention-pool") for t in (4, 16)},
    "encoder": {f"{r}px, width {w}": Spec(image_size=r, vit_width=w)
                for r in (48, 96) for w in (64, 128)},
}


def model_config(spec: Spec) -> ModelConfig:
    """A smaller mm1-tiny (2-layer decoder of width 128) so one run takes minutes here."""
    return ModelConfig(
        vision_config=VisionConfig(hidden_size=spec.vit_width, intermediate_size=3 * spec.vit_width,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   image_size=spec.image_size, patch_size=12,
                                   hidden_act="quick_gelu", feature_layer=-2),
        connector_config=ConnectorConfig(type=spec.connector, num_image_tokens=spec.tokens,
                                         hidden_size=128, depth=1, mlp_depth=2, num_heads=4),
        text_config=TextConfig(vocab_size=640, hidden_size=128, intermediate_size=384,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=1024, tie_word_embeddings=True,
                               rope_theta=10000.0),
        name=f"ablation-{spec.name}")


def recipe(spec: Spec, budget: Budget, seed: int, pretrain: bool,
           decoder: Path | None = None) -> Recipe:
    r = Recipe(f"ablation-{spec.name}", model_config(spec),
               decoder_init=decoder and str(decoder),
               encoder_steps=budget.encoder_steps,
               pretrain_steps=budget.pretrain_steps if pretrain else 0, sft_steps=0,
               batch_size=budget.batch_size, learning_rate=budget.learning_rate,
               warmup=budget.warmup, mix=spec.mix, encoder_batch_size=budget.encoder_batch_size,
               seed=seed, tokenizer_corpus=budget.tokenizer_corpus)
    r.image.image_size = spec.image_size
    return r


# ---- runs ----
def write_json(path: Path, obj) -> None:
    """Written aside, then renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def text_run(budget: Budget, seed: int, work: Path, quiet: bool) -> Path | None:
    """The seed's text stage (the decoder alone on text-only samples), trained once and shared by
    every run of the seed as MM1's ablations share a pre-trained LLM; its decoder weights, or None
    for a budget without one."""
    if not budget.text_steps:
        return None
    run = work / "text" / f"s{seed}"
    weights = run / "decoder.safetensors"
    if weights.exists():
        return weights
    with claimed(work / "claims" / f"text-s{seed}", wait=True):
        if not weights.exists():
            r = recipe(BASE, budget, seed, pretrain=False)
            r.encoder_steps, r.text_steps = 0, budget.text_steps
            model, _, _ = train(r, run, save_every=100, quiet=quiet)
            tmp = run / f".decoder.{os.getpid()}.tmp.safetensors"
            mx.save_safetensors(str(tmp), dict(tree_flatten(model.language_model.parameters())))
            os.replace(tmp, weights)
    return weights


def encoder_run(spec: Spec, budget: Budget, seed: int, work: Path, quiet: bool) -> Path:
    """Stage 0 (ViT + this connector, slot heads) for this encoder and seed, trained once and
    shared by the runs that differ only downstream; its run directory."""
    base = Spec(image_size=spec.image_size, vit_width=spec.vit_width, connector=spec.connector,
                tokens=spec.tokens)
    run = work / "encoders" / f"{spec.encoder_name}-s{seed}"
    progress = run / "state" / "progress.json"
    done = progress.exists() and json.loads(progress.read_text()).get("step") == budget.encoder_steps
    if not done:
        with claimed(work / "claims" / f"encoder-{spec.encoder_name}-s{seed}", wait=True):
            train(recipe(base, budget, seed, pretrain=False), run, save_every=50, quiet=quiet)
    return run


@contextlib.contextmanager
def claimed(path: Path, wait: bool = False):
    """A claim file holding our pid, so that two sweeps on one --work share the runs; yields
    False while a live process holds it (``wait``: until it lets go)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)  # a claim left by a process that is gone
                continue
            if wait:
                time.sleep(5)
                continue
            yield False
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        break
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)


def seed_run(enc: Path, run: Path) -> None:
    """A run that starts where the shared stage 0 ended (as ``train`` resumes any run)."""
    if (run / "state" / "progress.json").exists():
        return
    import shutil

    run.mkdir(parents=True, exist_ok=True)
    for part in ("tokenizer", "state"):
        shutil.copytree(enc / part, run / part, dirs_exist_ok=True)


def run_one(spec: Spec, budget: Budget, seed: int, work: Path, eval_seed: str,
            quiet: bool) -> dict:
    """Train (or resume) and score one (spec, seed); cached in WORK/results."""
    out = work / "results" / f"{spec.name}-s{seed}.json"
    if out.exists():
        return add_shots(spec, budget, seed, work, out, quiet)
    t0 = time.perf_counter()
    decoder = text_run(budget, seed, work, quiet)
    enc = encoder_run(spec, budget, seed, work, quiet)
    run = work / "runs" / f"{spec.name}-s{seed}"
    seed_run(enc, run)
    model, processor, losses = train(recipe(spec, budget, seed, pretrain=True, decoder=decoder),
                                     run, save_every=50, quiet=quiet)
    t1 = time.perf_counter()
    result = {"spec": asdict(spec), "name": spec.name, "seed": seed, "budget": asdict(budget),
              "eval_seed": eval_seed, "final_loss": losses[-1][1] if losses else None,
              "train_seconds": round(t1 - t0, 1),
              **score(model, processor, budget, eval_seed, quiet)}
    result["eval_seconds"] = round(time.perf_counter() - t1, 1)
    write_json(out, result)
    return json.loads(out.read_text(encoding="utf-8"))


def lacking_shots(result: dict, budget: Budget) -> list[int]:
    """The shots in ``SHOTS`` a stored run of this budget lacks (none for another budget's run)."""
    if not same_budget(result["budget"], budget):
        return []
    return [k for k in SHOTS if str(k) not in result["per_scene"]]


def finished_model(spec: Spec, budget: Budget, seed: int, work: Path):
    """(model, processor) of a finished run, read from its saved state; MM1Error if unfinished."""
    run = work / "runs" / f"{spec.name}-s{seed}"
    if not (run / "state" / "progress.json").exists():
        raise MM1Error(f"{run}: no saved state to score more shots from (move its result out of "
                       f"{work / 'results'} to train it again)")
    model, processor, _ = build(recipe(spec, budget, seed, pretrain=True), run)
    stage, step, _, _ = load_state(run, model)
    if (stage, step) != ("pretrain", budget.pretrain_steps):
        raise MM1Error(f"{run}: saved at {stage} step {step}, not a finished run")
    model.eval()
    return model, processor


def add_shots(spec: Spec, budget: Budget, seed: int, work: Path, out: Path, quiet: bool) -> dict:
    """A finished run's result, scored first at the shots in ``SHOTS`` it lacks (from the run's
    saved model; the same scenes, examples and greedy decoding as its other scores)."""
    result = json.loads(out.read_text(encoding="utf-8"))
    todo = lacking_shots(result, budget)
    if not todo:
        return result
    t = time.perf_counter()
    model, processor = finished_model(spec, budget, seed, work)
    extra = score(model, processor, budget, result["eval_seed"], quiet, shots=todo, text=False)
    result["per_scene"].update(extra["per_scene"])
    result["sample_replies"].update(extra["sample_replies"])
    result["eval_seconds"] = round(result["eval_seconds"] + time.perf_counter() - t, 1)
    write_json(out, result)
    return result


# ---- scoring ----
def text_items(n: int, seed: str) -> list[tuple[str, str]]:
    """The corpus's text-only task held out: "Imagine a red star at the top. It is a star and
    its color is" -> "red"."""
    rng = random.Random(f"{seed}:text")
    out = []
    for _ in range(n):
        k, c, p = rng.choice(world.SHAPES), rng.choice(world.COLORS), rng.choice(world.POSITIONS)
        out.append((f"Imagine {world.article(c)} {c} {k} {world.WHERE[p]}. It is a {k} and its "
                    f"color is", c))
    return out


def score(model, processor, budget: Budget, eval_seed: str, quiet: bool, shots=None,
          text: bool = True) -> dict:
    """Per-scene scores at each K in ``shots``: the average of the scene's caption F1 and its
    short-answer accuracy (one question per scene, kinds in turn), as MM1 averages captioning
    and VQA; and (``text``) text-only accuracy."""
    scenes = fewshot.items(budget.eval_n, eval_seed, EVAL_KINDS)
    per = len(EVAL_KINDS)
    captions = scenes[::per]
    vqa = [scenes[i * per + 1 + i % len(VQA_KINDS)] for i in range(budget.eval_n)]
    pool = fewshot.items(64, fewshot.POOL_SEED, EVAL_KINDS)
    per_scene, replies = {}, {}
    for k in SHOTS if shots is None else shots:
        cap = fewshot.run_items(model, processor, captions, pool, k, chat=False,
                                max_tokens=budget.max_tokens, progress=not quiet)
        qa = fewshot.run_items(model, processor, vqa, pool, k, chat=False,
                               max_tokens=min(6, budget.max_tokens), progress=not quiet)
        c, q = [r["f1"] for r in cap], [r["exact"] for r in qa]
        per_scene[str(k)] = {"caption": c, "vqa": q, "average": [(a + b) / 2 for a, b in zip(c, q)]}
        replies[str(k)] = cap[:2] + qa[:3]
    out = {"per_scene": per_scene, "sample_replies": replies}
    if text:
        out["text"] = []
        for prompt, answer in text_items(budget.text_n, eval_seed):
            reply = fewshot.complete(model, processor, prompt, [], max_tokens=3)
            words = reply.strip().lower().split()
            out["text"].append(float(bool(words) and words[0].strip(".") == answer))
    return out


# ---- axes ----
def mean_ci(values, binary: bool) -> dict:
    return fewshot.summarize([{"v": float(v)} for v in values], "v", binary)


def paired_diff(a, b, seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean of a - b (percent points) over the same scenes and seeds, with a bootstrap 95% CI."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    lo, hi = fewshot.bootstrap(d, n_boot, seed)
    return {"diff": round(100 * float(d.mean()), 2), "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}


def verdict(d: dict, narrow: float = 5.0) -> str:
    """Predicted: a positive difference."""
    lo, hi = d["ci95"]
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced (the opposite)"
    return "not reproduced at this scale" if hi - lo <= 2 * narrow else "inconclusive"


def pooled(results: list[dict], metric: str, k: str | None = None) -> list[float]:
    """Per-scene values of every seed, in (seed, scene) order."""
    out = []
    for r in sorted(results, key=lambda r: r["seed"]):
        out += r["text"] if metric == "text" else r["per_scene"][k][metric]
    return out


def claims(axis: str, by: dict[str, list[dict]], shots: list[int]) -> list[dict]:
    """The paper's claims on this axis as paired differences (positive = as the paper says), at
    each of ``shots`` (the few-shot claims at each K > 0)."""
    def avg(label, k):
        return np.asarray(pooled(by[label], "average", k))

    def mean_over(labels, metric, k=None):
        return np.mean([pooled(by[lab], metric, k) for lab in labels], axis=0)

    out = []
    if axis == "encoder":
        for k in map(str, shots):
            hi_res = mean_over(["96px, width 64", "96px, width 128"], "average", k)
            lo_res = mean_over(["48px, width 64", "48px, width 128"], "average", k)
            wide = mean_over(["48px, width 128", "96px, width 128"], "average", k)
            narrow = mean_over(["48px, width 64", "96px, width 64"], "average", k)
            out.append({"claim": f"higher resolution scores higher ({k}-shot)",
                        **paired_diff(hi_res, lo_res)})
            out.append({"claim": f"a wider ViT scores higher ({k}-shot)",
                        **paired_diff(wide, narrow)})
            out.append({"claim": f"resolution matters more than ViT width ({k}-shot)",
                        **paired_diff(hi_res - lo_res, np.abs(wide - narrow))})
    elif axis == "connector":
        types = ("c-abstractor", "avg-pool", "attention-pool")
        for k in map(str, shots):
            more = mean_over([f"{t}, 16 tokens" for t in types], "average", k)
            few = mean_over([f"{t}, 4 tokens" for t in types], "average", k)
            out.append({"claim": f"16 image tokens score higher than 4 ({k}-shot)",
                        **paired_diff(more, few)})
            scores = {t: avg(f"{t}, 16 tokens", k) for t in types}
            spread = np.max(list(scores.values()), axis=0) - np.min(list(scores.values()), axis=0)
            out.append({"claim": f"token count matters more than connector type ({k}-shot)",
                        **paired_diff(more - few, spread)})
    elif axis == "data":
        out.append({"claim": "captions drive zero-shot: caption-only over interleaved-only, 0-shot",
                    **paired_diff(avg("caption-only", "0"), avg("interleaved-only", "0"))})
        for k in map(str, shots[1:]):
            out.append({"claim": f"interleaved data drives few-shot: interleaved-only over "
                                 f"caption-only, {k}-shot",
                        **paired_diff(avg("interleaved-only", k), avg("caption-only", k))})
        text = {lab: np.asarray(pooled(by[lab], "text")) for lab in by}
        out.append({"claim": "text-only data gives text-only ability: text-heavy over "
                             "caption-only, text task", **paired_diff(text["text-heavy"],
                                                                       text["caption-only"])})
        out.append({"claim": "text-only data gives text-only ability: 45/45/10 over "
                             "interleaved-only, text task", **paired_diff(text["45/45/10"],
                                                                           text["interleaved-only"])})
        for other in ("caption-only", "interleaved-only", "text-heavy"):
            bal = np.mean([avg("45/45/10", k) for k in map(str, shots)], axis=0)
            oth = np.mean([avg(other, k) for k in map(str, shots)], axis=0)
            n = min(len(bal), len(text["45/45/10"]))  # scenes and text items differ in count
            mix_all = np.concatenate([bal, text["45/45/10"][:n]])
            oth_all = np.concatenate([oth, text[other][:n]])
            out.append({"claim": f"45/45/10 balances: over {other} on 0-shot, few-shot and text "
                                 "together", **paired_diff(mix_all, oth_all)})
    for c in out:
        c["verdict"] = verdict(c)
    return out


def common_shots(by: dict[str, list[dict]]) -> list[int]:
    """The shots every run of the axis was scored at (a comparison pools only those)."""
    return [k for k in SHOTS
            if all(str(k) in r["per_scene"] for results in by.values() for r in results)]


def summarize_axis(axis: str, by: dict[str, list[dict]]) -> dict:
    configs, shots = {}, common_shots(by)
    for label, results in by.items():
        m = {f"{metric} {k}-shot": mean_ci(pooled(results, metric, k), metric == "vqa")
             for metric in ("average", "caption", "vqa") for k in map(str, shots)}
        m["text"] = mean_ci(pooled(results, "text"), True)
        m["average by seed"] = {str(r["seed"]): {k: round(100 * float(np.mean(
            r["per_scene"][k]["average"])), 2) for k in map(str, shots)} for r in results}
        configs[label] = {"spec": results[0]["spec"], "seeds": sorted(r["seed"] for r in results),
                          "metrics": m,
                          "train_seconds": [r["train_seconds"] for r in results],
                          "eval_seconds": [r.get("eval_seconds") for r in results]}
    complete = set(by) == set(AXES[axis])
    return {"axis": axis, "shots": shots, "configs": configs,
            "claims": claims(axis, by, shots) if complete else [],
            "missing": [label for label in AXES[axis] if label not in by],
            "budget": next(iter(by.values()))[0]["budget"],
            "eval_seed": next(iter(by.values()))[0]["eval_seed"],
            "intervals": "95%: Wilson for 0/1 scores, percentile bootstrap (2000) over scenes x "
                         "seeds otherwise; claims are paired differences on the same scenes"}


def markdown(summary: dict) -> str:
    """The axis as README tables: scores with intervals, then each claim and its verdict."""
    cols = [f"average {k}-shot" for k in summary.get("shots", (0, 4))] + ["text"]
    lines = [f"| {summary['axis']} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, c in summary["configs"].items():
        cells = [f"{c['metrics'][x]['mean']:.1f} [{c['metrics'][x]['ci95'][0]:.0f}, "
                 f"{c['metrics'][x]['ci95'][1]:.0f}]" for x in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if summary.get("missing"):
        return "\n".join(lines + ["", "Not finished (no claims until all are): "
                                   + ", ".join(summary["missing"])]) + "\n"
    lines += ["", "| claim | difference (points) [95% CI] | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['diff']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] | "
              f"{c['verdict']} |" for c in summary["claims"]]
    return "\n".join(lines) + "\n"


def plot_axis(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["configs"])
    metrics = [f"average {k}-shot" for k in summary.get("shots", (0, 4))] + ["text"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        m = summary["configs"][label]["metrics"]
        ys = [m[x]["mean"] for x in metrics]
        err = [[y - m[x]["ci95"][0] for x, y in zip(metrics, ys)],
               [m[x]["ci95"][1] - y for x, y in zip(metrics, ys)]]
        ax.bar(np.arange(len(metrics)) + i * width, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
    ax.set_xticklabels(metrics)
    ax.set_ylabel("score (%), 95% interval")
    seeds = sorted({s for c in summary["configs"].values() for s in c["seeds"]})
    ax.set_title(f"{summary['axis']} axis (seeds {seeds}, held-out scenes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# ---- the README's section, from results.json ----
PAPER = [  # (MM1's claim, its numbers (../shared/MM1.md's tables), our axis, our claims' prefix)
    ("image resolution matters most for the encoder",
     "ViT-L 224 -> 336 px: 0/4/8-shot 36.9/58.7/62.2 -> 39.9/62.4/66.0 (+3.0/+3.7/+3.8)",
     "encoder", ("higher resolution scores higher",)),
    ("encoder size matters less than resolution",
     "ViT-L -> ViT-H at 224 px: +0.6/+1.3/+1.4; at 336 px: +0.6/+0.2/+0.3",
     "encoder", ("a wider ViT scores higher", "resolution matters more than ViT width")),
    ("image-token count matters, connector type little",
     "144 > 64 tokens; average pooling, attention pooling and C-Abstractor about equal at 336 px "
     "/ 144 tokens", "connector",
     ("16 image tokens score higher than 4", "token count matters more than connector type")),
    ("captions drive zero-shot", "caption share 0% -> 100%: 0-shot 25.8 -> 39.3", "data",
     ("captions drive zero-shot",)),
    ("interleaved data drives few-shot", "interleaved share below 50%: 8-shot ~61 -> ~45", "data",
     ("interleaved data drives few-shot",)),
    ("text-only data gives text-only ability",
     "text-only data helps few-shot and text-only scores", "data",
     ("text-only data gives text-only ability",)),
    ("the 45/45/10 mix balances them", "best mix about 5:5:1 (caption : interleaved : text)",
     "data", ("45/45/10 balances",)),
]
README_BEGIN = (
    "<!-- ablations:begin: written by python -m benchmarks.ablations --readme from results.json -->")
README_END = "<!-- ablations:end -->"


def budget_name(stored: dict) -> str:
    """The name of a results.json's budget ("custom" for none of ``BUDGETS``)."""
    return next((n for n, b in BUDGETS.items() if same_budget(stored, b)), "custom")


def run_label(summary: dict) -> str:
    """"budget standard, seeds 0, 1": what an axis's results.json pooled."""
    name = budget_name(summary["budget"])
    seeds = sorted({s for c in summary["configs"].values() for s in c["seeds"]})
    return f"budget {name}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def readme_section(out: Path) -> str:
    """The claims table (the paper's numbers beside ours, with the verdicts) and each axis's tables,
    all read from ``out/<axis>/results.json``."""
    summaries = {axis: json.loads(p.read_text(encoding="utf-8")) for axis in AXES
                 if (p := out / axis / "results.json").exists()}
    lines = ["| MM1's claim | paper (MM1.md's tables) | ours: paired difference, points [95% CI] "
             "| verdict |", "|---|---|---|---|"]
    for claim, paper, axis, prefixes in PAPER:
        found = [c for c in summaries.get(axis, {}).get("claims", [])
                 if c["claim"].startswith(prefixes)]
        ours = "; ".join(f"{c['claim']}: {c['diff']:+.1f} [{c['ci95'][0]:+.1f}, "
                         f"{c['ci95'][1]:+.1f}]" for c in found)
        if found:
            ours = f"({run_label(summaries[axis])}) {ours}"
        verdicts = "; ".join(c["verdict"] for c in found)
        lines.append(f"| {claim} | {paper} | {ours or 'not run'} | {verdicts or '-'} |")
    for axis, summary in summaries.items():
        b, cfg = summary["budget"], summary["configs"]
        train_s = [t for c in cfg.values() for t in c["train_seconds"]]
        eval_s = [t for c in cfg.values() for t in c.get("eval_seconds", []) if t is not None]
        lines += ["", f"**{axis.capitalize()} axis** (`benchmarks/results/ablations/{axis}/`; "
                  f"{run_label(summary)}; pre-training {b['pretrain_steps']} steps of "
                  f"{b['batch_size']}; {b['eval_n']} held-out scenes and {b['text_n']} text items "
                  f"per run; training {min(train_s):.0f}-{max(train_s):.0f} s per run"
                  + (f", scoring {min(eval_s):.0f}-{max(eval_s):.0f} s" if eval_s else "")
                  + "):", "", markdown(summary).rstrip(), "", f"![{axis} axis]"
                  f"(benchmarks/results/ablations/{axis}/{axis}.png)"]
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, out: Path) -> None:
    """Replace the block between README_BEGIN and README_END (this tool's own) in ``readme``."""
    text = readme.read_text(encoding="utf-8")
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise MM1Error(f"{readme}: needs one {README_BEGIN!r} line and one {README_END!r} line")
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    tmp = readme.with_name(f".{readme.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{head}{README_BEGIN}\n{readme_section(out)}{README_END}{tail}",
                   encoding="utf-8")
    os.replace(tmp, readme)


# ---- command line ----
def axes_list(text: str) -> list[str]:
    axes = list(AXES) if text == "all" else text.split(",")
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(AXES)} or all")
    return axes


seeds_list = cli_args.int_list(0, distinct=True)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = cli_args.ArgumentParser(prog="python -m benchmarks.ablations",
                                description="MM1's ablations (encoder, connector, data) on shapes "
                                            "world, reduced budget, resumable.")
    p.add_argument("--axis", type=axes_list, default=list(AXES),
                   help=f"{', '.join(AXES)} or all (default), or a comma-separated list")
    p.add_argument("--seeds", type=seeds_list, default=[0], help="e.g. 0,1 (default 0)")
    p.add_argument("--budget", default="standard", choices=sorted(BUDGETS),
                   help="standard (default; the README's), or smoke, small, medium")
    p.add_argument("--out", default="benchmarks/results/ablations",
                   help="results.json and figures per axis")
    p.add_argument("--work", default="runs/ablations",
                   help="run states and per-run results (resumable)")
    p.add_argument("--eval-seed", default="ablation-heldout", type=cli_args.utf8_text,
                   help="seed of the held-out scenes (never a training stream)")
    p.add_argument("--summarize-only", action="store_true",
                   help="write results.json and figures from finished runs, train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--readme", default=None,
                   help="then rewrite this file's block between the ablations markers from the "
                        "results.json files under --out")
    return p


def same_budget(stored: dict, budget: Budget) -> bool:
    """Runs of another budget never mix into a comparison (fields added later at defaults)."""
    want = asdict(budget)
    return all(want.get(k) == v for k, v in stored.items()) and all(
        k in stored or v == getattr(Budget, k, None) for k, v in want.items())


def plan(axes: list[str], seeds: list[int]) -> list[tuple[Spec, int]]:
    """Distinct (spec, seed) runs, seed by seed (a first seed finishes every axis first)."""
    out = []
    for seed in seeds:
        for axis in axes:
            for spec in AXES[axis].values():
                if (spec, seed) not in out:
                    out.append((spec, seed))
    return out


@cli_errors
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    axes = args.axis
    budget, work, out = BUDGETS[args.budget], Path(args.work), Path(args.out)
    if work.resolve() == out.resolve():
        raise MM1Error("--work and --out must differ")
    todo = plan(axes, args.seeds)
    for i, (spec, seed) in enumerate(todo):
        head = f"[{i + 1}/{len(todo)}] {spec.name} seed {seed}:"
        stored = work / "results" / f"{spec.name}-s{seed}.json"
        lacking = stored.exists() and lacking_shots(
            json.loads(stored.read_text(encoding="utf-8")), budget)
        if args.summarize_only or (stored.exists() and not lacking):
            print(f"{head} {'done' if stored.exists() else 'not run'}", file=sys.stderr)
            continue
        with claimed(work / "claims" / f"{spec.name}-s{seed}") as mine:
            if not mine:
                print(f"{head} another sweep runs it", file=sys.stderr)
                continue
            what = (f"scoring {'/'.join(map(str, lacking))}-shot" if lacking else "training")
            print(f"{head} {what}", file=sys.stderr)
            r = run_one(spec, budget, seed, work, args.eval_seed, args.quiet)
        print(f"  {r['train_seconds']:.0f} s training, {r['eval_seconds']:.0f} s scoring",
              file=sys.stderr)
    for axis in axes:
        by = {}
        for label, spec in AXES[axis].items():
            found = [json.loads(p.read_text(encoding="utf-8")) for seed in args.seeds
                     if (p := work / "results" / f"{spec.name}-s{seed}.json").exists()]
            if found:
                by[label] = [r for r in found if same_budget(r["budget"], budget)]
        by = {label: rs for label, rs in by.items() if rs}
        if not by:
            print(f"{axis}: no run finished yet", file=sys.stderr)
            continue
        summary = summarize_axis(axis, by)
        if len(by) < len(AXES[axis]):
            print(f"{axis}: {len(by)} of {len(AXES[axis])} configurations finished; claims wait "
                  "for all of them", file=sys.stderr)
        write_json(out / axis / "results.json", summary)
        runs = out / axis / "runs" / args.budget  # a run's name and seed repeat across budgets
        for results in by.values():  # the per-run scores the summary pooled
            for r in results:
                write_json(runs / f"{r['name']}-s{r['seed']}.json", r)
        plot_axis(summary, out / axis / f"{axis}.png")
        md = out / axis / "results.md"
        md.with_name(".results.md.tmp").write_text(markdown(summary))
        os.replace(md.with_name(".results.md.tmp"), md)
        print(f"{axis}: {out / axis / 'results.json'}", file=sys.stderr)
    if args.readme:
        write_readme(Path(args.readme), out)
        print(f"{args.readme}: the ablations section rewritten from {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
