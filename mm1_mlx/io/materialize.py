"""Reading a lazily loaded model's weights layer by layer, with a progress bar for large ones."""

from __future__ import annotations

import mlx.core as mx

PROGRESS_BYTES = 1 << 30  # a checkpoint this large takes seconds to read: show a progress bar


def materialize(model, cpu: bool, progress: bool, nbytes: int, desc: str = "loading"
                ) -> None:
    """Read the weights one decoder layer at a time (on the CPU packing each, see
    ``cpu.step.pack_layer``), with a bar on stderr when ``progress`` and the checkpoint holds at
    least ``PROGRESS_BYTES``."""
    from tqdm import tqdm

    from ..cpu.step import pack_layer

    mx.eval(model.vision_tower.parameters(), model.connector.parameters())
    layers = model.language_model.layers
    with tqdm(total=len(layers), desc=desc, unit="layer", dynamic_ncols=True,
              disable=not progress or nbytes < PROGRESS_BYTES) as bar:
        for layer in layers:
            if cpu:
                pack_layer(layer)
            mx.eval(layer.parameters())
            bar.update()
    mx.eval(model.parameters())
