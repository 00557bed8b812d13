"""The one language-modelling loss (LoRA training, its validation, shapes-world training)."""

import mlx.core as mx
import numpy as np

from mm1_mlx.tuner.losses import masked_ce


def test_masked_ce_counts_only_masked_next_tokens():
    rng = np.random.default_rng(0)
    ids = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 0]])
    mask = np.array([[1, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=bool)
    logits = rng.normal(size=(2, 4, 9)).astype(np.float32)  # outputs for ids[:, :-1]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -sum(logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if mask[b, t])
    ce, ntok = masked_ce(mx.array(logits), mx.array(ids), mx.array(mask))
    assert ntok.item() == 5  # the first token is never a target, masked or not
    np.testing.assert_allclose(ce.item(), want, rtol=1e-5)
    half, _ = masked_ce(mx.array(logits).astype(mx.bfloat16), mx.array(ids), mx.array(mask))
    np.testing.assert_allclose(half.item(), want, rtol=2e-2)  # bf16 logits, float32 loss
