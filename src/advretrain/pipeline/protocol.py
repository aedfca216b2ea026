"""The protocols, as composition of stages only: the paper's (METHOD.md 1.2), the arms race and the threat models
(METHOD.md 5).

baseline f0 → per attack: adversarial pool (training images) + static adversarial test set, crafted against f0 →
labels (oracle or k-NN) → per N: retrain on clean + N adversarial images → evaluate f1 (clean accuracy, accuracy on
the static set, fooling ratio when attacked again — adaptive and replay —, 8-bit rounding, PGD accuracy).

A new experiment kind is one function here, one results dataclass (results.py) and one table builder (report.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..attacks import get_attack
from ..checkpoint import load_pretrained
from ..config import ExperimentConfig
from ..data import ImageDataset
from ..errors import ConfigError
from ..fooling import noise_images
from ..labeler import KNNLabeler, label_report
from ..metrics import evaluate
from ..results import ArmsRound, AttackResults, Evaluation, Results, RetrainRow
from ..runtime.device import resolve_device
from ..runtime.distributed import init as init_distributed
from ..runtime.distributed import is_main
from ..runtime.io import write_json
from ..tracking import open_tracker
from .cross_attack import (
    cross_experiment,
    curves_experiment,
    defence_record,
    evaluated_models,
    reference_label,
    reference_stage,
)
from .fooling_classes import fooling_experiment
from .pca_sweep import sweep_experiment
from .stages import (
    AttackArtifacts,
    Run,
    Trained,
    attack_stage,
    baseline,
    evaluate_stage,
    figure_data,
    initial_metrics,
    labeler_stage,
    retrain_sizes,
    retrain_stage,
)
from .threats import probes, threat_experiment

log = logging.getLogger("advretrain.pipeline")


def check_sizes(cfg: ExperimentConfig, train_set: ImageDataset) -> None:
    """Fail before any work: no N larger than the training set, and no more PCA dimensions than it allows."""
    train_size = len(train_set)
    for name in cfg.attacks:
        sizes = retrain_sizes(cfg, name, train_size)
        if max(sizes) > train_size or min(sizes) < 1:
            given = name in cfg.retrain.sizes  # else the attack's default (the paper's CIFAR-10 N), never typed
            which = f"retrain.sizes.{name}={sizes}" if given else f"{name}'s default N {sizes} (the paper's)"
            raise ConfigError(
                f"{which}: N must lie in 1..{train_size} (the training set size, which bounds the adversarial "
                f"pool); set retrain.sizes.{name} to lower it"
            )
    pixels = int(train_set.images[0].numel())
    allowed = KNNLabeler(1, fooling_percentile=cfg.labeler.fooling_percentile).max_pca_dims(train_size, pixels)
    if cfg.labeler.pca_dims > allowed:
        raise ConfigError(
            f"labeler.pca_dims={cfg.labeler.pca_dims} exceeds what {train_size} training images of {pixels} values "
            f"allow ({allowed}); lower it"
        )


def preflight(cfg: ExperimentConfig, train_set: ImageDataset) -> None:
    """Every refusal the config can earn on this data, before the run writes anything: the sizes, the model at the
    data's size and classes, and a given f0 checkpoint's fit to it (a refused run must leave no record behind, or
    its corrected rerun would be refused as "a different config")."""
    model = cfg.model.build(train_set.num_classes, train_set.image_size)
    if cfg.model.checkpoint is not None:
        load_pretrained(cfg.model.checkpoint, model)
    check_sizes(cfg, train_set)


def labels_for_retraining(run: Run, labeler: KNNLabeler, art: AttackArtifacts) -> torch.Tensor:
    if run.cfg.retrain.labels == "oracle":
        return art.pool.labels
    return labeler.predict(art.pool.adversarial)


def label_stage(
    run: Run, labeler: KNNLabeler, art: AttackArtifacts, test_eval: ImageDataset, fooling: torch.Tensor
) -> dict[str, float]:
    """Table 7's row: how well the labeler recovers the sources of this attack's adversarials."""
    started = time.perf_counter()
    report = label_report(
        labeler,
        (art.pool.adversarial, art.pool.labels, art.pool.indices),
        (art.static.adversarial, art.static.labels),
        (test_eval.images, test_eval.labels),
        fooling,
    )
    run.timed(f"labels-{art.name}", started)
    return report


def attack_experiment(
    run: Run,
    name: str,
    f0: Trained,
    labeler: KNNLabeler,
    fooling: torch.Tensor,
    train_set: ImageDataset,
    test_eval: ImageDataset,
) -> tuple[AttackResults, dict[int, Trained], AttackArtifacts]:
    """One attack's table: craft against f0, label, retrain at every N, evaluate; then the optional arms race.

    Also returns the retrained models by N and the sets crafted against f0, for the experiments that measure them
    further (threat models, cross-attack, PCA sweep)."""
    art = attack_stage(run, name, f0, train_set, test_eval)
    labels = labels_for_retraining(run, labeler, art)
    report = label_stage(run, labeler, art, test_eval, fooling)
    figure_data(run, art, f0.model, test_eval)
    sizes = sorted(retrain_sizes(run.cfg, name, len(train_set)), reverse=True)
    rows: list[RetrainRow] = []
    models: dict[int, Trained] = {}
    for n in sizes:
        models[n] = retrain_stage(run, [(art, labels)], n, f0, train_set)
        rows.append(evaluate_stage(run, art, n, models[n], train_set, test_eval))
    spec = art.spec
    initial = initial_metrics(run, f0.model, art, test_eval)
    run.tracker.summary(f"attack {name}", initial)
    out = AttackResults(spec.title, spec.threat, art.params, initial, report, rows)
    if spec.fitted:  # its per-epoch record (GAP: held-out fooling ratio and saturation)
        out.fit = [dict(epoch) for epoch in getattr(art.attack, "history", [])]
    if run.cfg.retrain.rounds > 1:
        out.rounds = arms_race(run, [(art, labels)], sizes[0], models[sizes[0]], labeler, train_set, test_eval)
    return out, models, art


def arms_race(
    run: Run,
    parts: list[tuple[AttackArtifacts, torch.Tensor]],
    n: int,
    defender: Trained,
    labeler: KNNLabeler,
    train_set: ImageDataset,
    test_eval: ImageDataset,
) -> list[ArmsRound]:
    """Rounds 2..R: attack the last retrained model, retrain on clean + every round's N adversarials, evaluate."""
    name = parts[0][0].name
    rounds = []
    for r in range(2, run.cfg.retrain.rounds + 1):
        tag = f"-round{r}"
        art = attack_stage(run, name, defender, train_set, test_eval, f"the round-{r - 1} model")
        initial = initial_metrics(run, defender.model, art, test_eval)
        parts = [*parts, (art, labels_for_retraining(run, labeler, art))]
        defender = retrain_stage(run, parts, n, defender, train_set, tag)
        rounds.append(ArmsRound(r, initial, evaluate_stage(run, art, n, defender, train_set, test_eval, tag)))
    return rounds


