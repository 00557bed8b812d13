"""Redraw ``examples/shapes.png``: the README's example, a shapes-world scene drawn by the training
data's renderer (a red circle on the left, a blue star on the right, a yellow triangle at the top).

    python examples/draw_example.py
"""

import random
from pathlib import Path

from mm1_mlx.shapes import world


def main() -> None:
    shapes = [world.Shape("circle", "red", "left"), world.Shape("star", "blue", "right"),
              world.Shape("triangle", "yellow", "top")]
    shapes.sort(key=lambda s: world.POSITIONS.index(s.position))
    out = Path(__file__).with_name("shapes.png")
    world.render(random.Random(0), shapes, size=224).save(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
