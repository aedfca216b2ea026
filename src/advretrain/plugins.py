"""A user's own code named by an import path `package.module:Name` (an attack class, a model builder)."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError


def import_object(path: str, what: str) -> Any:
    """`package.module:Name` → the object, or a one-line error naming the path and what is wrong with it."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {path!r} is neither a known name nor an import path package.module:Name")
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
