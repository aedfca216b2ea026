"""The paper's attacks (FGSM, DeepFool, Carlini-Wagner L2, GAP) plus PGD, Square, APGD, FAB-T and AutoAttack, as specs
in one registry.

>>> from advretrain.attacks import ATTACKS, build_attack
>>> ATTACKS["fgsm"].threat
'white-box'
>>> build_attack("fgsm", eps=0.03).eps
0.03

A new attack is one file here and one `register_attack` line below (or a call at run time, or an import path in a
config): its class takes keyword-only settings and is called as `attack(model, images, labels) -> AttackResult`.
"""

from __future__ import annotations

from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .base import AttackError, AttackResult, check_inputs, frozen
from .carlini_wagner import CW_PROFILES, CarliniWagnerL2
from .deepfool import DeepFool
from .fab import FABT
from .gap import GAP, ResnetGenerator
from .gradient import FGSM, PGD
from .registry import (
    ATTACKS,
    THREATS,
    Attack,
    AttackSpec,
    Fitted,
    Threat,
    build_attack,
    get_attack,
    register_attack,
    slug,
)
from .square import Square

# The paper's N (METHOD.md 1.2, CIFAR-10): GAP and FGSM at four sizes; DeepFool and C&W: the whole training set.
PAPER_SIZES = (50000, 25000, 12500, 9000)
register_attack("gap", GAP, title="GAP (universal, L-inf 10/255)", threat="universal", retrain_sizes=PAPER_SIZES)
register_attack("deepfool", DeepFool, title="DeepFool (L2)", minimal_norm=True)
register_attack(
    "cw",
    CarliniWagnerL2,
    title="Carlini-Wagner L2, targeted at the least-likely class",
    targeted=True,
    minimal_norm=True,
)
register_attack("fgsm", FGSM, title="FGSM", retrain_sizes=PAPER_SIZES)
register_attack("pgd", PGD, title="PGD (L-inf, 8/255)")
register_attack("square", Square, title="Square (query-only black-box, L-inf 8/255)", threat="query")
register_attack("apgd-ce", APGD, title="APGD-CE (Auto-PGD, cross-entropy, L-inf 8/255)")
register_attack("apgd-t", APGDT, title="APGD-T (Auto-PGD, targeted DLR, 9 targets, L-inf 8/255)")
register_attack("fab-t", FABT, title="FAB-T (targeted fast adaptive boundary, 9 targets, L-inf 8/255)")
register_attack("autoattack", AutoAttack, title="AutoAttack (APGD-CE, APGD-T, FAB-T, Square; L-inf 8/255)")

PAPER_ATTACKS: tuple[str, ...] = ("gap", "deepfool", "cw", "fgsm")  # the protocol's default: the paper's four
ROBUSTNESS_ATTACK = "pgd"  # the standard check that a retrained model is robust rather than masking its gradients

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "CW_PROFILES",
    "FABT",
    "FGSM",
    "GAP",
    "PAPER_ATTACKS",
    "PGD",
    "ROBUSTNESS_ATTACK",
    "THREATS",
    "Attack",
    "AttackError",
    "AttackResult",
    "AttackSpec",
    "AutoAttack",
    "CarliniWagnerL2",
    "DeepFool",
    "Fitted",
    "ResnetGenerator",
    "Square",
    "Threat",
    "build_attack",
    "check_inputs",
    "frozen",
    "get_attack",
    "register_attack",
    "slug",
]
