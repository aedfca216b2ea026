"""What every report section shares: Markdown tables, threat-model cells and reproducible PNG figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import paper
from .results import AttackResults, Metrics, Results
from .runtime.io import atomic_path


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def in_table_order(results: Results, fam: str) -> list[tuple[str, AttackResults]]:
    """The paper's tables by number, then every other attack in the run's order."""
    unnumbered = len(paper.TABLE_NUMBERS) + 1
    return sorted(results.attacks.items(), key=lambda item: paper.table_number(item[0], fam) or unnumbered)


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


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
