"""Three experiments a reviewer of any retraining defence asks for (METHOD.md 5 items 10-13), on the same models:

- reference defence: a model adversarially trained the standard way (FGSM-RS or PGD-AT) on the same data and recipe;
- cross-attack: f0, each attack's f1 (its largest N) and the reference, each under every attack of the run and PGD —
  the diagonal is the protocol's adaptive column, the off-diagonal says whether retraining on A helps against B;
- robustness curves: from the minimal-norm adversarials (DeepFool, C&W) against each of those models, the accuracy
  left at each L2 budget ε: did retraining move the decision boundary, or only around the images it saw?

Every cell's adversarial set is `stages.attacked_set`'s: crafted once per (attack, model) and shared with the
protocol (f0's static sets, each f1's adaptive set), so the matrix only crafts what the protocol did not.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ..advset import AdversarialSet
from ..attacks import ROBUSTNESS_ATTACK, get_attack
from ..checkpoint import load_model, train_resumable
from ..config import TrainConfig
from ..data import ImageDataset, to_float
from ..metrics import attack_metrics, predict
from ..models import Classifier
from ..results import Curve, Metrics
from .stages import (
    Run,
    Trained,
    attacked_set,
    baseline,
    cached_stage,
    digest,
    member_shares,
    set_queries,
    set_targets,
)

log = logging.getLogger("advretrain.pipeline")


def reference_stage(run: Run, f0: Trained, train_set: ImageDataset, test_set: ImageDataset) -> Trained:
    """The config's model and recipe, trained on adversarial batches (`defence`): the field's baseline defence; or,
    with `defence.finetune_epochs`, f0 fine-tuned on adversarial batches."""
    defence = run.cfg.defence
    if defence.finetune_epochs is not None:
        recipe = run.cfg.train.finetuning(defence.finetune_epochs, run.cfg.retrain.finetune_lr)
        return finetuned(run, f0, train_set, test_set, recipe.model_copy(update={"adversarial": defence.training()}))
    recipe = run.cfg.train.model_copy(update={"adversarial": defence.training()})
    model = run.cfg.model.model_copy(update={"checkpoint": None})  # trained here even when f0 was given
    return baseline(run, train_set, test_set, model, recipe, "reference")


def finetuned(run: Run, f0: Trained, train_set: ImageDataset, test_set: ImageDataset, recipe: TrainConfig) -> Trained:
    """f0 trained further with `recipe` on the clean training set (its adversarial batches, for the defence)."""
    key = digest(f0.key, recipe)
    folder = run.stage(f"reference-{key}")

    def compute() -> Classifier:
        log.info("reference: f0 fine-tuned for %d epochs on adversarial batches → %s", recipe.epochs, folder)
        model = load_model(f0.folder, "cpu", builder=run.cfg.model.name)
        args = (run.device, folder, test_set, run.progress, run.cfg.compile, False)  # no fresh initialisation
        return train_resumable(model, train_set, recipe, *args).model

    def record(_: Classifier) -> dict[str, Any]:
        return {"test_accuracy": json.loads((folder / "metrics.json").read_text()).get("test_accuracy")}

    def reuse(_: dict[str, Any]) -> Classifier:
        return load_model(folder, run.device, builder=run.cfg.model.name)

    return Trained(cached_stage(run, "reference", "reference", folder, compute, record, reuse), key, folder)


def reference_label(run: Run) -> str:
    tuned = run.cfg.defence.finetune_epochs
    return f"reference {run.cfg.defence.method}" + ("" if tuned is None else f" (f0 fine-tuned {tuned} ep.)")


def defence_record(run: Run, reference: Trained) -> dict[str, object]:
    """The reference model's recipe and clean accuracy (as its training measured it)."""
    defence = run.cfg.defence
    accuracy = json.loads((reference.folder / "metrics.json").read_text())["test_accuracy"]
    return {
        "label": reference_label(run),
        "method": defence.method,
        "eps": defence.eps,
        "step_size": defence.alpha,
        "steps": 1 if defence.method == "fgsm-rs" else defence.steps,
        "finetune_epochs": defence.finetune_epochs,
        "test_accuracy": accuracy,
    }


