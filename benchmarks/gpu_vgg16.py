"""Benchmark: the paper's VGG16 recipe on CIFAR-10 on a GPU, its initial fooling ratios, and the protocol's cost there.

1. Times the training loop, then trains `configs/train-vgg16-cifar10.yaml`: for its 100 epochs when they fit
   `--train-budget` seconds at the measured speed, otherwise for as many epochs as fit (the cosine schedule then
   spans those; the output says so). Test accuracy against the paper's 92.37%.
2. Attacks the trained model as the paper does (its initial fooling ratios, METHOD.md 1.3): FGSM on the whole test
   set, DeepFool and C&W (the 9×1,000 profile) on `--attack-images` test images, GAP fitted for `--gap-epochs`.
3. Projects the paper-cifar10 protocol (benchmarks/project_protocol.py) from the rates measured here, with DeepFool's
   and C&W's gradient passes per image taken from step 2.

    python benchmarks/gpu_vgg16.py --data PATH/cifar10-jpeg.tar.gz --device cuda --json results.json
    python benchmarks/gpu_vgg16.py --data ... --attacks none --set train.lr=0.1   # a variant of the recipe alone
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from advretrain import ImageDataset, TrainJob, build_config, load_dataset, train
from advretrain.attacks import FGSM, GAP, AttackResult, CarliniWagnerL2, DeepFool
from advretrain.config import ExperimentConfig
from advretrain.metrics import attack_metrics
from advretrain.runtime.device import resolve_device

sys.path.insert(0, str(Path(__file__).parent))
from project_protocol import SHAPES, gradient_rate, labeler_rate, print_table, project, sync

PAPER = {"clean_accuracy": 0.9237, "gap": 0.82, "deepfool": 0.99, "cw": 1.00, "fgsm": 0.9282}  # METHOD.md 1.1, 1.3


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def calibrate(job: TrainJob, data: ImageDataset, device: torch.device) -> float:
    """Training images/s of the real loop: the second of two epochs over 40 batches (the first pays warm-up)."""
    n = min(40 * job.train.batch_size, len(data))  # any images do for a speed: the first n
    cfg = job.train.model_copy(update={"epochs": 2})
    model = job.model.build(data.num_classes, data.image_size)
    result = train(model, data.subset(torch.arange(n)), cfg, device, progress=False)
    return float(result.history[-1]["images_per_second"])


def attack_row(
    name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, result: AttackResult, seconds: float
) -> dict[str, float]:
    metrics = attack_metrics(model, x, result.adversarial, y, result.targets)
    row = {"images": float(len(y)), "seconds": seconds, "images_per_second": len(y) / seconds, **metrics}
    if result.iterations is not None:
        row["mean_iterations"] = float(result.iterations.float().mean())
    print(
        f"{name}: {len(y)} images in {seconds:.1f} s ({len(y) / seconds:.1f} img/s), fooling ratio "
        f"{metrics['fooling_ratio']:.4f} (paper {PAPER[name]:.2f}; 8-bit {metrics['fooling_ratio_8bit']:.4f}), "
        f"median L2 {metrics['l2_median']:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10: a name or path (e.g. the cifar10-jpeg archive)")
    parser.add_argument("--config", default="train-vgg16-cifar10")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (train.lr=0.1)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-budget", type=float, default=330, help="seconds of training allowed")
    parser.add_argument("--attack-images", type=int, default=1000, help="test images for DeepFool")
    parser.add_argument("--cw-images", type=int, default=256, help="test images for C&W (9 x 1,000)")
    parser.add_argument("--gap-epochs", type=int, default=3)
    parser.add_argument(
        "--attacks", default="fgsm,deepfool,gap,cw", help="comma list (none: training only); the projection needs all"
    )
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    # Checked before the training: a misspelt attack would otherwise be skipped silently at the end of a GPU lease.
    chosen = set() if args.attacks == "none" else set(args.attacks.split(","))
    if unknown := chosen - {"fgsm", "deepfool", "gap", "cw"}:
        parser.error(f"unknown attacks {sorted(unknown)}; choose from fgsm,deepfool,gap,cw or none")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    device = resolve_device(args.device)
    print(
        f"device {device}: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
        f"{torch.__version__}",
        flush=True,
    )
    job = build_config(TrainJob, args.config, [f"data.dataset={args.data}", *args.set])
    (train_set, test_set), load_s = timed(
        device, lambda: (load_dataset(args.data, "train"), load_dataset(args.data, "test"))
    )
    print(f"data: {len(train_set)} train / {len(test_set)} test images decoded in {load_s:.0f} s", flush=True)
    out: dict[str, Any] = {"device": str(device), "torch": torch.__version__}

    def record(key: str, value: Any) -> None:  # written after every stage: a late failure keeps what was measured
        out[key] = value
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    # 1. the recipe, shortened only if its epochs do not fit the budget at the measured speed
    rate = calibrate(job, train_set, device)
    fit = int(args.train_budget * rate / len(train_set))
    epochs = max(1, min(job.train.epochs, fit))
    print(
        f"training loop: {rate:.0f} images/s, so {job.train.epochs} epochs take "
        f"~{job.train.epochs * len(train_set) / rate:.0f} s; "
        f"running {epochs} epochs"
        + (
            ""
            if epochs == job.train.epochs
            else f" (the recipe's {job.train.epochs} do not fit {args.train_budget:.0f} s; cosine over {epochs})"
        ),
        flush=True,
    )
    cfg = job.train.model_copy(update={"epochs": epochs})
    torch.manual_seed(cfg.seed)
    model = job.model.build(train_set.num_classes, train_set.image_size)
    result, train_s = timed(device, lambda: train(model, train_set, cfg, device, test=test_set, progress=False))
    assert result.test_accuracy is not None
    later = result.history[1:] or result.history  # the first epoch pays warm-up
    train_rate = sum(h["images_per_second"] for h in later) / len(later)
    record(
        "train",
        {
            "epochs": epochs,
            "recipe_epochs": job.train.epochs,
            "seconds": train_s,
            "images_per_second": train_rate,
            "test_accuracy": result.test_accuracy,
            "config": cfg.model_dump(mode="json"),
            "history": result.history,
        },
    )
    print(
        f"{job.model.name}: {epochs} epochs in {train_s:.0f} s ({train_rate:.0f} img/s), test accuracy "
        f"{result.test_accuracy:.4f} (paper {PAPER['clean_accuracy']})",
        flush=True,
    )

    # 2. the paper's initial fooling ratios against this model
    model = model.to(device).eval()
    x_all, y_all = test_set.images.float().div(255).to(device), test_set.labels.to(device)
    pick = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))
    attacks: dict[str, dict[str, float]] = {}

    def craft(name: str, attack: Callable[..., AttackResult], count: int) -> None:
        idx = pick[:count].to(device)
        result, seconds = timed(device, lambda: attack(model, x_all[idx], y_all[idx]))
        attacks[name] = attack_row(name, model, x_all[idx], y_all[idx], result, seconds)
        record("attacks", attacks)

    if "fgsm" in chosen:
        craft("fgsm", FGSM(eps=0.07), len(test_set))
    deepfool = DeepFool()
    if "deepfool" in chosen:
        craft("deepfool", deepfool, args.attack_images)
    if "gap" in chosen:
        gap = GAP(lr=0.002, epochs=args.gap_epochs, batch_size=30)
        _, fit_s = timed(device, lambda: gap.fit(model, train_set.images))
        applied, s = timed(device, lambda: gap(model, x_all, y_all))
        print(f"gap: held-out fooling ratio per epoch {[h['holdout_fooling_ratio'] for h in gap.history]}")
        attacks["gap"] = attack_row("gap", model, x_all, y_all, applied, s)
        attacks["gap"] |= {"fit_seconds": fit_s, "fit_epochs": float(args.gap_epochs)}
        record("attacks", attacks)
    if "cw" in chosen:
        craft("cw", CarliniWagnerL2(), args.cw_images)  # the 9 x 1,000 profile
    if not {"deepfool", "cw"} <= set(attacks):
        return

    # 3. the paper-cifar10 protocol projected from these rates
    exp = build_config(ExperimentConfig, "paper-cifar10")
    _, _, size, classes = SHAPES["cifar10"]
    rates = {
        "train": train_rate,
        "gradient": gradient_rate(exp, size, classes, device, 256),
        "labeler": labeler_rate(exp, SHAPES["cifar10"], device),
    }
    passes = {  # gradients per image: DeepFool one per candidate per iteration, C&W one per Adam step
        "deepfool": attacks["deepfool"]["mean_iterations"] * deepfool.candidates,
        "cw": attacks["cw"]["mean_iterations"],
    }
    stages = project(exp, rates, passes, SHAPES["cifar10"])
    record("projection", {"rates": rates, "passes": passes, "stages_hours": {n: s / 3600 for n, s, _ in stages}})
    print(
        f"\npaper-cifar10 projected on this {device} ({rates['gradient']:.0f} gradient passes/s; passes per image: "
        f"DeepFool {passes['deepfool']:.1f}, C&W {passes['cw']:.0f}, measured above)"
    )
    print_table(stages, 1)


if __name__ == "__main__":
    main()
