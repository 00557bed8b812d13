"""benchmarks/ablations.py: a tiny-budget run that resumes (a second call trains nothing), the
axis summary (results.json, figure, claims with paired intervals and verdicts), and its flags."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from benchmarks import ablations as ab


def test_smoke_run_is_cached_and_resumable(tmp_path, monkeypatch):
    budget = ab.BUDGETS["smoke"]
    spec = ab.Spec(connector="avg-pool", tokens=4, mix=(0.5, 0.5, 0.0))
    first = ab.run_one(spec, budget, 0, tmp_path, "test-heldout", quiet=True)
    path = tmp_path / "results" / f"{spec.name}-s0.json"
    assert json.loads(path.read_text()) == first
    assert len(first["per_scene"]["4"]["caption"]) == budget.eval_n
    assert len(first["text"]) == budget.text_n
    assert all(0.0 <= v <= 1.0 for k in map(str, ab.SHOTS) for v in first["per_scene"][k]["average"])
    assert (tmp_path / "encoders" / f"{spec.encoder_name}-s0" / "state" / "progress.json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ab, "train", no_training)
    assert ab.run_one(spec, budget, 0, tmp_path, "test-heldout", quiet=True) == first


def test_a_finished_run_is_scored_at_the_shots_it_lacks(tmp_path, monkeypatch):
    budget = ab.BUDGETS["smoke"]
    spec = ab.Spec(connector="avg-pool", tokens=4, mix=(0.5, 0.5, 0.0))
    monkeypatch.setattr(ab, "SHOTS", (0, 4))
    first = ab.run_one(spec, budget, 0, tmp_path, "test-heldout", quiet=True)
    assert set(first["per_scene"]) == {"0", "4"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ab, "train", no_training)
    monkeypatch.setattr(ab, "SHOTS", (0, 4, 8))
    more = ab.run_one(spec, budget, 0, tmp_path, "test-heldout", quiet=True)
    assert set(more["per_scene"]) == {"0", "4", "8"}
    assert len(more["per_scene"]["8"]["average"]) == budget.eval_n
    for k in ("0", "4"):  # the scores it had are kept as they were
        assert more["per_scene"][k] == first["per_scene"][k]
    assert more["text"] == first["text"] and more["eval_seconds"] >= first["eval_seconds"]
    path = tmp_path / "results" / f"{spec.name}-s0.json"
    assert json.loads(path.read_text()) == more
    # the 8-shot scores are what a fresh scoring of the same saved model gives
    model, processor = ab.finished_model(spec, budget, 0, tmp_path)
    again = ab.score(model, processor, budget, "test-heldout", True, shots=[8], text=False)
    assert again["per_scene"]["8"] == more["per_scene"]["8"]
    # a result whose run is gone cannot gain shots: one clear error, the result untouched
    monkeypatch.setattr(ab, "SHOTS", (0, 2, 4, 8))
    import shutil

    shutil.rmtree(tmp_path / "runs" / f"{spec.name}-s0")
    with pytest.raises(ab.MM1Error, match="no saved state"):
        ab.run_one(spec, budget, 0, tmp_path, "test-heldout", quiet=True)
    assert json.loads(path.read_text()) == more


def test_an_axis_pools_the_shots_every_run_has(monkeypatch):
    by = {label: [fake_result(spec, s, 0.4, 0.5) for s in (0, 1)]
          for label, spec in ab.AXES["data"].items()}
    del by["caption-only"][1]["per_scene"]["8"]  # one run scored before 8-shot
    summary = ab.summarize_axis("data", by)
    assert summary["shots"] == [0, 4]
    assert "average 8-shot" not in summary["configs"]["45/45/10"]["metrics"]
    assert not any("8-shot" in c["claim"] for c in summary["claims"])
    assert "| average 0-shot | average 4-shot | text |" in ab.markdown(summary)
    full = ab.summarize_axis("data", {label: [fake_result(spec, 0, 0.4, 0.5)]
                                      for label, spec in ab.AXES["data"].items()})
    assert full["shots"] == [0, 4, 8]
    assert [c["claim"] for c in full["claims"] if "few-shot" in c["claim"]][:2] == [
        "interleaved data drives few-shot: interleaved-only over caption-only, 4-shot",
        "interleaved data drives few-shot: interleaved-only over caption-only, 8-shot"]


def test_a_seeds_runs_share_one_text_stage(tmp_path, monkeypatch):
    budget = replace(ab.BUDGETS["smoke"], text_steps=2)
    seen, real_train = [], ab.train

    def recording(recipe, run, **kwargs):
        seen.append((recipe.text_steps, recipe.pretrain_steps, recipe.decoder_init))
        return real_train(recipe, run, **kwargs)

    monkeypatch.setattr(ab, "train", recording)
    a, b = ab.Spec(connector="avg-pool", tokens=4), ab.Spec(connector="avg-pool", tokens=4,
                                                             mix=(0.0, 1.0, 0.0))
    ab.run_one(a, budget, 0, tmp_path, "test-heldout", quiet=True)
    decoder = tmp_path / "text" / "s0" / "decoder.safetensors"
    before = decoder.read_bytes()
    ab.run_one(b, budget, 0, tmp_path, "test-heldout", quiet=True)
    assert decoder.read_bytes() == before
    assert [s for s in seen if s[0]] == [(2, 0, None)]  # one text stage for the seed
    starts = [d for t, p, d in seen if p]  # both pre-trainings start from its decoder
    assert starts == [str(decoder)] * 2
    # and the decoder it saved is the text stage's own
    import mlx.core as mx

    text_state = mx.load(str(tmp_path / "text" / "s0" / "state" / "model.safetensors"))
    for k, v in mx.load(str(decoder)).items():
        assert mx.array_equal(v, text_state[f"language_model.{k}"]).item(), k


def fake_result(spec: ab.Spec, seed: int, level: float, text: float, n: int = 30) -> dict:
    rng = random.Random(f"{spec.name}:{seed}")
    per_scene = {k: {m: [min(1.0, max(0.0, level + rng.uniform(-0.1, 0.1))) for _ in range(n)]
                     for m in ("caption", "vqa", "average")} for k in map(str, ab.SHOTS)}
    return {"spec": {}, "name": spec.name, "seed": seed, "budget": ab.asdict(ab.BUDGETS["smoke"]),
            "eval_seed": "x", "train_seconds": 1.0, "per_scene": per_scene,
            "text": [float(rng.random() < text) for _ in range(n)]}


def test_data_axis_summary_from_finished_runs(tmp_path, capsys):
    levels = {"caption-only": (0.2, 0.0), "interleaved-only": (0.6, 0.0),
              "text-heavy": (0.4, 0.9), "45/45/10": (0.6, 0.6)}
    by = {label: [fake_result(ab.AXES["data"][label], s, *levels[label]) for s in (0, 1)]
          for label in levels}
    summary = ab.summarize_axis("data", by)
    claims = {c["claim"]: c for c in summary["claims"]}
    zero = claims["captions drive zero-shot: caption-only over interleaved-only, 0-shot"]
    assert zero["diff"] == pytest.approx(-40, abs=3) and zero["verdict"].startswith("not reproduced")
    text = claims["text-only data gives text-only ability: text-heavy over caption-only, text task"]
    assert text["ci95"][0] > 0 and text["verdict"] == "reproduced"
    m = summary["configs"]["45/45/10"]["metrics"]["average 4-shot"]
    assert m["n"] == 60 and m["ci95"][0] < m["mean"] < m["ci95"][1]
    ab.plot_axis(summary, tmp_path / "data.png")
    assert (tmp_path / "data.png").stat().st_size > 1000


def test_summarize_only_writes_results_and_figure(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    for spec in ab.AXES["data"].values():
        r = fake_result(spec, 0, 0.5, 0.5)
        r["budget"] = ab.asdict(ab.BUDGETS["smoke"])
        ab.write_json(work / "results" / f"{spec.name}-s0.json", r)
    ab.main(["--axis", "data", "--budget", "smoke", "--work", str(work), "--out", str(out),
             "--quiet"])  # every run is finished: nothing trains
    assert capsys.readouterr().err.count(": done") == 4
    summary = json.loads((out / "data" / "results.json").read_text())
    assert set(summary["configs"]) == set(ab.AXES["data"])
    assert (out / "data" / "data.png").exists()
    assert "| 45/45/10 |" in (out / "data" / "results.md").read_text()


def test_readme_section_is_rewritten_from_results_json(tmp_path, capsys):
    work, out, readme = tmp_path / "work", tmp_path / "out", tmp_path / "README.md"
    for label, spec in ab.AXES["data"].items():
        level = 0.7 if label == "caption-only" else 0.3
        ab.write_json(work / "results" / f"{spec.name}-s0.json", fake_result(spec, 0, level, 0.5))
    readme.write_text(f"# mine\nkept\n{ab.README_BEGIN}\nold numbers\n{ab.README_END}\nkept too\n")
    ab.main(["--axis", "data", "--budget", "smoke", "--work", str(work), "--out", str(out),
             "--quiet", "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# mine\nkept\n") and text.endswith("kept too\n")
    assert "old numbers" not in text
    summary = json.loads((out / "data" / "results.json").read_text())
    zero = next(c for c in summary["claims"] if c["claim"].startswith("captions drive zero-shot"))
    assert zero["diff"] > 30 and zero["verdict"] == "reproduced"
    row = next(line for line in text.splitlines() if line.startswith("| captions drive zero-shot"))
    assert f"{zero['diff']:+.1f} [{zero['ci95'][0]:+.1f}, {zero['ci95'][1]:+.1f}]" in row
    assert row.endswith("| reproduced |")
    assert "| image resolution matters most for the encoder |" in text  # an axis not run here
    m = summary["configs"]["caption-only"]["metrics"]["average 0-shot"]
    assert f"| caption-only | {m['mean']:.1f} [" in text
    # the per-run scores it pooled travel with results.json, under their budget's name (a run's
    # name and seed repeat across budgets)
    assert len(list((out / "data" / "runs" / "smoke").glob("*.json"))) == 4
    assert not list((out / "data" / "runs").glob("*.json"))
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit) as e:
        ab.main(["--axis", "data", "--budget", "smoke", "--work", str(work), "--out", str(out),
                 "--quiet", "--readme", str(readme)])
    assert e.value.code == 2 and readme.read_text() == "no markers\n"


def test_verdicts():
    assert ab.verdict({"ci95": [0.5, 4.0]}) == "reproduced"
    assert ab.verdict({"ci95": [-6.0, -1.0]}) == "not reproduced (the opposite)"
    assert ab.verdict({"ci95": [-2.0, 3.0]}) == "not reproduced at this scale"
    assert ab.verdict({"ci95": [-15.0, 12.0]}) == "inconclusive"


@pytest.mark.parametrize("flags", [["--seeds", "a"], ["--seeds", "1,1"], ["--budget", "huge"],
                                   ["--axis", "decoder"], ["--work", "x", "--out", "x"]])
def test_bad_flags_are_one_line(flags, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        ab.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