def columns(run: Run) -> list[str]:
    """The run's attacks, then PGD (the robustness check) unless the run lists it already."""
    return [*run.cfg.attacks, *([] if ROBUSTNESS_ATTACK in run.cfg.attacks else [ROBUSTNESS_ATTACK])]


def cell_metrics(
    model: Trained, name: str, crafted: AdversarialSet, clean: torch.Tensor, labels: torch.Tensor, bs: int
) -> Metrics:
    """What the protocol reports for the same set: targeted success where the attack aims, queries where it counts."""
    spec = get_attack(name)
    targets, queries = set_targets(spec, crafted), set_queries(spec, crafted)
    return attack_metrics(model.model, clean, crafted.adversarial, labels, targets, bs, queries) | member_shares(
        spec, crafted
    )


def cross_row(
    run: Run, label: str, model: Trained, train_set: ImageDataset, test_eval: ImageDataset
) -> dict[str, Metrics]:
    """`model` under every column's attack (a cached stage; each set crafted once, or reused from the protocol)."""
    names = columns(run)
    settings = [get_attack(n).configure(run.cfg.attack.get(n)).model_dump(mode="json") for n in names]
    folder = run.stage(f"cross-{model.key}-{digest(names, settings, len(test_eval))}")
    bs = run.cfg.train.eval_batch_size

    def compute() -> dict[str, Metrics]:
        log.info("cross-attack: %s under %s", label, ", ".join(names))
        clean, labels = to_float(test_eval.images), test_eval.labels  # N×C×H×W in [0,1], once for every column
        return {
            n: cell_metrics(model, n, attacked_set(run, n, model, train_set, test_eval)[1], clean, labels, bs)
            for n in names
        }

    return cached_stage(
        run, "cross", f"cross-attack {label}", folder, compute, lambda m: {"metrics": m}, lambda d: d["metrics"]
    )


def robustness_curve(model: Trained, crafted: AdversarialSet, test_eval: ImageDataset, bs: int) -> Curve:
    """Each correctly classified image's minimal L2 perturbation (None where the attack never fooled it), of all
    the attacked images: accuracy at ε is the share of images correct with a norm above ε
    (`report_evaluation.curve_accuracy`)."""
    clean = to_float(test_eval.images)
    labels = test_eval.labels
    correct = predict(model.model, clean, bs).argmax(1).cpu() == labels
    fooled = predict(model.model, crafted.adversarial, bs).argmax(1).cpu() != labels
    norms = (crafted.adversarial - clean).flatten(1).norm(dim=1)
    kept = correct.nonzero().squeeze(1)
    return {"total": len(labels), "norms": [float(norms[i]) if fooled[i] else None for i in kept.tolist()]}


def curves_experiment(
    run: Run, rows: dict[str, Trained], train_set: ImageDataset, test_eval: ImageDataset
) -> dict[str, dict[str, Curve]] | None:
    """Each model's robustness curve from every minimal-norm attack of the run (its sets shared with the matrix)."""
    names = [n for n in run.cfg.attacks if get_attack(n).minimal_norm]
    if not names:
        log.warning("robustness curves: the run has no minimal-norm attack (deepfool, cw); no curves drawn")
        return None
    bs = run.cfg.train.eval_batch_size
    out: dict[str, dict[str, Curve]] = {}
    for label, model in rows.items():
        run.step(f"robustness curve of {label}")
        out[label] = {
            n: robustness_curve(model, attacked_set(run, n, model, train_set, test_eval)[1], test_eval, bs)
            for n in names
        }
    return out


def evaluated_models(
    run: Run, f0: Trained, retrained: dict[str, dict[int, Trained]], reference: Trained | None
) -> dict[str, Trained]:
    """The rows of the matrix and the curves: f0, each attack's f1 at its largest N, the reference defence."""
    rows = {"f0": f0}
    for name, models in retrained.items():
        n = max(models)
        rows[f"f1 {name} N={n}"] = models[n]
    if reference is not None:
        rows[reference_label(run)] = reference
    return rows


def cross_experiment(
    run: Run, rows: dict[str, Trained], train_set: ImageDataset, test_eval: ImageDataset
) -> dict[str, dict[str, Metrics]]:
    return {label: cross_row(run, label, model, train_set, test_eval) for label, model in rows.items()}
