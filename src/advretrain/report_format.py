"""What every report section shares: Markdown tables, threat-model cells and reproducible PNG figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .results import Metrics
from .runtime.io import atomic_path


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def fr_acc(metrics: Metrics | None) -> str:
    """A threat-model cell: fooling ratio / accuracy under attack, in %."""
    if metrics is None:
        return "—"
    return f"{100 * metrics['fooling_ratio']:.1f} / {100 * metrics['adversarial_accuracy']:.1f}"


def pyplot() -> Any:
    """matplotlib's pyplot, imported on first use (~0.8 s: every command would pay it) and drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})  # no version stamp: reproducible
    pyplot().close(fig)
