"""The `default` protocol shrunk to seconds, run as a user runs it: `python -m advretrain run` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

TINY = [
    "data.train_per_class=20",
    "train.epochs=3",
    "train.batch_size=32",
    "test_images=20",
    "labeler.pca_dims=20",
    "retrain.sizes={gap: [20, 10], fgsm: [20, 10], deepfool: [20], cw: [20]}",
    "attack.cw.steps=5",
    "attack.cw.binary_search_steps=2",
    "attack.deepfool.steps=5",
    "attack.gap.epochs=1",
    "attack.gap.holdout=40",
    "attack.pgd.steps=2",
    "attack.square.max_queries=100",
    "attack.autoattack={steps: 10, queries: 100}",
    "threats.budgets=[0.07]",
    "fooling.per_class=4",
    "fooling.steps=20",
    "sweep.pca_dims=[5, 20, full]",
    "figure_images=4",
    "device=cpu",
]


def advretrain(*args: str, kill_at: str | None = None) -> subprocess.Popen[str]:
    """`advretrain -q ARGS`; with `kill_at`, the process SIGKILLs itself there (advretrain.runtime.faults)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: bitwise-reproducible and no oversubscription
    # the tests' folder importable, so that an import path such as `test_extensions:RandomSigns` resolves
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH")) if p)
    env.pop("ADVRETRAIN_KILL_AT", None)
    if kill_at:
        env["ADVRETRAIN_KILL_AT"] = kill_at
    return subprocess.Popen(
        [sys.executable, "-m", "advretrain", "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def untimed(run_dir: Path) -> tuple[dict[str, Any], str]:
    """results.json and tables.md with the PCA sweep's measured seconds masked: the only numbers no two runs share
    (each is checked to be a duration first)."""
    record: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    for row in record["evaluation"]["sweep"]:
        assert row.pop("fit_seconds") >= 0 and row.pop("label_seconds") >= 0
    head, sweep, tail = re.split(
        r"(?=^## PCA dimensions)|(?=^## Cross-attack)", (run_dir / "tables.md").read_text(), flags=re.M
    )
    sweep = re.sub(r"\| \d+\.\d\d \| \d+\.\d\d \|$", "| s | s |", sweep, flags=re.M)
    sweep = re.sub(r"\d+\.\d s\b", "s", sweep)
    return record, head + sweep + tail
