"""What `results.json` holds, as dataclasses: the pipeline returns them, the report reads them.

Each class converts to and from the plain dict written to disk; `SCHEMA_VERSION` changes whenever the layout does.
Metrics (fooling ratio, accuracies, norms, label accuracies) stay flat `name → float` maps: `metrics.attack_metrics`
and `labeler.label_report` define their keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AdvretrainError

SCHEMA_VERSION = 3  # 2: the threat-model experiment (`threats`); 3: the evaluation beyond the paper (`evaluation`)
Metrics = dict[str, float]


@dataclass
class RetrainRow:
    """One retrained model f1 (N adversarial images added), evaluated."""

    n: int
    clean_accuracy: float
    adversarial_accuracy: float  # on the static adversarial test set crafted against f0
    replay: Metrics  # f0's adversarials (a universal perturbation) replayed against f1
    adaptive: Metrics  # the attack rerun against f1
    pgd_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.pgd_accuracy is None:
            del out["pgd_accuracy"]
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RetrainRow:
        return RetrainRow(
            int(d["n"]),
            d["clean_accuracy"],
            d["adversarial_accuracy"],
            dict(d["replay"]),
            dict(d["adaptive"]),
            d.get("pgd_accuracy"),
        )


@dataclass
class ArmsRound:
    """Round r ≥ 2 of the arms race: the attack against round r-1's model, then retraining on every round's set."""

    round: int
    initial: Metrics
    retrain: RetrainRow

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "initial": self.initial, "retrain": self.retrain.to_dict()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ArmsRound:
        return ArmsRound(int(d["round"]), dict(d["initial"]), RetrainRow.from_dict(d["retrain"]))


@dataclass
class AttackResults:
    """One attack's table: against f0, the labels of its adversarials, and every retrained model."""

    title: str
    threat: str
    params: dict[str, Any]
    initial: Metrics
    labels: Metrics
    retrain: list[RetrainRow]
    rounds: list[ArmsRound] = field(default_factory=list)
    fit: list[Metrics] = field(default_factory=list)  # a fitted attack's per-epoch record (GAP: FR, saturation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "threat": self.threat,
            "params": self.params,
            "initial": self.initial,
            "labels": self.labels,
            "retrain": [row.to_dict() for row in self.retrain],
            "rounds": [r.to_dict() for r in self.rounds],
            "fit": self.fit,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AttackResults:
        return AttackResults(
            str(d["title"]),
            str(d["threat"]),
            dict(d["params"]),
            dict(d["initial"]),
            dict(d["labels"]),
            [RetrainRow.from_dict(row) for row in d["retrain"]],
            [ArmsRound.from_dict(r) for r in d.get("rounds", [])],
            [dict(epoch) for epoch in d.get("fit", [])],
        )


@dataclass(frozen=True)
class Probe:
    """One black-box threat: a query attack run against each model, or a transfer set crafted on the surrogate."""

    key: str  # "square@8/255", "transfer pgd@10/255": a column of the threat-model table
    kind: str  # "query" | "transfer"
    attack: str
    settings: dict[str, Any]  # the attack's full settings at this budget
    eps: float | None  # its L-inf budget, where it has one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Probe:
        eps = d.get("eps")
        return Probe(
            str(d["key"]), str(d["kind"]), str(d["attack"]), dict(d["settings"]), None if eps is None else float(eps)
        )