def stage_count(cfg: ExperimentConfig, train_size: int) -> int:
    """How many stages `run_experiment` passes through (each reused or computed), for its "stage k/K" lines."""
    per_attack = [len(retrain_sizes(cfg, name, train_size)) for name in cfg.attacks]
    total = 2 + sum(1 + 2 * n + 3 * (cfg.retrain.rounds - 1) for n in per_attack)  # baseline, labeler; attack, N×2
    if cfg.threats.enabled:
        transfer = [p for p in probes(cfg) if p.kind == "transfer"]
        total += (1 + len(transfer) if transfer else 0) + 1 + sum(per_attack)  # surrogate, sets; f0 and every f1
    on = set(cfg.experiments)
    defence = "reference-defence" in on
    rows = 1 + len(cfg.attacks) + defence  # f0, each attack's largest N, the reference
    total += defence * (1 + cfg.threats.enabled) + ("fooling-classes" in on) + ("pca-sweep" in on)
    curves = "robustness-curves" in on and any(get_attack(n).minimal_norm for n in cfg.attacks)
    total += rows * (("cross-attack" in on or defence) + curves)
    return total


def evaluation_subset(cfg: ExperimentConfig, test_set: ImageDataset) -> ImageDataset:
    """A seeded random subset in split order: the split is class-major, so its first images would be one class."""
    n_eval = min(cfg.test_images or len(test_set), len(test_set))
    pick = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(cfg.train.seed + 2))[:n_eval]
    return test_set.subset(pick.sort().values)


