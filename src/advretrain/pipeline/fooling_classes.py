"""The paper's second branch, which it describes (its Figure 1) but never runs (METHOD.md 2.5): fooling images.

Fooling images (Nguyen et al. 2015) are generated against f0 for every original class; the labeler flags those far
from all clean data (PCA residual, METHOD.md 3.1) and k-means groups the flagged ones into `fooling.classes` new
classes; f1 is retrained on clean + half of them with the grown head (the other half is held out); then fresh fooling
images are generated against f1, aimed only at the original classes. The claim under test: a new class absorbs
fooling images (Nguyen et al. found on MNIST that it did not stop new ones).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..data import ImageDataset, to_float
from ..fooling import fooling_images
from ..labeler import KNNLabeler
from ..metrics import evaluate, predict
from .stages import AttackArtifacts, Run, Trained, cached_stage, digest, retrained_model

log = logging.getLogger("advretrain.pipeline")


def generate(
    run: Run, model: Trained, classes: int, shape: tuple[int, int, int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fooling.per_class` images aimed at each of the first `classes` classes: (N×C×H×W on the CPU, reached N)."""
    cfg = run.cfg.fooling
    targets = torch.arange(classes).repeat_interleave(cfg.per_class)
    images, reached = fooling_images(
        model.model, targets, shape, steps=cfg.steps, step_size=cfg.step_size, confidence=cfg.confidence, seed=seed
    )
    return images.cpu(), reached.cpu()


def flag_rate(labeler: KNNLabeler, images: torch.Tensor) -> float:
    """The share the labeler sends to a fooling class (its PCA residual above the threshold)."""
    return float((labeler.predict(images) >= labeler.num_classes).float().mean()) if len(images) else float("nan")


def to_fooling_class(model: Trained, images: torch.Tensor, classes: int, bs: int) -> float:
    """The share of `images` the model classifies into a class beyond the original `classes`."""
    return float((predict(model.model, images, bs).argmax(1).cpu() >= classes).float().mean())


def fooling_experiment(
    run: Run,
    f0: Trained,
    labeler: KNNLabeler,
    arts: list[AttackArtifacts],
    train_set: ImageDataset,
    test_set: ImageDataset,
    test_eval: ImageDataset,
) -> dict[str, Any]:
    """Generate, flag, cluster, retrain, and attack again; returns the numbers of the "Fooling images" table."""
    cfg, seed, bs = run.cfg.fooling, run.cfg.train.seed, run.cfg.train.eval_batch_size
    c = train_set.num_classes
    shape: tuple[int, int, int] = tuple(train_set.images.shape[1:])  # type: ignore[assignment]
    retrain = run.cfg.retrain
    lr = (retrain.finetune_lr,) if retrain.mode == "finetune" else ()
    key = digest(cfg, f0.key, run.cfg.labeler, retrain.mode, retrain.finetune_epochs, *lr)
    folder = run.stage(f"fooling-{key}")

    def compute() -> dict[str, Any]:
        log.info("fooling images: %d per class against f0, %d new class(es) → %s", cfg.per_class, cfg.classes, folder)
        images, reached = generate(run, f0, c, shape, seed)
        train_part, held = images[0::2], images[1::2]  # alternate: both halves cover every class
        clustering = KNNLabeler.from_state_dict(*labeler.state_dict(), labeler.device)
        clustering.fooling_clusters = cfg.classes
        labels = clustering.predict(train_part)  # flagged → c, c+1, ... (k-means); the rest their 1-NN class
        grown = max(c, int(labels.max()) + 1)
        names = train_set.classes + [f"fooling-{i}" for i in range(grown - c)]
        mixed = ImageDataset(
            torch.cat([to_float(train_set.images), train_part]),
            torch.cat([train_set.labels, labels]),
            names,
            f"{train_set.source}+fooling",
        )
        f1 = Trained(retrained_model(run, mixed, f0, folder, "retrain with fooling classes"), key, folder)
        fresh, fresh_reached = generate(run, f1, c, shape, seed + 1)  # aimed at the original classes only
        adversarial = torch.cat([art.static.adversarial for art in arts]) if arts else images[:0]
        return {
            "per_class": cfg.per_class,
            "confidence": cfg.confidence,
            "classes": grown - c,
            "generated": len(images),
            "reached_f0": float(reached.float().mean()),
            "flagged_train": int((labels >= c).sum()),
            "flag_rate_clean": flag_rate(labeler, to_float(test_eval.images)),
            "flag_rate_adversarial": flag_rate(labeler, adversarial),
            "flag_rate_fooling": flag_rate(labeler, held),
            "f0_accuracy": evaluate(f0.model, test_set.images, test_set.labels, bs),
            "f1_accuracy": evaluate(f1.model, test_set.images, test_set.labels, bs),
            "held_out_to_fooling": to_fooling_class(f1, held, c, bs),
            "fresh_reached": float(fresh_reached.float().mean()),
            "fresh_to_fooling": to_fooling_class(f1, fresh, c, bs),
        }

    return cached_stage(
        run, "fooling", "fooling images", folder, compute, lambda r: {"results": r}, lambda d: d["results"]
    )
