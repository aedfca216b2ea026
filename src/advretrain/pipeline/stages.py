"""The protocol's stages, each a cached, resumable artifact in the run directory.

Every stage lives in a folder named by a hash of what it depends on and counts as finished only once its
`done.json` (or an adversarial set's `meta.json`) is written, last and atomically: `cached_stage` is that pattern
(reuse → compute → barrier → done marker → fault point), once. A rerun reuses finished stages, resumes training
from the last epoch and attacks from the last shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..advset import AdversarialSet, craft_adversarial_set, is_complete, load_adversarial_set
from ..attacks import ROBUSTNESS_ATTACK, AttackSpec, get_attack, slug
from ..checkpoint import (
    MODEL_FILE,
    checkpoint_file,
    file_digest,
    load_model,
    load_pretrained,
    save_model,
    train_resumable,
)
from ..config import ExperimentConfig, ModelConfig, TrainConfig
from ..data import ImageDataset, to_float
from ..labeler import KNNLabeler
from ..metrics import attack_metrics, evaluate, predict
from ..models import Classifier, grow_head
from ..results import RetrainRow
from ..runtime.distributed import barrier, is_main
from ..runtime.faults import kill_point
from ..runtime.io import read_safetensors, save_safetensors, save_state, write_json
from ..tracking import Tracker

log = logging.getLogger("advretrain.pipeline")
T = TypeVar("T")


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
    tracker: Tracker = field(default_factory=Tracker)  # curves and summaries, when the config tracks
    total: int = 0  # stages the protocol will pass through (protocol.stage_count), for "stage k/K"
    passed: int = 0
    started: float = field(default_factory=time.perf_counter)

    def stage(self, name: str) -> Path:
        return self.root / "stages" / name

    def step(self, what: str) -> None:
        """One line per stage over the whole run, `stage k/K: what (elapsed)`: where a long run is."""
        self.passed += 1
        elapsed = time.perf_counter() - self.started
        clock = f"{int(elapsed // 3600)}:{int(elapsed % 3600 // 60):02d}:{int(elapsed % 60):02d}"
        log.info("stage %d/%d: %s (%s elapsed)", self.passed, max(self.total, self.passed), what, clock)

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 2)


@dataclass(frozen=True)
class Trained:
    """A trained classifier as it travels between stages: the model, its stage key and its folder."""

    model: Classifier
    key: str
    folder: Path


def redo(run: Run, folder: Path) -> str:
    """How to repair a damaged file of a finished stage: the stage is computed again once its folder is gone."""
    return f"delete its stage folder {folder.name} and rerun `advretrain run --out {run.root}`"


def finished(folder: Path) -> dict[str, Any] | None:
    done = folder / "done.json"
    return json.loads(done.read_text()) if done.exists() else None


def cached_stage(
    run: Run,
    kind: str,
    label: str,
    folder: Path,
    compute: Callable[[], T],
    record: Callable[[T], dict[str, Any]],
    reuse: Callable[[dict[str, Any]], T],
) -> T:
    """The stage in `folder`: reused when its `done.json` exists, else computed and marked done.

    `record` (rank 0 only) writes what `reuse` reads back and returns the done marker's content; the fault point
    `after-{kind}` follows the marker.
    """
    run.step(label)
    done = finished(folder)
    barrier()  # every rank decides before rank 0 can mark the stage done
    if done is not None:
        log.info("%s: reused %s", label, folder)
        return reuse(done)
    started = time.perf_counter()
    value = compute()
    if is_main():
        write_json(folder / "done.json", record(value))
    barrier()
    kill_point(f"after-{kind}")
    run.timed(label.replace(" ", "-"), started)
    return value


def baseline(
    run: Run,
    train_set: ImageDataset,
    test_set: ImageDataset,
    model_cfg: ModelConfig | None = None,
    recipe: TrainConfig | None = None,
    role: str = "baseline",
) -> Trained:
    """A classifier trained on the clean training set: f0 (the config's model and recipe), or a surrogate."""
    cfg = run.cfg
    model_cfg, recipe = model_cfg or cfg.model, recipe or cfg.train
    given = model_cfg.checkpoint
    key = digest(cfg.data, model_cfg, recipe, *([file_digest(checkpoint_file(given))] if given else []))
    folder = run.stage(f"{role}-{key}")

    def compute() -> Classifier:
        torch.manual_seed(recipe.seed)  # before the build: the initial weights are the seed's
        model = model_cfg.build(train_set.num_classes, train_set.image_size)
        if given:  # the user's trained model: measured, and kept in the stage like one trained here
            log.info("%s: %s from %s (not trained here) → %s", role, model_cfg.name, given, folder)
            model = load_pretrained(given, model).to(run.device).eval()
            accuracy = evaluate(model, test_set.images, test_set.labels, recipe.eval_batch_size)
            if is_main():
                save_model(folder / MODEL_FILE, model, {"checkpoint": str(given)})
                write_json(folder / "metrics.json", {"test_accuracy": accuracy, "checkpoint": str(given)})
            return model
        log.info("%s: training %s on %d images → %s", role, model_cfg.name, len(train_set), folder)
        args = (run.device, folder, test_set, run.progress, cfg.compile)
        return train_resumable(model, train_set, recipe, *args, on_record=partial(run.tracker.epoch, role)).model

    def record(_: Classifier) -> dict[str, Any]:
        return {"test_accuracy": json.loads((folder / "metrics.json").read_text()).get("test_accuracy")}

    def reuse(_: dict[str, Any]) -> Classifier:
        return load_model(folder, run.device, builder=model_cfg.name)

    model = cached_stage(run, role, role, folder, compute, record, reuse)
    return Trained(model, key, folder)


def labeler_stage(run: Run, train_set: ImageDataset) -> KNNLabeler:
    cfg = run.cfg.labeler
    folder = run.stage(f"labeler-{digest(run.cfg.data, cfg)}")
    file = folder / "labeler.safetensors"

    def compute() -> KNNLabeler:
        log.info("labeler: PCA-%d + %d-NN on %d clean training images", cfg.pca_dims, cfg.k, len(train_set))
        labeler = KNNLabeler(cfg.pca_dims, cfg.k, cfg.fooling_percentile, device=run.device, backend=cfg.backend)
        labeler.fit(train_set.images, train_set.labels)
        kill_point("labeler-fit")
        return labeler

    def record(labeler: KNNLabeler) -> dict[str, Any]:
        save_state(file, labeler)
        return {"threshold": labeler.threshold}

    def reuse(_: dict[str, Any]) -> KNNLabeler:
        return KNNLabeler.from_state_dict(*read_safetensors(file, "labeler", redo(run, folder)), run.device)

    return cached_stage(run, "labeler", "labeler", folder, compute, record, reuse)


def fitted_attack(
    run: Run,
    spec: AttackSpec,
    model: Classifier,
    images: torch.Tensor,
    file: Path,
    values: dict[str, Any] | None = None,
) -> Any:
    """The attack built from `values` (default: the config's); a fitted one (GAP) fitted against `model`, or its
    state read from `file`."""
    values = run.cfg.attack.get(spec.name) if values is None else values
    attack = spec.build(values, progress=run.progress, on_epoch=lambda _: kill_point("fit-epoch"))
    if not spec.fitted:
        return attack
    exists = file.exists()
    barrier()  # every rank decides before rank 0 can write the file (a fit itself has no collective)
    if exists:
        return attack.load_state_dict(*read_safetensors(file, f"fitted {spec.name}", redo(run, file.parent)))
    attack.fit(model, images)
    if is_main():
        save_state(file, attack)
    barrier()
    return attack


def craft(
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


def retrain_sizes(cfg: ExperimentConfig, name: str, train_size: int) -> list[int]:
    """N for attack `name`: the config's, else the attack's default, else the whole training set."""
    return list(cfg.retrain.sizes.get(name) or get_attack(name).retrain_sizes or [train_size])


def pool_indices(cfg: ExperimentConfig, train_size: int, size: int) -> torch.Tensor:
    """A seeded random subset of the training images; every smaller N takes a prefix of it."""
    return torch.randperm(train_size, generator=torch.Generator().manual_seed(cfg.train.seed + 1))[:size]


def set_targets(spec: AttackSpec, adversarial_set: AdversarialSet) -> torch.Tensor | None:
    """A targeted attack's targets (success is then reaching them), else None."""
    return adversarial_set.targets if spec.targeted and bool((adversarial_set.targets >= 0).all()) else None


def set_queries(spec: AttackSpec, adversarial_set: AdversarialSet) -> torch.Tensor | None:
    """A query attack's queries per image (what it cost the attacker), else None."""
    counted = spec.threat == "query" and bool((adversarial_set.iterations >= 0).all())
    return adversarial_set.iterations if counted else None


def member_shares(spec: AttackSpec, adversarial_set: AdversarialSet) -> dict[str, float]:
    """An ensemble's (AutoAttack's) share of the images each member broke, by the member's name (the `members`
    setting the set was crafted with); {} for other attacks."""
    settings = spec.configure(adversarial_set.meta.get("params")).model_dump()
    names: tuple[str, ...] = tuple(settings.get("members", ()))
    member = adversarial_set.member
    return {f"broken_by_{name}": float((member == k).float().mean()) for k, name in enumerate(names) if len(member)}


@dataclass
class AttackArtifacts:
    spec: AttackSpec
    params: dict[str, Any]
    key: str
    attack: Any
    pool: AdversarialSet
    static: AdversarialSet

    @property
    def name(self) -> str:
        return self.spec.name


def attacked_set(
    run: Run, name: str, victim: Trained, train_set: ImageDataset, test_eval: ImageDataset
) -> tuple[Any, AdversarialSet]:
    """Attack `name` (the config's settings) against `victim` on the evaluated test images: the attack (a fitted one
    fitted on `victim`) and its set, one cached folder per (attack, victim) that every experiment shares — the
    static set of f0, the adaptive set of an f1, a cell of the cross-attack matrix are the same artifact."""
    spec = get_attack(name)
    params = spec.configure(run.cfg.attack.get(name)).model_dump(mode="json")
    folder = run.stage(f"against-{slug(name)}-{digest(name, params, victim.key, len(test_eval))}")
    attack = fitted_attack(run, spec, victim.model, train_set.images, folder / "fitted.safetensors")
    meta = {"attack": name, "params": params, "split": "test", "against": victim.key}
    everything = torch.arange(len(test_eval))
    crafted = craft(attack, victim.model, test_eval.images, test_eval.labels, everything, folder / "test.advset", meta)
    return attack, crafted


def attack_stage(
    run: Run, name: str, victim: Trained, train_set: ImageDataset, test_eval: ImageDataset, target: str = "the baseline"
) -> AttackArtifacts:
    """The attack against `victim`: a pool from the training images and the static set from the test images."""
    cfg, spec = run.cfg, get_attack(name)
    params = spec.configure(cfg.attack.get(name)).model_dump(mode="json")
    pool_size = max(retrain_sizes(cfg, name, len(train_set)))
    key = digest(name, params, victim.key, pool_size, len(test_eval))
    folder = run.stage(f"attack-{slug(name)}-{key}")
    run.step(f"attack {name} against {target}")
    log.info("attack %s: against %s (pool %d training images, %d test images)", name, target, pool_size, len(test_eval))
    started = time.perf_counter()
    attack, static = attacked_set(run, name, victim, train_set, test_eval)
    meta = {"attack": name, "params": params, "data": cfg.data.dataset, "split": "train", "against": victim.key}
    idx = pool_indices(cfg, len(train_set), pool_size)
    pool = craft(attack, victim.model, train_set.images[idx], train_set.labels[idx], idx, folder / "pool.advset", meta)
    run.timed(f"attack-{slug(name)}", started)
    kill_point("after-attack")
    return AttackArtifacts(spec, params, key, attack, pool, static)


def mixed_training_set(
    train_set: ImageDataset, parts: list[tuple[AttackArtifacts, torch.Tensor]], n: int
) -> ImageDataset:
    """The clean training set + the first `n` adversarials of each (pool, labels); k-NN labels may add classes."""
    classes = max(train_set.num_classes, *(int(labels[:n].max()) + 1 for _, labels in parts))
    names = train_set.classes + [f"fooling-{i}" for i in range(classes - train_set.num_classes)]
    return ImageDataset(
        torch.cat([to_float(train_set.images), *(art.pool.adversarial[:n] for art, _ in parts)]),
        torch.cat([train_set.labels, *(labels[:n] for _, labels in parts)]),
        names,
        f"{train_set.source}+{parts[0][0].name}[:{n}]x{len(parts)}",
    )


def retrain_stage(
    run: Run,
    parts: list[tuple[AttackArtifacts, torch.Tensor]],
    n: int,
    start: Trained,
    train_set: ImageDataset,
    tag: str = "",
) -> Trained:
    """Train on the clean set + the first `n` images of each (pool, labels) in `parts`.

    One part is the paper's protocol; an arms race adds one part per round. `start` is the model fine-tuning starts
    from: the baseline in the first round, the previous round's model after it.
    """
    cfg, name = run.cfg, parts[0][0].name
    retrain = cfg.retrain
    lr = (retrain.finetune_lr,) if retrain.mode == "finetune" else ()  # (a scratch run's key as before it existed)
    key = digest(
        *(art.key for art, _ in parts), n, retrain.mode, retrain.labels, retrain.finetune_epochs, start.key, *lr
    )
    folder = run.stage(f"retrain-{slug(name)}{tag}-N{n}-{key}")
    label = f"retrain {name}{tag} N={n}"

    def compute() -> Classifier:
        mixed = mixed_training_set(train_set, parts, n)
        log.info(
            "%s: %s on %d clean + %d adversarial images → %s",
            label,
            retrain.mode,
            len(train_set),
            n * len(parts),
            folder,
        )
        return retrained_model(run, mixed, start, folder, label)

    def reuse(_: dict[str, Any]) -> Classifier:
        return load_model(folder, run.device, builder=cfg.model.name)

    model = cached_stage(run, "retrain", label, folder, compute, lambda _: {"n": n}, reuse)
    return Trained(model, key, folder)


def retrained_model(run: Run, mixed: ImageDataset, start: Trained, folder: Path, label: str) -> Classifier:
    """A model trained on `mixed` (clean + added images): from scratch with the recipe (the paper), or `start`
    fine-tuned, its head grown by any new classes `mixed` brings (the old classes' weights kept)."""
    cfg = run.cfg
    torch.manual_seed(cfg.train.seed)
    if cfg.retrain.mode == "scratch":
        model, recipe = cfg.model.build(mixed.num_classes, mixed.image_size), cfg.train
    else:
        model = load_model(start.folder, "cpu", builder=cfg.model.name)
        extra = mixed.num_classes - model.spec.num_classes
        model = grow_head(model, extra) if extra > 0 else model
        recipe = cfg.train.finetuning(cfg.retrain.finetune_epochs, cfg.retrain.finetune_lr)
    args = (run.device, folder, None, run.progress, cfg.compile, cfg.retrain.mode == "scratch")
    return train_resumable(model, mixed, recipe, *args, on_record=partial(run.tracker.epoch, label)).model


def evaluate_stage(
    run: Run, art: AttackArtifacts, n: int, f1: Trained, train_set: ImageDataset, test_eval: ImageDataset, tag: str = ""
) -> RetrainRow:
    """f1 on clean test images, on the static set (replay), under the attack rerun against it, and under PGD."""
    folder = run.stage(f"eval-{slug(art.name)}{tag}-N{n}-{f1.key}")

    def compute() -> RetrainRow:
        log.info("evaluate %s%s N=%d: clean, static adversarial, replay, adaptive, PGD", art.name, tag, n)
        clean, labels, bs = to_float(test_eval.images), test_eval.labels, run.cfg.train.eval_batch_size
        replay = attack_metrics(f1.model, clean, art.static.adversarial, labels, batch_size=bs)
        # The attack rerun against f1 (a fitted one, GAP, refitted): the set every experiment shares.
        _, adaptive_set = attacked_set(run, art.name, f1, train_set, test_eval)
        adv = adaptive_set.adversarial
        adaptive = attack_metrics(
            f1.model, clean, adv, labels, set_targets(art.spec, adaptive_set), bs, set_queries(art.spec, adaptive_set)
        )
        return RetrainRow(
            n,
            evaluate(f1.model, clean, labels, bs),
            replay["adversarial_accuracy"],
            replay,
            adaptive,
            pgd_accuracy(run, f1.model, clean, labels) if run.cfg.pgd_eval else None,
        )

    return cached_stage(
        run, "eval", f"evaluate {art.name}{tag} N={n}", folder, compute, RetrainRow.to_dict, RetrainRow.from_dict
    )


def pgd_accuracy(run: Run, model: Classifier, clean: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy under the standard robustness check (PGD): does the model resist, or only mask its gradients?"""
    pgd = get_attack(ROBUSTNESS_ATTACK).build(run.cfg.attack.get(ROBUSTNESS_ATTACK))
    adversarial = pgd(model, clean, labels).adversarial
    return float((predict(model, adversarial, run.cfg.train.eval_batch_size).argmax(1).cpu() == labels).float().mean())


def figure_data(run: Run, art: AttackArtifacts, f0: Classifier, test_eval: ImageDataset) -> None:
    """The few images the original-vs-adversarial figure shows, so that `advretrain report` can redraw it."""
    if not is_main():
        return
    k = min(run.cfg.figure_images, len(test_eval))
    pick = torch.linspace(0, len(test_eval) - 1, k).long()  # spread over the split, which is in class order
    clean = to_float(test_eval.images[pick])
    adv = art.static.adversarial[pick]
    tensors = {
        "clean": clean,
        "adversarial": adv,
        "labels": test_eval.labels[pick],
        "clean_pred": predict(f0, clean).argmax(1).cpu(),
        "adv_pred": predict(f0, adv).argmax(1).cpu(),
    }
    universal = getattr(art.attack, "perturbation", None)  # a universal attack's one perturbation: 1×C×H×W
    if isinstance(universal, torch.Tensor):
        tensors["perturbation"] = universal.cpu()
    metadata = {"classes": json.dumps(test_eval.classes), "title": art.spec.title}
    save_safetensors(run.root / "figures" / f"{slug(art.name)}.safetensors", tensors, metadata)


def initial_metrics(run: Run, model: Classifier, art: AttackArtifacts, test_eval: ImageDataset) -> dict[str, float]:
    """How well the attack fools the model it was crafted against, on the static test set."""
    clean = to_float(test_eval.images)
    targets = set_targets(art.spec, art.static)
    return attack_metrics(
        model, clean, art.static.adversarial, test_eval.labels, targets, run.cfg.train.eval_batch_size
    )
