"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdvretrainError
from .faults import kill_point


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path` (atomic on POSIX)."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise AdvretrainError(f"cannot write {target}: {exc.strerror}; choose a writable output folder") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        kill_point("atomic-write")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AdvretrainError(
            f"cannot write {target}: {exc.strerror}; free disk space or choose another folder"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """torch.save, atomically. Read back with `torch.load(..., weights_only=True)` only."""
    _write_with(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _write_with(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def read_safetensors(path: str | os.PathLike[str], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata; an unreadable file names `what` it should have been."""
    try:
        with safe_open(str(path), "pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            return tensors, dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise AdvretrainError(f"{path}: not a readable {what} ({exc}); write it again") from exc


class HasState(Protocol):
    """A fitted object (GAP, the labeler) whose state is tensors plus string metadata."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]: ...


def save_state(path: str | os.PathLike[str], obj: HasState) -> None:
    tensors, metadata = obj.state_dict()
    save_safetensors(path, tensors, metadata)
