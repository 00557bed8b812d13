"""Loss curves as a PNG: the LoRA trainer's train / validation losses, the shapes-world trainer's
per-stage losses. matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from pathlib import Path


def plot_losses(curves: dict[str, list], path: Path, title: str,
                styles: dict[str, dict] | None = None) -> None:
    """Draw ``curves`` (label -> [(step, loss)], empty ones left out) on a log scale into the PNG
    ``path``; ``styles`` gives each label's matplotlib line options. The caller makes the write
    atomic (the LoRA trainer writes into a save's temporary directory, which is swapped in whole)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            x, y = zip(*points)
            ax.plot(x, y, label=label, **(styles or {}).get(label, {}))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
