"""Training curves with the reference's two x axes: epochs below, examples (or tokens) seen above."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fileio import atomic_file


def plot_values(
    num_epochs: float,
    total_seen: int,
    train_values: Sequence[float],
    val_values: Sequence[float],
    out_dir: str | Path,
    label: str = "loss",
    seen_label: str = "Examples seen",
) -> list[Path]:
    """Save `{label}-plot.pdf` and `{label}-plot.png` in out_dir (spaces in the name as dashes:
    `reward-margin-plot.png`); returns the paths.

    Points are spread evenly over 0..num_epochs (and 0..total_seen), as the reference's
    `torch.linspace` does.
    """
    n = len(train_values)
    epochs = np.linspace(0, num_epochs, n)
    seen = np.linspace(0, total_seen, n)
    fig = new_figure(figsize=(5, 3))
    ax1 = fig.subplots()
    ax1.plot(epochs, train_values, label=f"Training {label}")
    ax1.plot(epochs, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # second x axis sharing the y axis
    ax2.plot(seen, train_values, alpha=0)  # invisible: aligns the ticks
    ax2.set_xlabel(seen_label)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out_dir / f"{label.replace(' ', '-')}-plot")


def new_figure(**options: Any) -> Any:
    """A matplotlib Figure of its own, outside pyplot: drawing files never switches the caller's
    backend (a notebook's plots keep showing) nor leaves a figure open in pyplot's registry."""
    from matplotlib.figure import Figure

    return Figure(**options)


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """`stem`.pdf and `stem`.png, each written atomically (a crash never leaves a truncated plot)."""
    paths = [stem.with_name(stem.name + ".pdf"), stem.with_name(stem.name + ".png")]
    for path in paths:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:], dpi=150 if path.suffix == ".png" else None)
    return paths
