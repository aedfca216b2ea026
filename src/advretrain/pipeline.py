"""The paper's protocol (METHOD.md 1.2) as stages with cached, resumable artifacts in a run directory.

baseline f0 → per attack: adversarial pool (training images) + static adversarial test set, crafted against f0 →
labels (oracle or k-NN) → per N: retrain on clean + N adversarial images → evaluate f1 (clean accuracy, accuracy on
the static set, fooling ratio when attacked again — adaptive and replay —, 8-bit rounding, PGD accuracy).

Every artifact lives in a folder named by a hash of what it depends on and counts as finished only once its
`done.json` (or an adversarial set's `meta.json`) is written, last and atomically. A rerun of the same command
reuses finished stages, resumes training from the last epoch and attacks from the last shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .advset import AdversarialSet, craft_adversarial_set, is_complete, load_adversarial_set
from .attacks import GAP, PGD, build_attack
from .checkpoint import load_model
from .config import AttackName, ExperimentConfig
from .data import ImageDataset
from .device import resolve_device
from .distributed import barrier, is_main
from .distributed import init as init_distributed
from .errors import ConfigError
from .faults import kill_point
from .fooling import noise_images
from .io import save_safetensors, write_json
from .labeler import KNNLabeler, label_report
from .metrics import attack_metrics
from .models import Classifier, grow_head
from .train import evaluate, predict, train

log = logging.getLogger("advretrain.pipeline")


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class Run:
    """Where a run's artifacts go and how long each stage took."""

    root: Path
    cfg: ExperimentConfig
    device: torch.device
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str) -> Path:
        return self.root / "stages" / name

    @staticmethod
    def finished(folder: Path) -> dict[str, Any] | None:
        done = folder / "done.json"
        return json.loads(done.read_text()) if done.exists() else None

    def finish(self, folder: Path, info: dict[str, Any]) -> dict[str, Any]:
        if is_main():
            write_json(folder / "done.json", info)
        barrier()
        kill_point(f"after-{folder.name.split('-')[0]}")  # baseline, retrain or eval
        return info

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 2)


