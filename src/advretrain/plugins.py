"""A user's own code named by an import path `package.module:Name` (an attack class, a model builder).

Code is imported only from names the user gives (a config, an override, a command-line option, a Python call). A
name read from a file (a checkpoint's metadata, a run's recorded config) is never imported on its own: readers of
files check it against the user's names (`checkpoint.load_model`) or read inside `imports_limited_to`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from .errors import ConfigError, printable

# None: any path may be imported (the user's own names are being read); a set: only these, the rest refused.
_ALLOWED: ContextVar[frozenset[str] | None] = ContextVar("advretrain_allowed_imports", default=None)
_REFUSED: ContextVar[list[str] | None] = ContextVar("advretrain_refused_imports", default=None)


def is_import_path(name: str) -> bool:
    """Whether `name` names code (`package.module:Name`) rather than a registry entry."""
    return ":" in name


@contextlib.contextmanager
def imports_limited_to(paths: Iterable[str]) -> Iterator[list[str]]:
    """Inside the block `import_object` imports only `paths` (the names the user gave) and refuses any other; the
    yielded list collects the refused names, so that a reader can tell "names code you did not" from other errors."""
    refused: list[str] = []
    allowed_token = _ALLOWED.set(frozenset(paths))
    refused_token = _REFUSED.set(refused)
    try:
        yield refused
    finally:
        _ALLOWED.reset(allowed_token)
        _REFUSED.reset(refused_token)


def import_object(path: str, what: str) -> Any:
    """`package.module:Name` → the object, or a one-line error naming the path and what is wrong with it."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{what} {printable(path[:80])!r} is neither a known name nor an import path package.module:Name"
        )
    allowed, refused = _ALLOWED.get(), _REFUSED.get()
    if allowed is not None and path not in allowed:
        if refused is not None:
            refused.append(path)
        raise ConfigError(
            f"{what} {printable(path[:80])!r} is named by a file, not by you: not imported; name it yourself to run it"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user's module may fail in any way while it is imported
        raise ConfigError(
            f"{what} {path!r}: cannot import {module_name} ({type(exc).__name__}: {exc}); check the module path"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"{what} {path!r}: {module_name} has no {attr}; check the name") from exc
