"""The run directory's bookkeeping: one writer at a time, the config it was made with, the environment."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from ..errors import AdvretrainError
from ..plugins import imports_limited_to
from .io import parse_yaml, read_text_file, remove_stale_temporaries, write_yaml

log = logging.getLogger("advretrain")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run directory: a second run on it stops with a clear message."""
    lock = run_dir / ".lock"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdvretrainError(f"cannot write to {run_dir}: {exc.strerror}; choose a writable --out") from exc
    try:
        fh = open(lock, "w")  # noqa: SIM115 (held for the whole run)
    except OSError as exc:
        if lock.exists() and not lock.is_file():  # a folder or a special file where the lock file belongs
            raise AdvretrainError(
                f"{lock}: not a lock file ({exc.strerror}); remove it if no run uses {run_dir}, or choose another --out"
            ) from exc
        raise AdvretrainError(f"cannot write to {run_dir}: {exc.strerror}; choose a writable --out") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise AdvretrainError(
            f"{run_dir} is in use by another advretrain run (it holds {lock}); wait for it or choose another --out"
        ) from exc
    removed = remove_stale_temporaries(run_dir)  # no writer is alive while we hold the lock
    if removed:
        log.info("removed %d temporary file(s) a killed writer left in %s", removed, run_dir)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def user_strings(config: BaseModel) -> set[str]:
    """Every string value of `config`: the import paths among them are the only code a recorded config may name."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.add(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(config.model_dump(mode="json"))
    return found


def same_config(recorded: Any, current: BaseModel) -> bool | None:
    """Whether a recorded config (as read from a file) is `current`, read through the current schema: a key added
    since, at its default, does not count, a changed value or default does. None: this version cannot read it.

    The record is a file: an import path it names (a model builder, an attack class) that `current` does not name
    is never imported; such a record is another config."""
    with imports_limited_to(user_strings(current)) as refused:
        try:
            return type(current).model_validate(recorded) == current
        except ValidationError:
            return False if refused else None


def record_config(run_dir: Path, config: BaseModel) -> None:
    """Save the resolved config; a run directory made with another config is refused, not overwritten.

    The recorded config is read through the current schema, so a key added since (with its default) does not
    make an old run directory look different.
    """
    path = run_dir / "config.yaml"
    if path.exists():
        same = same_config(parse_yaml(read_text_file(path, "run record"), str(path)), config)
        if same is None:
            raise AdvretrainError(f"{path} is not a config this version reads; use a fresh --out")
        if not same:
            raise AdvretrainError(
                f"{run_dir} holds a run of a different config; use a fresh --out (or the same config)"
            )
    write_yaml(path, config.model_dump(mode="json"))


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    packages = {}
    for name in ("advretrain", "torch", "numpy", "scikit-learn", "pillow", "safetensors", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