@dataclass
class ThreatModels:
    """Every model of the run (f0 and each f1) under each black-box probe: probe key → attack metrics."""

    surrogate: dict[str, Any]  # model, seed, test accuracy
    probes: list[Probe]
    f0: dict[str, Metrics]
    retrained: dict[str, dict[int, dict[str, Metrics]]]  # attack → N → probe key → metrics
    others: dict[str, dict[str, Metrics]] = field(default_factory=dict)  # e.g. the reference defence: row → probe

    def to_dict(self) -> dict[str, Any]:
        return {
            "surrogate": self.surrogate,
            "probes": [p.to_dict() for p in self.probes],
            "f0": self.f0,
            "retrained": {a: {str(n): m for n, m in rows.items()} for a, rows in self.retrained.items()},
            "others": self.others,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ThreatModels:
        return ThreatModels(
            dict(d["surrogate"]),
            [Probe.from_dict(p) for p in d["probes"]],
            {k: dict(m) for k, m in d["f0"].items()},
            {a: {int(n): dict(m) for n, m in rows.items()} for a, rows in d["retrained"].items()},
            {row: {k: dict(m) for k, m in probes.items()} for row, probes in d.get("others", {}).items()},
        )


# {"total": images attacked, "norms": the minimal L2 norm of each correctly classified image (None: never fooled)}
Curve = dict[str, Any]


@dataclass
class SweepRow:
    """The labeler at one PCA size and k: per attack, label accuracy on training- and test-source adversarials and
    the exact-source retrieval rate (`{attack}/{metric}`), and what it cost."""

    dims: int | str  # "full": the pixel space itself
    k: int
    metrics: Metrics
    fit_seconds: float
    label_seconds: float  # projection + search (one search at the largest k serves every k) + vote

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SweepRow:
        dims = d["dims"] if d["dims"] == "full" else int(d["dims"])
        return SweepRow(dims, int(d["k"]), dict(d["metrics"]), float(d["fit_seconds"]), float(d["label_seconds"]))


@dataclass
class Evaluation:
    """The evaluation the paper omits (METHOD.md 2.5, 5): each part None when its experiment is switched off.

    Model rows are labelled "f0", "f1 {attack} N={n}" (each attack's largest N) and "reference {method}"."""

    fooling: dict[str, Any] | None = None  # FoolingClasses numbers (pipeline.fooling_classes)
    sweep: list[SweepRow] | None = None
    cross: dict[str, dict[str, Metrics]] | None = None  # model row → attack → metrics
    curves: dict[str, dict[str, Curve]] | None = None  # model row → minimal-norm attack → curve
    defence: dict[str, Any] | None = None  # the reference model's recipe and clean accuracy
    curve_eps: list[float] = field(default_factory=list)  # the L2 budgets of the robustness-curve table

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sweep"] = None if self.sweep is None else [row.to_dict() for row in self.sweep]
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Evaluation:
        sweep = d.get("sweep")
        return Evaluation(
            d.get("fooling"),
            None if sweep is None else [SweepRow.from_dict(row) for row in sweep],
            d.get("cross"),
            d.get("curves"),
            d.get("defence"),
            [float(e) for e in d.get("curve_eps", [])],
        )


@dataclass
class Results:
    """A whole run of the protocol: the baseline and one `AttackResults` per attack, in the config's order."""

    dataset: str
    classes: int
    model: str
    train_images: int
    test_images: int
    baseline_accuracy: float
    retrain_mode: str
    retrain_labels: str
    attacks: dict[str, AttackResults]
    threats: ThreatModels | None = None  # off when the config lists no query or transfer attack
    evaluation: Evaluation = field(default_factory=Evaluation)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "classes": self.classes,
            "model": self.model,
            "train_images": self.train_images,
            "test_images": self.test_images,
            "baseline": {"test_accuracy": self.baseline_accuracy},
            "retrain_mode": self.retrain_mode,
            "retrain_labels": self.retrain_labels,
            "attacks": {name: attack.to_dict() for name, attack in self.attacks.items()},
        }
        if self.threats is not None:
            out["threats"] = self.threats.to_dict()
        out["evaluation"] = self.evaluation.to_dict()
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Results:
        version = d.get("schema_version", 0) if isinstance(d, dict) else None
        if version == 0:  # written before the schema had a version (advretrain ≤ 2be4d84)
            d, version = upgrade_from_v0(d), 1
        if version in (1, 2):  # before the threat models (1) and the evaluation (2): the same layout without them
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise AdvretrainError(
                f"results.json has schema version {version!r}, this advretrain reads {SCHEMA_VERSION}; "
                "rerun `advretrain run --out` on it with this version"
            )
        try:
            return Results(
                str(d["dataset"]),
                int(d["classes"]),
                str(d["model"]),
                int(d["train_images"]),
                int(d["test_images"]),
                float(d["baseline"]["test_accuracy"]),
                str(d["retrain_mode"]),
                str(d["retrain_labels"]),
                {name: AttackResults.from_dict(a) for name, a in d["attacks"].items()},
                ThreatModels.from_dict(d["threats"]) if d.get("threats") is not None else None,
                Evaluation.from_dict(d.get("evaluation") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdvretrainError(
                f"results.json is damaged ({type(exc).__name__}: {exc}); rerun `advretrain run --out` on it"
            ) from exc


def upgrade_from_v0(d: dict[str, Any]) -> dict[str, Any]:
    """A record without a schema version: its attacks' titles and threat models come from the registry."""
    from .attacks import ATTACKS

    attacks = {}
    for name, attack in dict(d.get("attacks", {})).items():
        spec = ATTACKS.get(name)
        defaults = {"title": spec.title if spec else name, "threat": spec.threat if spec else "white-box"}
        attacks[name] = {**defaults, **attack}
    return {**d, "attacks": attacks}
