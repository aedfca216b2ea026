"""Experiment tracking (optional, `tracking: tensorboard`): every training's curves, each attack's summary and the
final results, as TensorBoard event files under the run directory, one run per stage, named like the stage.

    tensorboard --logdir RUN_DIR/tensorboard

Off by default; without the `tensorboard` package, asking for it is a one-line error with the install command.
Only rank 0 writes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .runtime.distributed import is_main

Tracking = Literal["none", "tensorboard"]


class Tracker:
    """Writes nothing: what a run without tracking gets, and the interface of the others."""

    def epoch(self, stage: str, record: dict[str, float]) -> None:
        """One training epoch's record (loss, accuracy, lr, ...) of the training in `stage`."""

    def summary(self, stage: str, metrics: dict[str, float]) -> None:
        """A stage's final numbers (an attack's metrics, the run's results)."""

    def close(self) -> None:
        """Flush everything to disk."""


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "tracking: tensorboard needs the tensorboard package; pip install 'advretrain[tracking]'"
            ) from exc
        self.folder, self.writer_class = folder, SummaryWriter
        self.writers: dict[str, Any] = {}

    def _writer(self, stage: str) -> Any:
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", stage).strip("-") or "run"  # "retrain gap N=400" → a folder
        if name not in self.writers:
            self.writers[name] = self.writer_class(log_dir=str(self.folder / name))
        return self.writers[name]

    def epoch(self, stage: str, record: dict[str, float]) -> None:
        writer, step = self._writer(stage), int(record["epoch"])
        for key, value in record.items():
            if key != "epoch":
                writer.add_scalar(f"train/{key}", float(value), step)

    def summary(self, stage: str, metrics: dict[str, float]) -> None:
        writer = self._writer(stage)
        for key, value in metrics.items():
            writer.add_scalar(f"summary/{key}", float(value), 0)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def open_tracker(kind: str, run_dir: Path) -> Tracker:
    """The tracker a config asks for, writing under `run_dir` (rank 0 only; the other ranks get a silent one)."""
    if kind == "none" or not is_main():
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard")
    raise ConfigError(f"tracking {kind!r} is not one of none, tensorboard; fix the value")
