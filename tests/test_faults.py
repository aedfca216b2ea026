"""Fault injection on the `default` protocol (shrunk): a run SIGKILLed at every stage boundary and inside every
long stage resumes, never redoes a finished stage, and ends with results byte-identical to an uninterrupted run's.
An interrupted write leaves the previous file intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tiny_run import TINY, advretrain, finish, untimed

# In the order the protocol reaches them, each hit by a fresh process resuming the last one's run directory.
KILLS = [
    ("train-epoch:1", "inside the baseline's training"),
    ("after-baseline", "the baseline finished"),
    ("labeler-fit", "inside the labeler's fit"),
    ("after-labeler", "the labeler saved"),
    ("fit-epoch:1", "inside GAP's fit"),
    ("attack-shard:1", "inside attack generation (a shard written, the set unfinished)"),
    ("after-attack", "an attack's pool and test set finished"),
    ("train-epoch:2", "inside a retraining"),
    ("after-retrain", "a retraining finished"),
    ("after-eval", "an evaluation finished"),
    ("attack-shard:2", "inside DeepFool's generation (a pool shard written, the set unfinished)"),
    ("atomic-write:5", "an artifact written but not yet renamed into place"),
    ("after-reference", "the reference defence trained"),
    ("after-fooling", "the fooling-image experiment finished"),
    ("after-cross", "a cross-attack row finished"),
]


def stages_done(run_dir: Path) -> set[str]:
    return {p.parent.name for p in (run_dir / "stages").glob("*/done.json")}


def test_killed_at_every_stage_boundary_and_inside_long_stages_resumes_to_identical_results(
    finished_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "r"
    for point, where in KILLS:
        done_before = stages_done(run_dir) if (run_dir / "stages").exists() else set()
        proc = advretrain("run", "--out", str(run_dir), *TINY, kill_at=point)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"{point} ({where}) was never reached: {err}"
        assert done_before <= stages_done(run_dir)  # nothing finished was lost
        log = (run_dir / "run.log").read_text().split("run default:")[-1]
        for stage in done_before:  # ...nor redone: the resumed process said it reused each finished stage
            assert f"reused {run_dir / 'stages' / stage}" in log, (point, stage)
    assert not (run_dir / "results.json").exists()
    finish(advretrain("run", "--out", str(run_dir), *TINY))
    log = (run_dir / "run.log").read_text()
    assert "resuming training from the checkpoint of epoch" in log
    assert untimed(run_dir) == untimed(finished_run)  # results.json and tables.md, but for measured seconds


def test_same_config_and_seed_give_byte_identical_results(finished_run: Path, tmp_path: Path) -> None:
    finish(advretrain("run", "--out", str(tmp_path / "again"), *TINY))
    assert untimed(tmp_path / "again") == untimed(finished_run)
    assert json.loads((tmp_path / "again" / "timings.json").read_text())  # wall times live apart from results


def test_interrupted_write_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text('{"old": true}\n')
    code = f"from advretrain.runtime.io import write_json; write_json({str(target)!r}, {{'new': True}})"
    env_run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ADVRETRAIN_KILL_AT": "atomic-write"},
        capture_output=True,
        timeout=120,
    )
    assert env_run.returncode == -signal.SIGKILL
    assert target.read_text() == '{"old": true}\n'  # the new content never replaced it half-written
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert json.loads(target.read_text()) == {"new": True}
