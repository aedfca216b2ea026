"""The protocol as cached stages (stages.py), composed into protocols (protocol.py), with typed results
(results.py); `run` (run.py) owns the run directory."""

from ..results import SCHEMA_VERSION, ArmsRound, AttackResults, Results, RetrainRow
from .protocol import run_experiment
from .run import load_split, resolve_config, run
from .stages import Trained, cached_stage

__all__ = [
    "SCHEMA_VERSION",
    "ArmsRound",
    "AttackResults",
    "Results",
    "RetrainRow",
    "Trained",
    "cached_stage",
    "load_split",
    "resolve_config",
    "run",
    "run_experiment",
]
