"""Attack specs: everything the rest of advretrain needs to know about an attack, in one record per name.

The settings model of an attack is read off its constructor's keyword arguments, so the constructor's defaults are
the only copy of each default. An attack added at run time with `register_attack`, or named in a config by an
import path `package.module:Class`, is then configured, crafted, tabled and plotted like the built-in ones.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from torch import nn

from ..errors import ConfigError
from ..plugins import import_object
from .base import AttackError, AttackResult

# per-image white-box (gradients of the attacked model), universal (one perturbation for every image),
# query-based black-box (forward passes only), transfer (crafted on a surrogate, applied to the target).
Threat = Literal["white-box", "universal", "query", "transfer"]
THREATS: tuple[str, ...] = get_args(Threat)

# Constructor keywords that say how to run, not what to compute: never part of the settings or a stage's key.
RUNTIME_KEYWORDS = frozenset({"progress", "on_epoch"})


class Attack(Protocol):
    """The call convention every attack keeps: [0,1] N×C×H×W images and N labels in, an `AttackResult` out."""

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult: ...


class Fitted(Protocol):
    """An attack fitted before use (GAP): `fit` learns its state, `state_dict` and `load_state_dict` carry it."""

    def fit(self, model: nn.Module, images: torch.Tensor) -> Any: ...

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Any: ...


@dataclass(frozen=True)
class AttackSpec:
    """One attack: its class, typed settings, title, threat model and what the pipeline must do with it.

    fitted: the class has `fit(model, train_images)` and its state is saved as `state_dict()` (tensors, metadata).
    targeted: `AttackResult.targets` name the class each image was pushed to (C&W's least-likely class).
    retrain_sizes: the default N of adversarial training images (the paper's, CIFAR-10); empty: the training set.
    minimal_norm: it searches the smallest (L2) perturbation that fools, so its norms trace robustness curves.
    """

    name: str
    cls: type
    title: str
    threat: Threat
    settings: type[BaseModel]
    fitted: bool = False
    targeted: bool = False
    retrain_sizes: tuple[int, ...] = ()
    minimal_norm: bool = False

    def configure(self, values: Mapping[str, Any] | None = None) -> BaseModel:
        """The attack's settings: its defaults updated by `values`; an unknown or invalid keyword is an error."""
        try:
            return self.settings.model_validate(dict(values or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                known = ", ".join(self.settings.model_fields) or "none"
                raise AttackError(f"attack {self.name}: unknown keyword {where!r}; its keywords are {known}") from exc
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise AttackError(f"attack {self.name}: {where}: {msg} (got {err.get('input')!r}); fix the value") from exc

    def build(self, values: Mapping[str, Any] | None = None, **runtime: Any) -> Any:
        """The attack object with `values` (validated) and any run-time keywords its constructor accepts."""
        settings = self.configure(values).model_dump()
        accepted = inspect.signature(self.cls).parameters
        extra = {k: v for k, v in runtime.items() if k in accepted}
        try:
            return self.cls(**settings, **extra)
        except (TypeError, ValueError) as exc:
            raise AttackError(f"attack {self.name}: {exc}; see its keyword arguments") from exc


def settings_model(cls: type) -> type[BaseModel]:
    """A frozen pydantic model of `cls`'s keyword arguments, with the constructor's annotations and defaults."""
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)  # type: ignore[misc]
    except (NameError, TypeError):  # annotations that do not resolve: keep the defaults, accept any value
        hints = {}
    fields: dict[str, Any] = {}
    for name, param in inspect.signature(cls).parameters.items():
        if name in RUNTIME_KEYWORDS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = ... if param.default is param.empty else param.default
        fields[name] = (hints.get(name, Any), default)
    # NaN and infinity are never a setting; `Annotated[float, Field(...)]` in a signature adds its range
    config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)
    return create_model(f"{cls.__name__}Settings", __config__=config, **fields)


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(
    name: str,
    cls: type,
    *,
    title: str,
    threat: Threat = "white-box",
    fitted: bool | None = None,
    targeted: bool = False,
    retrain_sizes: tuple[int, ...] = (),
    minimal_norm: bool = False,
) -> AttackSpec:
    """Add (or replace) attack `name`: `cls(**settings)(model, images, labels)` must return an `AttackResult`.

    `fitted` defaults to whether the class has a `fit` method.
    """
    if threat not in THREATS:
        raise AttackError(f"attack {name}: threat {threat!r} is not one of {', '.join(THREATS)}")
    if not callable(cls):
        raise AttackError(f"attack {name}: {cls!r} is not a class; register the attack's class")
    spec = AttackSpec(
        name=name,
        cls=cls,
        title=title,
        threat=threat,
        settings=settings_model(cls),
        fitted=hasattr(cls, "fit") if fitted is None else fitted,
        targeted=targeted,
        retrain_sizes=tuple(retrain_sizes),
        minimal_norm=minimal_norm,
    )
    ATTACKS[name] = spec
    return spec


def get_attack(name: str) -> AttackSpec:
    """The spec of a registered attack, or of `package.module:Class` (registered on first use)."""
    if name in ATTACKS:
        return ATTACKS[name]
    if ":" not in name:
        raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)} or give package.module:Class")
    try:
        cls = import_object(name, "attack")
    except ConfigError as exc:
        raise AttackError(str(exc)) from exc
    if not inspect.isclass(cls):
        raise AttackError(f"attack {name!r} is a {type(cls).__name__}, not a class; name the attack's class")
    doc = (inspect.getdoc(cls) or cls.__name__).splitlines()[0].rstrip(".")
    return register_attack(
        name,
        cls,
        title=getattr(cls, "title", doc),
        threat=getattr(cls, "threat", "white-box"),
        targeted=bool(getattr(cls, "targeted_attack", False)),
    )


def build_attack(name: str, **kwargs: Any) -> Any:
    """`build_attack("fgsm", eps=0.03)`: the attack `name` with its keywords validated."""
    return get_attack(name).build(kwargs)


def slug(name: str) -> str:
    """A file-name-safe form of an attack name (import paths hold ':' and '.')."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)
