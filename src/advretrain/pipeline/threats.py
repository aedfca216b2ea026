"""The threat-model experiment (not in the paper; METHOD.md 2.6, 2.7, 5 item 9): attackers who cannot see the
gradients of the model they attack, against f0 and every retrained f1.

- query: a query-only attack (Square) run against each model's outputs, at its own budget and the extra ones;
- transfer: sets crafted once against a surrogate trained independently (the baseline recipe, another seed), then
  submitted unchanged to f0 and to every f1 — nothing is crafted against the models that are measured.

Each model's measurements are one cached stage; the surrogate and its transfer sets are cached stages like f0.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..advset import AdversarialSet
from ..attacks import get_attack, slug
from ..config import ExperimentConfig, ModelConfig, TrainConfig
from ..data import ImageDataset, to_float
from ..metrics import attack_metrics
from ..results import Metrics, Probe, ThreatModels
from .stages import Run, Trained, baseline, cached_stage, craft, digest, fitted_attack, member_shares, set_queries

log = logging.getLogger("advretrain.pipeline")


def budget_name(eps: float) -> str:
    """8/255 where the budget is a whole number of 8-bit steps, else the number itself (0.07)."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{eps:g}"


def at_budget(settings: dict[str, Any], eps: float) -> dict[str, Any]:
    """An L-inf attack's settings at another budget; a step size keeps its ratio to the budget (PGD: eps/4)."""
    out = {**settings, "eps": eps}
    if "step_size" in settings:
        out["step_size"] = settings["step_size"] * eps / settings["eps"]
    return out


def budgets_for(settings: dict[str, Any], extra: list[float]) -> Sequence[float | None]:
    """An L-inf attack's own budget and the extra ones, ascending; [None] for an attack without an L-inf eps."""
    own = settings.get("eps")
    if not isinstance(own, float) or settings.get("norm", "linf") != "linf":
        return [None]
    return sorted([own, *(b for b in extra if abs(b - own) > 1e-9)])


def budget_suffix(settings: dict[str, Any], eps: float | None) -> str:
    """A column's budget: "@8/255" for an L-inf one, "@L2 0.5" for an attack with another norm, else nothing."""
    if eps is not None:
        return f"@{budget_name(eps)}"
    norm, own = settings.get("norm"), settings.get("eps")
    return f"@{norm.upper()} {own:g}" if isinstance(norm, str) and isinstance(own, float) else ""


def probes(cfg: ExperimentConfig) -> list[Probe]:
    """Every (attack, budget) column: white-box evaluations at their own budget, then query attacks, then transfer
    attacks, each at ascending budgets."""
    out: list[Probe] = []
    threats = cfg.threats
    for kind, names in (("white-box", threats.white_box), ("query", threats.query), ("transfer", threats.transfer)):
        for name in names:
            settings = get_attack(name).configure(cfg.attack.get(name)).model_dump(mode="json")
            for eps in budgets_for(settings, [] if kind == "white-box" else threats.budgets):
                at = settings if eps is None or eps == settings["eps"] else at_budget(settings, eps)
                key = ("transfer " if kind == "transfer" else "") + name + budget_suffix(settings, eps)
                out.append(Probe(key, kind, name, at, eps))
    return out


def surrogate_recipe(cfg: ExperimentConfig) -> tuple[ModelConfig, TrainConfig]:
    """The attacker's own model and recipe: the configured ones (or `threats.surrogate_model`, and the recipe with
    `threats.surrogate_train`'s changes) with another seed, trained here, never the user's f0 checkpoint."""
    seed = cfg.train.seed + 1 if cfg.threats.surrogate_seed is None else cfg.threats.surrogate_seed
    model = cfg.model.model_copy(update={"name": cfg.threats.surrogate_model or cfg.model.name, "checkpoint": None})
    recipe = cfg.train.updated(cfg.threats.surrogate_train, "threats.surrogate_train")
    return model, recipe.model_copy(update={"seed": seed})


def surrogate_stage(run: Run, train_set: ImageDataset, test_set: ImageDataset) -> Trained:
    """A classifier the attacker trains on the same data (`surrogate_recipe`)."""
    return baseline(run, train_set, test_set, *surrogate_recipe(run.cfg), "surrogate")


