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
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the file must read like any other the user writes
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


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files (`.<name>.*.tmp`) a killed writer left under `folder`; call it only while holding
    the folder's lock, when no writer can be alive. Returns how many were removed."""
    stale = [p for p in folder.rglob(".*.tmp") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


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


def read_safetensors(
    path: str | os.PathLike[str], what: str, fix: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata; an unreadable file names `what` it should have been and
    `fix`, how to get a good one (a run's own file: rerun the run; a user's: where it comes from)."""
    try:
        with safe_open(str(path), "pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            return tensors, dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise AdvretrainError(f"{path}: not a readable {what} ({str(exc)[:80]}); {fix}") from exc


# A YAML file this small expands to at most this many nodes once aliases are followed: a config has a few hundred;
# an "alias bomb" of a few hundred bytes has billions.
MAX_YAML_NODES = 100_000


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader without explicit tags (`!!python/...`, `!!binary`, `!custom`) and with aliases bounded."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and not isinstance(event, yaml.AliasEvent):
            raise yaml.YAMLError(f"explicit tag {str(tag)[:40]!r} at line {event.start_mark.line + 1}")
        return super().compose_node(parent, index)


def expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in `node` with every alias followed, counted once per distinct node (no expansion happens)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a node reached again while being counted: a cycle, too big
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    memo[id(node)] = min(MAX_YAML_NODES + 1, 1 + sum(expanded_size(c, memo) for c in children))
    return memo[id(node)]


def parse_yaml(text: str, where: str, error: type[AdvretrainError] = AdvretrainError) -> Any:
    """YAML → Python with the limits above; any failure is one `error` line naming `where`."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"aliases expand it past {MAX_YAML_NODES:,} nodes")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise error(f"{where} is not valid YAML ({yaml_problem(exc)}); fix its syntax") from exc
    except RecursionError as exc:
        raise error(f"{where} nests too deeply; flatten it") from exc
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, in a few words."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem is None:
        return (str(exc).splitlines() or [type(exc).__name__])[0][:120]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)


def read_text_file(path: str | os.PathLike[str], what: str) -> str:
    """A small UTF-8 text file (a config, a record); a directory, a device or bad bytes give one line."""
    file = Path(path)
    try:
        if not file.is_file():
            raise AdvretrainError(f"{what} {file} is not a regular file; give the path of a file")
        if file.stat().st_size > 16 * 2**20:
            raise AdvretrainError(f"{what} {file} is over 16 MiB; it cannot be a {what}")
        return file.read_text(encoding="utf-8")
    except OSError as exc:
        raise AdvretrainError(f"cannot read {what} {file}: {exc.strerror}; check the path") from exc
    except UnicodeDecodeError as exc:
        raise AdvretrainError(f"{what} {file} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


class HasState(Protocol):
    """A fitted object (GAP, the labeler) whose state is tensors plus string metadata."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]: ...


def save_state(path: str | os.PathLike[str], obj: HasState) -> None:
    tensors, metadata = obj.state_dict()
    save_safetensors(path, tensors, metadata)
