"""Fault injection for the resume tests: `ADVRETRAIN_KILL_AT=point[:k]` SIGKILLs the process at the k-th (default
first) time it reaches `point`, exactly as a crash or an out-of-memory kill would, with no cleanup.

Points: `after-<kind>` for every cached stage (`after-baseline`, `after-labeler`, `after-attack`, `after-retrain`,
`after-eval`, `after-threats`, `after-reference`, `after-fooling`, `after-sweep`, `after-cross`: a stage just finished),
`train-epoch`, `fit-epoch` (an epoch of a fitted attack such as GAP), `attack-shard`, `labeler-fit` (inside a long
stage) and `atomic-write` (a file written but not yet renamed into place). Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter[str] = Counter()


def kill_point(point: str) -> None:
    target = os.environ.get("ADVRETRAIN_KILL_AT")
    if not target:
        return
    name, _, count = target.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
