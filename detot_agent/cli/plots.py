"""Matplotlib figures written as PNG next to the JSON they illustrate (headless, Agg backend).

Example:
    >>> import tempfile, pathlib
    >>> from detot_agent.cli.plots import plot_loss
    >>> p = plot_loss([3.0, 2.0, 1.5], [(2, 2.2)], pathlib.Path(tempfile.mkdtemp()) / "loss.png", title="demo")
    >>> p.suffix
    '.png'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_loss"]


def plot_loss(train: Sequence[float], val: Sequence[tuple[int, float]], path: Path, *, title: str,
              best_step: int | None = None, initial_val: float | None = None) -> Path:
    """Training loss per step and validation loss at its evaluation steps (and before training, at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(range(1, len(train) + 1), train, color="#9ab", lw=1, label="train (with dropout)")
    points = ([(0, initial_val)] if initial_val is not None else []) + list(val)
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], "o-", color="#c33", lw=1.5, label="validation")
    if best_step:
        ax.axvline(best_step, color="#555", ls="--", lw=1, label=f"best step {best_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL of target tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