def run_experiment(
    cfg: ExperimentConfig, root: Path, train_set: ImageDataset, test_set: ImageDataset, progress: bool = True
) -> Results:
    """Run (or resume) the paper's protocol on every configured attack; returns what `results.json` holds."""
    run = Run(root, cfg, init_distributed(resolve_device(cfg.device)), progress and is_main())
    preflight(cfg, train_set)
    run.tracker = open_tracker(cfg.tracking, root)
    try:
        return protocol(run, train_set, test_set)
    finally:
        run.tracker.close()


def protocol(run: Run, train_set: ImageDataset, test_set: ImageDataset) -> Results:
    """Baseline, labeler, every attack's experiment, the threat models; the results they make."""
    cfg, root = run.cfg, run.root
    run.total = stage_count(cfg, len(train_set))
    for name in cfg.attacks:
        get_attack(name)  # an import-path attack that fails to import fails here, before any work
    test_eval = evaluation_subset(cfg, test_set)
    f0 = baseline(run, train_set, test_set)
    labeler = labeler_stage(run, train_set)
    fooling = noise_images(500, tuple(train_set.images.shape[1:]))  # type: ignore[arg-type]
    done = {name: attack_experiment(run, name, f0, labeler, fooling, train_set, test_eval) for name in cfg.attacks}
    retrained = {name: models for name, (_, models, _) in done.items()}
    on = set(cfg.experiments)
    reference = reference_stage(run, f0, train_set, test_set) if "reference-defence" in on else None
    others = {} if reference is None else {reference_label(run): reference}
    threats = (
        threat_experiment(run, f0, retrained, train_set, test_set, test_eval, others) if cfg.threats.enabled else None
    )
    arts = [art for _, _, art in done.values()]
    rows = evaluated_models(run, f0, retrained, reference)
    evaluation = Evaluation(
        fooling_experiment(run, f0, labeler, arts, train_set, test_set, test_eval) if "fooling-classes" in on else None,
        sweep_experiment(run, train_set, arts) if "pca-sweep" in on else None,
        cross_experiment(run, rows, train_set, test_eval) if on & {"cross-attack", "reference-defence"} else None,
        curves_experiment(run, rows, train_set, test_eval) if "robustness-curves" in on else None,
        None if reference is None else defence_record(run, reference),
        list(cfg.curves.eps),
    )
    if is_main():
        write_json(root / "timings.json", run.timings)
    results = Results(
        cfg.data.dataset,
        train_set.num_classes,
        cfg.model.name,
        len(train_set),
        len(test_eval),
        evaluate(f0.model, test_set.images, test_set.labels, cfg.train.eval_batch_size),
        cfg.retrain.mode,
        cfg.retrain.labels,
        {name: results for name, (results, _, _) in done.items()},
        threats,
        evaluation,
    )
    run.tracker.summary("results", final_numbers(results))
    return results


def final_numbers(results: Results) -> dict[str, float]:
    """What a tracker shows of the results: f0's accuracy, each attack's first and last fooling ratios."""
    numbers = {"baseline_accuracy": results.baseline_accuracy}
    for name, attack in results.attacks.items():
        row = max(attack.retrain, key=lambda r: r.n)
        numbers[f"{name}/fooling_ratio_f0"] = attack.initial["fooling_ratio"]
        numbers[f"{name}/fooling_ratio_adaptive_N{row.n}"] = row.adaptive["fooling_ratio"]
        numbers[f"{name}/clean_accuracy_N{row.n}"] = row.clean_accuracy
    return numbers
