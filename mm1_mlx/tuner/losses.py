"""The language-modelling loss: cross-entropy of each next token where the loss mask holds.

The LoRA trainer, its validation and the shapes-world trainer all use it; the mask leaves out
image tokens, padding and (with ``--mask-prompt``) the prompt.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def masked_ce(logits: mx.array, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(summed cross-entropy, number of loss tokens) of predicting ``ids[:, 1:]`` from ``logits``,
    the model's output for ``ids[:, :-1]``; ``mask`` (B, L) marks the tokens that count."""
    targets, m = ids[:, 1:], mask[:, 1:]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * m  # in float32 even for a bf16 model
    return ce.sum(), m.sum()
