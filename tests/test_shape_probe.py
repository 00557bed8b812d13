"""benchmarks/shape_probe.py: the cross-validated ridge probe (separable data scores high, random
labels near chance, the strength chosen off the scored fold), its flags, and a small real run."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import shape_probe as sp


def test_probe_scores_separable_data_high_and_random_labels_at_chance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 30))
    y = (x[:, :5].sum(1) > 0).astype(int)  # a linear rule on 5 of 30 features
    assert sp.cross_validate(x, y) >= 0.9
    shuffled = rng.permutation(y)
    assert 0.3 <= sp.cross_validate(x, shuffled) <= 0.7


def test_the_strength_is_chosen_without_the_scored_fold(monkeypatch):
    seen = []
    real = sp.fold_score

    def recording(x, y, test, lam):
        seen.append(len(y))
        return real(x, y, test, lam)

    monkeypatch.setattr(sp, "fold_score", recording)
    rng = np.random.default_rng(1)
    sp.cross_validate(rng.standard_normal((50, 8)), np.arange(50) % 2)
    # inner searches see the 40 training rows only; each outer fold is scored once on all 50
    assert seen.count(50) == 5 and set(seen) == {40, 50}


@pytest.mark.parametrize("pairs", ["circle", "circle:circle", "circle:blob", "a:b:c"])
def test_bad_pairs_are_one_line(pairs, capsys):
    with pytest.raises(SystemExit) as e:
        sp.main(["--pairs", pairs])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--pairs" in err[0]


def test_a_small_probe_of_mm1_tiny(capsys):
    result = sp.main(["--n", "20", "--pairs", "circle:star"])
    accs = result["circle:star"]
    assert set(accs) == {"ViT patches, max", "ViT patches, mean", "image tokens, max",
                         "image tokens, mean"}
    assert all(0 <= v <= 100 for v in accs.values())
    assert "| circle:star |" in capsys.readouterr().out
