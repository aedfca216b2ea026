"""The paper's attacks (FGSM, DeepFool, Carlini-Wagner L2, GAP) plus PGD, and a name → builder registry.

>>> from advretrain.attacks import build_attack
>>> build_attack("fgsm", eps=0.03).eps
0.03
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import AttackError, AttackResult, check_inputs, frozen
from .carlini_wagner import CW_PROFILES, CarliniWagnerL2
from .deepfool import DeepFool
from .gap import GAP, ResnetGenerator
from .gradient import FGSM, PGD

ATTACKS: dict[str, Callable[..., Any]] = {
    "fgsm": FGSM,
    "deepfool": DeepFool,
    "cw": CarliniWagnerL2,
    "gap": GAP,
    "pgd": PGD,
}


def build_attack(name: str, **kwargs: Any) -> Any:
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    try:
        return ATTACKS[name](**kwargs)
    except TypeError as exc:
        raise AttackError(f"attack {name}: {exc}; see its keyword arguments") from exc


__all__ = [
    "ATTACKS",
    "CW_PROFILES",
    "FGSM",
    "GAP",
    "PGD",
    "AttackError",
    "AttackResult",
    "CarliniWagnerL2",
    "DeepFool",
    "ResnetGenerator",
    "build_attack",
    "check_inputs",
    "frozen",
]