def transfer_sets(
    run: Run, surrogate: Trained, transfer: list[Probe], train_set: ImageDataset, test_eval: ImageDataset
) -> dict[str, AdversarialSet]:
    """Each transfer probe's adversarial test set, crafted against the surrogate (a fitted attack fitted on it)."""
    out = {}
    for probe in transfer:
        spec = get_attack(probe.attack)
        folder = run.stage(f"transfer-{slug(probe.key)}-{digest(probe.settings, surrogate.key, len(test_eval))}")
        run.step(f"{probe.key} crafted against the surrogate")
        log.info("transfer %s: crafting against the surrogate → %s", probe.key, folder)
        attack = fitted_attack(
            run, spec, surrogate.model, train_set.images, folder / "fitted.safetensors", probe.settings
        )
        meta = {"attack": probe.attack, "params": probe.settings, "split": "test", "against": surrogate.key}
        everything = torch.arange(len(test_eval))
        out[probe.key] = craft(
            attack, surrogate.model, test_eval.images, test_eval.labels, everything, folder / "test.advset", meta
        )
    return out


def threat_stage(
    run: Run,
    model: Trained,
    label: str,
    probe_list: list[Probe],
    sets: dict[str, AdversarialSet],
    test_eval: ImageDataset,
) -> dict[str, Metrics]:
    """`model` under every probe: white-box and query attacks crafted against it (resumable sets), transfer sets
    replayed."""
    keys = [(p.key, p.settings) for p in probe_list]
    folder = run.stage(f"threats-{model.key}-{digest(keys, *(sets[k].meta for k in sorted(sets)), len(test_eval))}")
    clean, labels, bs = to_float(test_eval.images), test_eval.labels, run.cfg.train.eval_batch_size

    def measure(probe: Probe) -> Metrics:
        if probe.kind == "transfer":
            return attack_metrics(model.model, clean, sets[probe.key].adversarial, labels, batch_size=bs)
        spec = get_attack(probe.attack)
        attack = spec.build(probe.settings, progress=run.progress)
        meta = {"attack": probe.attack, "params": probe.settings, "split": "test", "against": model.key}
        everything = torch.arange(len(labels))
        crafted = craft(
            attack, model.model, test_eval.images, labels, everything, folder / f"{slug(probe.key)}.advset", meta
        )
        queries = set_queries(spec, crafted)
        return attack_metrics(model.model, clean, crafted.adversarial, labels, None, bs, queries) | member_shares(
            spec, crafted
        )

    def compute() -> dict[str, Metrics]:
        log.info("threat models: %s under %s", label, ", ".join(p.key for p in probe_list))
        return {probe.key: measure(probe) for probe in probe_list}

    return cached_stage(
        run, "threats", f"threats {label}", folder, compute, lambda m: {"metrics": m}, lambda d: d["metrics"]
    )


def threat_experiment(
    run: Run,
    f0: Trained,
    retrained: dict[str, dict[int, Trained]],
    train_set: ImageDataset,
    test_set: ImageDataset,
    test_eval: ImageDataset,
    others: dict[str, Trained] | None = None,
) -> ThreatModels:
    """The surrogate and its transfer sets, then f0, every f1 and the `others` (label → model) under every probe."""
    probe_list = probes(run.cfg)
    transfer = [p for p in probe_list if p.kind == "transfer"]
    surrogate = surrogate_stage(run, train_set, test_set) if transfer else None
    sets = transfer_sets(run, surrogate, transfer, train_set, test_eval) if surrogate else {}
    described: dict[str, Any] = {}
    if surrogate is not None:  # its accuracy as its training measured it (metrics.json), not evaluated again
        model, recipe = surrogate_recipe(run.cfg)
        accuracy = json.loads((surrogate.folder / "metrics.json").read_text())["test_accuracy"]
        described = {"model": model.name, "seed": recipe.seed, "test_accuracy": accuracy}
    return ThreatModels(
        described,
        probe_list,
        threat_stage(run, f0, "f0", probe_list, sets, test_eval),
        {
            name: {n: threat_stage(run, f1, f"{name} N={n}", probe_list, sets, test_eval) for n, f1 in models.items()}
            for name, models in retrained.items()
        },
        {
            label: threat_stage(run, model, label, probe_list, sets, test_eval)
            for label, model in (others or {}).items()
        },
    )
