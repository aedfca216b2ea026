"""The paper's published numbers and claims (METHOD.md 1.3), as data: the one module that knows them.

Every lookup answers None where the paper has no figure (another attack, dataset family or N); the tables show
"—" there. Families: "cifar" (CIFAR-10, VGG16) and "tiny" (TinyImageNet, ResNet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Tables by attack: (CIFAR-10 number, TinyImageNet number).
TABLE_NUMBERS: dict[str, tuple[int, int]] = {"gap": (1, 2), "deepfool": (3, 3), "cw": (4, 4), "fgsm": (5, 6)}
LABEL_TABLE = 7

# (accuracy on original images, accuracy on adversarial images, FR after retraining), in %, by attack, family, N.
# N None: the paper retrains on the whole training set only (DeepFool, C&W), so its row stands for every N we use.
RETRAIN: dict[tuple[str, str], dict[int | None, tuple[float, float, float]]] = {
    ("gap", "cifar"): {
        50000: (92.25, 91.09, 13),
        25000: (92.4, 90.18, 16),
        12500: (91.5, 88.5, 24),
        9000: (90.52, 86.64, 26),
    },
    ("gap", "tiny"): {100000: (72.4, 66, 22), 75000: (72, 66, 23), 50000: (72.1, 66, 22), 25000: (72, 65, 24)},
    ("deepfool", "cifar"): {None: (92.02, 90.13, 99)},
    ("deepfool", "tiny"): {None: (72.42, 71, 99)},
    ("cw", "cifar"): {None: (92.37, 90.80, 99)},
    ("cw", "tiny"): {None: (72.11, 70, 99)},
    ("fgsm", "cifar"): {
        50000: (92.45, 90.24, 44.72),
        25000: (92.54, 90.3, 43.95),
        12500: (92.78, 88.5, 46.72),
        9000: (92.57, 86.1, 47.8),
    },
    ("fgsm", "tiny"): {
        100000: (72.3, 69.2, 48.13),
        75000: (72.42, 69, 48.9),
        50000: (72.41, 68.1, 49.2),
        25000: (72, 67.1, 49),
    },
}
# Fooling ratio against the baseline, in %, by attack: (CIFAR-10, TinyImageNet).
INITIAL_FR: dict[str, tuple[float, float]] = {
    "gap": (82, 92),
    "deepfool": (99, 99),
    "cw": (100, 99),
    "fgsm": (92.82, 98),
}
# Table 7: (pixel dimensions, PCA dimensions, label accuracy in % on GAP's adversarials), by family.
LABELS: dict[str, tuple[int, int, float]] = {"cifar": (3072, 300, 98.29), "tiny": (12288, 2000, 98)}


def family(dataset: str, classes: int) -> str:
    return "tiny" if classes >= 200 or "tiny" in dataset.lower() else "cifar"


def table_number(attack: str, fam: str) -> int | None:
    numbers = TABLE_NUMBERS.get(attack)
    return None if numbers is None else numbers[1 if fam == "tiny" else 0]


def initial_fr(attack: str, fam: str) -> float | None:
    values = INITIAL_FR.get(attack)
    return None if values is None else values[1 if fam == "tiny" else 0]


# The training sets the paper's N are counted against: a run on a subset compares at the same share of its own.
TRAIN_SIZE = {"cifar": 50000, "tiny": 100000}


def retrain_row(attack: str, fam: str, n: int, train_size: int) -> tuple[int | None, tuple[float, float, float]] | None:
    """The paper's row for N adversarial images of a training set of `train_size`: the row at the same N, else at
    the same share of the paper's training set (within a percentage point), else its whole-training-set row
    (DeepFool, C&W). Returns (the paper's N, its figures); the N is None for a whole-training-set row."""
    rows = RETRAIN.get((attack, fam), {})
    if n in rows:
        return n, rows[n]
    share = n / max(train_size, 1)
    for paper_n, figures in rows.items():
        if paper_n is not None and abs(paper_n / TRAIN_SIZE[fam] - share) <= 0.01:
            return paper_n, figures
    return (None, rows[None]) if None in rows else None


@dataclass(frozen=True)
class Outcome:
    """One retraining's figures a claim is checked against (fractions, not %)."""

    n: int
    initial: float  # FR against the baseline
    adaptive: float  # FR of the attack rerun against the retrained model
    replay: float  # FR of the baseline's adversarials replayed
    adaptive_accuracy: float  # accuracy under the rerun attack


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _gap_claim(o: Outcome) -> str | None:
    # The paper: GAP "cannot succeed in fooling the retrained network" (13-26%), measured by replaying U.
    if o.adaptive > 2 * max(o.replay, 1e-9) and o.adaptive > 0.3:
        return (
            f"N={o.n}: the replayed perturbation fools {pct(o.replay)}, but a generator refitted "
            f"against the retrained model fools {pct(o.adaptive)}: the paper's GAP result measures "
            "non-adaptivity, not robustness."
        )
    return None


def _persists_claim(o: Outcome) -> str | None:
    # The paper: DeepFool and C&W still fool 99% of the retrained model.
    if o.adaptive < 0.95:
        return f"N={o.n}: adaptive fooling ratio {pct(o.adaptive)} is below the paper's 99%."
    return None


def _fgsm_claim(o: Outcome) -> str | None:
    # The paper: 92.82% → 44-48% after retraining, about halved.
    if o.adaptive > 0.75 * o.initial:
        return (
            f"N={o.n}: FGSM re-run against the retrained model still fools {pct(o.adaptive)} (initially "
            f"{pct(o.initial)}; accuracy under it {pct(o.adaptive_accuracy)}), unlike the paper's halving."
        )
    return None


# Where our measurement and the paper's claim about an attack part ways, said in words.
CLAIMS: dict[str, Callable[[Outcome], str | None]] = {
    "gap": _gap_claim,
    "deepfool": _persists_claim,
    "cw": _persists_claim,
    "fgsm": _fgsm_claim,
}


def disagreements(attack: str, outcomes: list[Outcome]) -> list[str]:
    claim = CLAIMS.get(attack)
    if claim is None:
        return []
    return [line for line in map(claim, outcomes) if line is not None]
