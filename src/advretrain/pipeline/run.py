"""`advretrain.run`: the protocol on a config, in a run directory that one process owns at a time."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import DataConfig, ExperimentConfig, build_config
from ..data import ImageDataset, load_dataset
from ..errors import AdvretrainError
from ..report import write_report
from ..results import Results
from ..runtime.device import resolve_device
from ..runtime.distributed import init as init_distributed
from ..runtime.distributed import is_main, world_size
from ..runtime.io import write_json
from ..runtime.rundir import environment, record_config, run_lock
from .protocol import preflight, run_experiment

log = logging.getLogger("advretrain")

ConfigLike = str | os.PathLike[str] | Mapping[str, Any] | ExperimentConfig


def load_split(cfg: DataConfig, split: str) -> ImageDataset:
    """A split of the configured dataset, with the configured stratified subset applied."""
    data = load_dataset(cfg.dataset, split, cfg.root, cfg.image_size)
    per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
    return data.stratified(per_class) if per_class else data


def resolve_config(config: ConfigLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A config object from a path, a shipped config's name, a dict or a config object, with overrides applied."""
    if isinstance(config, ExperimentConfig):
        return build_config(ExperimentConfig, None, overrides, base=config.model_dump(mode="json"))
    if isinstance(config, Mapping):
        return build_config(ExperimentConfig, None, overrides, base=dict(config))
    return build_config(ExperimentConfig, config, overrides)


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Rank 0 logs to `run.log` in the run directory (the other ranks only warn, on the console)."""
    if not is_main():
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    handler = logging.FileHandler(run_dir / "run.log") if is_main() else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run(
    config: ConfigLike, out: str | os.PathLike[str], overrides: Sequence[str] = (), progress: bool = False
) -> Results:
    """Run or resume the protocol in `out` and return its typed results (also written as results.json + tables).

    Example: `advretrain.run("default", "runs/demo", ["train.epochs=2"])`.
    """
    cfg = resolve_config(config, overrides)
    dev = init_distributed(resolve_device(cfg.device))  # under torchrun: join the group, this rank's device
    # the data read and the config checked against it first: a refused run writes nothing
    train_set, test_set = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    preflight(cfg, train_set)
    run_dir = Path(out)
    main_rank = is_main()  # rank 0 alone locks, logs to the file and writes the shared files
    with run_lock(run_dir) if main_rank else contextlib.nullcontext():
        if main_rank:
            record_config(run_dir, cfg)
        with run_log(run_dir):
            if main_rank:
                write_json(run_dir / "environment.json", environment(dev) | {"processes": world_size()})
            log.info("run %s: %s on %s → %s", config_name(config), cfg.model.name, train_set.source, run_dir)
            results = run_experiment(cfg, run_dir, train_set, test_set, progress=progress)
            if main_rank:
                write_json(run_dir / "results.json", results.to_dict())
                write_report(run_dir)
    return results


def config_name(config: ConfigLike) -> str:
    return str(config) if isinstance(config, str | os.PathLike) else "(given config)"


def require_out(out: str | None) -> None:
    if not out and world_size() > 1:
        raise AdvretrainError("under torchrun every rank must write to the same folder; pass --out")
