"""Batches for training: right-padded ids with their loss masks (and the images of fine-tuning
samples), built ahead in a thread."""

from __future__ import annotations

import queue
import threading

import numpy as np

from . import datasets


def collate(samples: list[tuple[list, list]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss mask) pairs -> right-padded (B, L) int32 ids and bool mask."""
    L = max(len(i) for i, _ in samples)
    ids = np.full((len(samples), L), pad, dtype=np.int32)
    mask = np.zeros((len(samples), L), dtype=bool)
    for b, (i, m) in enumerate(samples):
        ids[b, : len(i)] = i
        mask[b, : len(m)] = m
    return ids, mask


def prefetch(fn, steps, depth: int = 3):
    """Build batches in a background thread (image drawing overlaps the training step)."""
    q: queue.Queue = queue.Queue(depth)

    def work():
        try:
            for s in steps:
                q.put((s, fn(s)))
        except BaseException as e:  # hand the error to the consumer instead of hanging it
            q.put(e)
        q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def encoded_batch(items: list, processor, seeds: list[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Encoded samples (``datasets.Encoded``) -> padded ids, loss mask and their images' pixels
    (with ``seeds``, one per sample: random variations of the images, see ``augment``)."""
    ids, mask = collate([(e.ids, e.mask) for e in items], processor.tokenizer.pad_token_id)
    return ids, mask, datasets.prepare_pixels(items, processor, seeds)