def attack_params(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    return dict(getattr(cfg.attack, name))


def check_sizes(cfg: ExperimentConfig, train_set: ImageDataset) -> None:
    """Fail before any work: every attack needs retraining sizes, none larger than the training set, and the
    labeler's PCA no more dimensions than the training set allows."""
    train_size = len(train_set)
    for name in cfg.attacks:
        sizes = cfg.retrain.sizes.get(name)
        if not sizes:
            raise ConfigError(f"retrain.sizes has no entry for attack {name!r}; add e.g. retrain.sizes.{name}=[1000]")
        if max(sizes) > train_size or min(sizes) < 1:
            raise ConfigError(
                f"retrain.sizes.{name}={sizes}: N must lie in 1..{train_size} (the training set "
                "size, which bounds the adversarial pool); lower it"
            )
        build_attack(name, **attack_params(cfg, name))  # unknown or invalid attack keywords fail here
    pixels = int(train_set.images[0].numel())
    allowed = KNNLabeler(1, fooling_percentile=cfg.labeler.fooling_percentile).max_pca_dims(train_size, pixels)
    if cfg.labeler.pca_dims > allowed:
        raise ConfigError(
            f"labeler.pca_dims={cfg.labeler.pca_dims} exceeds what {train_size} training images of {pixels} values "
            f"allow ({allowed}); lower it"
        )


def baseline(run: Run, train_set: ImageDataset, test_set: ImageDataset) -> tuple[Classifier, str]:
    cfg = run.cfg
    key = digest(cfg.data, cfg.model, cfg.train)
    folder = run.stage(f"baseline-{key}")
    if run.finished(folder):
        log.info("baseline: reused %s", folder)
        return load_model(folder, run.device), key
    log.info("baseline: training %s on %d images → %s", cfg.model.name, len(train_set), folder)
    started = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = cfg.model.build(train_set.num_classes, train_set.image_size)
    result = train(model, train_set, cfg.train, run.device, folder, test_set, run.progress, cfg.compile)
    run.finish(folder, {"test_accuracy": result.test_accuracy})
    run.timed("baseline", started)
    return result.model, key


def fitted_gap(params: dict[str, Any], model: Classifier, images: torch.Tensor, file: Path, progress: bool) -> GAP:
    gap = GAP(**params, progress=progress)
    fitted = file.exists()
    barrier()  # every rank decides before rank 0 can write the file (the fit itself has no collective)
    if fitted:
        return gap.load(file)
    gap.fit(model, images)
    if is_main():
        gap.save(file)
    barrier()
    return gap


def craft(
    run: Run,
    attack: Any,
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    folder: Path,
    meta: dict[str, Any],
) -> AdversarialSet:
    if is_complete(folder):
        log.info("  reused %s", folder)
    else:
        log.info("  crafting %d adversarial images → %s", labels.shape[0], folder)
        craft_adversarial_set(attack, model, images, labels, folder, meta, indices=indices)
    return load_adversarial_set(folder)


def pool_indices(cfg: ExperimentConfig, train_size: int, size: int) -> torch.Tensor:
    """A seeded random subset of the training images; every smaller N takes a prefix of it."""
    return torch.randperm(train_size, generator=torch.Generator().manual_seed(cfg.train.seed + 1))[:size]


@dataclass
class AttackArtifacts:
    name: AttackName
    key: str
    attack: Any
    pool: AdversarialSet
    static: AdversarialSet


def attack_stage(
    run: Run,
    name: AttackName,
    f0: Classifier,
    f0_key: str,
    train_set: ImageDataset,
    test_eval: ImageDataset,
    target: str = "the baseline",
) -> AttackArtifacts:
    cfg = run.cfg
    params = attack_params(cfg, name)
    pool_size = max(cfg.retrain.sizes[name])
    key = digest(name, params, f0_key, pool_size, len(test_eval))
    folder = run.stage(f"attack-{name}-{key}")
    log.info("attack %s: against %s (pool %d training images, %d test images)", name, target, pool_size, len(test_eval))
    started = time.perf_counter()
    if name == "gap":
        attack: Any = fitted_gap(params, f0, train_set.images, folder / "gap.safetensors", run.progress)
    else:
        attack = build_attack(name, **params)
    meta = {"attack": name, "params": params, "data": run.cfg.data.dataset}
    idx = pool_indices(cfg, len(train_set), pool_size)
    pool = craft(
        run,
        attack,
        f0,
        train_set.images[idx],
        train_set.labels[idx],
        idx,
        folder / "pool.advset",
        {**meta, "split": "train"},
    )
    test_idx = torch.arange(len(test_eval))
    static = craft(
        run, attack, f0, test_eval.images, test_eval.labels, test_idx, folder / "test.advset", {**meta, "split": "test"}
    )
    run.timed(f"attack-{name}", started)
    kill_point("after-attack")
    return AttackArtifacts(name, key, attack, pool, static)


def labeler_stage(run: Run, train_set: ImageDataset) -> KNNLabeler:
    cfg = run.cfg.labeler
    file = run.stage(f"labeler-{digest(run.cfg.data, cfg)}") / "labeler.safetensors"
    fitted = file.exists()
    barrier()  # every rank decides before rank 0 can write the file (the fit itself has no collective)
    if fitted:
        log.info("labeler: reused %s", file)
        return KNNLabeler.load(file, run.device)
    log.info("labeler: PCA-%d + %d-NN on %d clean training images", cfg.pca_dims, cfg.k, len(train_set))
    labeler = KNNLabeler(cfg.pca_dims, cfg.k, cfg.fooling_percentile, device=run.device, backend=cfg.backend)
    labeler.fit(train_set.images, train_set.labels)
    if is_main():
        labeler.save(file)
    barrier()
    kill_point("after-labeler")
    return labeler


def labels_for_retraining(run: Run, labeler: KNNLabeler, art: AttackArtifacts) -> torch.Tensor:
    if run.cfg.retrain.labels == "oracle":
        return art.pool.labels
    return labeler.predict(art.pool.adversarial)


def retrain_folder(run: Run, name: str, tag: str, n: int, key: str) -> Path:
    return run.stage(f"retrain-{name}{tag}-N{n}-{key}")


def retrain_stage(
    run: Run,
    parts: list[tuple[AttackArtifacts, torch.Tensor]],
    n: int,
    start: tuple[Path, str],
    train_set: ImageDataset,
    tag: str = "",
) -> tuple[Classifier, str]:
    """Train on the clean set + the first `n` images of each (pool, labels) in `parts`.

    One part is the paper's protocol; an arms race adds one part per round. `start` is the model fine-tuning starts
    from (its stage folder and key): the baseline in the first round, the previous round's model after it.
    """
    cfg = run.cfg
    name = parts[0][0].name
    key = digest(
        *(art.key for art, _ in parts), n, cfg.retrain.mode, cfg.retrain.labels, cfg.retrain.finetune_epochs, start[1]
    )
    folder = retrain_folder(run, name, tag, n, key)
    if run.finished(folder):
        log.info("retrain %s%s N=%d: reused %s", name, tag, n, folder)
        return load_model(folder, run.device), key
    # k-NN labels may add fooling classes
    classes = max(train_set.num_classes, *(int(labels[:n].max()) + 1 for _, labels in parts))
    names = train_set.classes + [f"fooling-{i}" for i in range(classes - train_set.num_classes)]
    mixed = ImageDataset(
        torch.cat([train_set.images.float() / 255, *(art.pool.adversarial[:n] for art, _ in parts)]),
        torch.cat([train_set.labels, *(labels[:n] for _, labels in parts)]),
        names,
        f"{train_set.source}+{name}[:{n}]x{len(parts)}",
    )
    log.info(
        "retrain %s%s N=%d: %s on %d clean + %d adversarial images → %s",
        name,
        tag,
        n,
        cfg.retrain.mode,
        len(train_set),
        n * len(parts),
        folder,
    )
    started = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    if cfg.retrain.mode == "scratch":
        model = cfg.model.build(classes, train_set.image_size)
        recipe = cfg.train
    else:
        model = load_model(start[0], "cpu")
        model = grow_head(model, classes - model.spec.num_classes) if classes > model.spec.num_classes else model
        recipe = cfg.train.model_copy(update={"epochs": cfg.retrain.finetune_epochs})
    fresh = cfg.retrain.mode == "scratch"
    result = train(model, mixed, recipe, run.device, folder, None, run.progress, cfg.compile, init=fresh)
    run.finish(folder, {"n": n})
    run.timed(f"retrain-{name}{tag}-N{n}", started)
    return result.model, key


def readapt(run: Run, art: AttackArtifacts, model: Classifier, train_set: ImageDataset, folder: Path) -> Any:
    """The attack rerun against `model`: white-box attacks as they are; GAP with its generator refitted."""
    if art.name == "gap":
        return fitted_gap(
            attack_params(run.cfg, "gap"), model, train_set.images, folder / "gap.safetensors", run.progress
        )
    return art.attack


def evaluate_stage(
    run: Run,
    art: AttackArtifacts,
    n: int,
    f1: Classifier,
    f1_key: str,
    train_set: ImageDataset,
    test_eval: ImageDataset,
    tag: str = "",
) -> dict[str, Any]:
    folder = run.stage(f"eval-{art.name}{tag}-N{n}-{f1_key}")
    if done := run.finished(folder):
        log.info("evaluate %s%s N=%d: reused %s", art.name, tag, n, folder)
        return done
    log.info("evaluate %s%s N=%d: clean, static adversarial, replay, adaptive, PGD", art.name, tag, n)
    started = time.perf_counter()
    clean = test_eval.images.float() / 255
    labels = test_eval.labels
    bs = run.cfg.train.eval_batch_size
    replay = attack_metrics(f1, clean, art.static.adversarial, labels, batch_size=bs)
    attack = readapt(run, art, f1, train_set, folder)
    # Crafted as a set on disk: sharded over ranks under torchrun, and resumable like the baseline's sets.
    meta = {"attack": art.name, "params": attack_params(run.cfg, art.name), "split": "test", "against": f1_key}
    everything = torch.arange(len(labels))
    adaptive_set = craft(run, attack, f1, test_eval.images, labels, everything, folder / "adaptive.advset", meta)
    targets = adaptive_set.targets if bool((adaptive_set.targets >= 0).all()) else None
    adaptive = attack_metrics(f1, clean, adaptive_set.adversarial, labels, targets, batch_size=bs)
    out: dict[str, Any] = {
        "n": n,
        "clean_accuracy": evaluate(f1, clean, labels, bs),
        "adversarial_accuracy": replay["adversarial_accuracy"],  # the static set crafted against f0
        "replay": replay,
        "adaptive": adaptive,
    }
    if run.cfg.pgd_eval:
        pgd = PGD(**attack_params(run.cfg, "pgd"))(f1, clean, labels)
        out["pgd_accuracy"] = float((predict(f1, pgd.adversarial, bs).argmax(1).cpu() == labels).float().mean())
    run.timed(f"eval-{art.name}{tag}-N{n}", started)
    return run.finish(folder, out)


def figure_data(run: Run, art: AttackArtifacts, f0: Classifier, test_eval: ImageDataset) -> None:
    """The few images the original-vs-adversarial figure shows, so that `advretrain report` can redraw it."""
    if not is_main():
        return
    k = min(run.cfg.figure_images, len(test_eval))
    pick = torch.linspace(0, len(test_eval) - 1, k).long()  # spread over the split, which is in class order
    clean = test_eval.images[pick].float() / 255
    adv = art.static.adversarial[pick]
    tensors = {
        "clean": clean,
        "adversarial": adv,
        "labels": test_eval.labels[pick],
        "clean_pred": predict(f0, clean).argmax(1).cpu(),
        "adv_pred": predict(f0, adv).argmax(1).cpu(),
    }
    if isinstance(art.attack, GAP) and art.attack.perturbation is not None:
        tensors["perturbation"] = art.attack.perturbation.cpu()
    save_safetensors(
        run.root / "figures" / f"{art.name}.safetensors", tensors, {"classes": json.dumps(test_eval.classes)}
    )


def initial_metrics(run: Run, model: Classifier, art: AttackArtifacts, test_eval: ImageDataset) -> dict[str, float]:
    """How well the attack fools the model it was crafted against, on the static test set."""
    targets = art.static.targets if bool((art.static.targets >= 0).all()) else None
    clean = test_eval.images.float() / 255
    return attack_metrics(
        model, clean, art.static.adversarial, test_eval.labels, targets, run.cfg.train.eval_batch_size
    )


def attack_experiment(
    run: Run,
    name: AttackName,
    f0: tuple[Classifier, str],
    labeler: KNNLabeler,
    fooling: torch.Tensor,
    train_set: ImageDataset,
    test_eval: ImageDataset,
) -> dict[str, Any]:
    """One attack's table: craft against f0, label, retrain at every N, evaluate; then the optional arms race."""
    cfg = run.cfg
    art = attack_stage(run, name, f0[0], f0[1], train_set, test_eval)
    report = label_report(
        labeler,
        (art.pool.adversarial, art.pool.labels, art.pool.indices),
        (art.static.adversarial, art.static.labels),
        (test_eval.images, test_eval.labels),
        fooling,
    )
    report.pop("seconds")
    labels = labels_for_retraining(run, labeler, art)
    figure_data(run, art, f0[0], test_eval)
    rows = []
    largest: tuple[Classifier, str] = f0
    baseline_folder = run.stage(f"baseline-{f0[1]}")
    for n in sorted(cfg.retrain.sizes[name], reverse=True):
        f1, f1_key = retrain_stage(run, [(art, labels)], n, (baseline_folder, f0[1]), train_set)
        rows.append(evaluate_stage(run, art, n, f1, f1_key, train_set, test_eval))
        largest = (f1, f1_key) if n == max(cfg.retrain.sizes[name]) else largest
    out: dict[str, Any] = {
        "params": attack_params(cfg, name),
        "initial": initial_metrics(run, f0[0], art, test_eval),
        "labels": report,
        "retrain": rows,
    }
    if cfg.retrain.rounds > 1:
        out["rounds"] = arms_race(run, name, [(art, labels)], largest, labeler, train_set, test_eval)
    return out


def arms_race(
    run: Run,
    name: AttackName,
    parts: list[tuple[AttackArtifacts, torch.Tensor]],
    defender: tuple[Classifier, str],
    labeler: KNNLabeler,
    train_set: ImageDataset,
    test_eval: ImageDataset,
) -> list[dict[str, Any]]:
    """Rounds 2..R: attack the last retrained model, retrain on clean + every round's N adversarials, evaluate."""
    n = max(run.cfg.retrain.sizes[name])
    rounds = []
    for r in range(2, run.cfg.retrain.rounds + 1):
        tag = f"-round{r}"
        previous = retrain_folder(run, name, "" if r == 2 else f"-round{r - 1}", n, defender[1])
        art = attack_stage(run, name, defender[0], defender[1], train_set, test_eval, f"the round-{r - 1} model")
        initial = initial_metrics(run, defender[0], art, test_eval)
        parts = [*parts, (art, labels_for_retraining(run, labeler, art))]
        defender = retrain_stage(run, parts, n, (previous, defender[1]), train_set, tag)
        row = evaluate_stage(run, art, n, defender[0], defender[1], train_set, test_eval, tag)
        rounds.append({"round": r, "initial": initial, "retrain": row})
    return rounds


def run_experiment(
    cfg: ExperimentConfig, root: Path, train_set: ImageDataset, test_set: ImageDataset, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the whole protocol; returns the results that `results.json` holds."""
    run = Run(root, cfg, init_distributed(resolve_device(cfg.device)), progress and is_main())
    check_sizes(cfg, train_set)
    # A seeded random subset in split order: the split is class-major, so its first images would be one class.
    n_eval = min(cfg.test_images or len(test_set), len(test_set))
    pick = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(cfg.train.seed + 2))[:n_eval]
    test_eval = test_set.subset(pick.sort().values)
    f0, f0_key = baseline(run, train_set, test_set)
    labeler = labeler_stage(run, train_set)
    fooling = noise_images(500, tuple(train_set.images.shape[1:]))  # type: ignore[arg-type]
    results: dict[str, Any] = {
        "dataset": cfg.data.dataset,
        "classes": train_set.num_classes,
        "model": cfg.model.name,
        "train_images": len(train_set),
        "test_images": len(test_eval),
        "baseline": {"test_accuracy": evaluate(f0, test_set.images, test_set.labels, cfg.train.eval_batch_size)},
        "retrain_mode": cfg.retrain.mode,
        "retrain_labels": cfg.retrain.labels,
        "attacks": {},
    }
    for name in cfg.attacks:
        results["attacks"][name] = attack_experiment(run, name, (f0, f0_key), labeler, fooling, train_set, test_eval)
    if is_main():
        write_json(root / "timings.json", run.timings)
    return results
