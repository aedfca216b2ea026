"""Benchmark: what a protocol will cost on this machine, before launching it.

Measures, on synthetic images of the protocol's size: the training loop's images/s (the config's model, recipe and
batch size), the input-gradient passes/s the attacks are made of (forward + backward, eval mode, float32, the
attacks' batch size), and the labeler's PCA fit and 1-NN search. Then counts what the protocol asks of each stage
(trainings × epochs × images; attacked images × gradient passes per image) and prints the projected wall time per
stage and in total, for one process and for P processes under torchrun (training and attack generation split over
ranks, GAP fitting too; PGD and the labeler repeated on each).

Gradient passes per image: FGSM 1, PGD `steps`, GAP `epochs` per training image; DeepFool `candidates` × its mean
iterations and C&W its mean Adam steps — measured on real images with a trained model when `--checkpoint` and
`--data` are given, otherwise assumed (DeepFool 3 iterations; C&W the full budget, an upper bound).

    python benchmarks/project_protocol.py --config paper-cifar10 --device cuda --processes 8
    python benchmarks/project_protocol.py --config cpu-quick --checkpoint RUN/stages/baseline-*/ --data cifar10
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F

from advretrain import build_config, load_dataset, load_model
from advretrain.attacks import ATTACKS, CarliniWagnerL2, DeepFool
from advretrain.config import ExperimentConfig, TrainConfig
from advretrain.data import ImageDataset
from advretrain.labeler import fit_pca, knn
from advretrain.pipeline.stages import retrain_sizes
from advretrain.runtime.device import resolve_device
from advretrain.train import train

# (train images, test images, image size, classes) of the named datasets
SHAPES = {
    "cifar10": (50_000, 10_000, 32, 10),
    "cifar10-sample": (5_000, 1_000, 32, 10),
    "tinyimagenet": (100_000, 10_000, 64, 200),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(cfg: ExperimentConfig, size: int, classes: int, device: torch.device) -> float:
    """Images/s of the real training loop (second epoch: the first pays for warm-up)."""
    n = cfg.train.batch_size * (20 if device.type == "cuda" else 4)
    data = ImageDataset(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n) % classes, [])
    recipe: TrainConfig = cfg.train.model_copy(update={"epochs": 2})
    result = train(cfg.model.build(classes, size), data, recipe, device, progress=False)
    return float(result.history[-1]["images_per_second"])


def gradient_rate(cfg: ExperimentConfig, size: int, classes: int, device: torch.device, batch: int) -> float:
    """Input-gradient passes per second (images × passes / s) at the attacks' batch size, float32, eval mode."""
    model = cfg.model.build(classes, size).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.arange(batch, device=device) % classes
    reps = 10 if device.type == "cuda" else 3
    for i in range(reps + 1):
        if i == 1:  # the first pass is warm-up
            sync(device)
            started = time.perf_counter()
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
        x = (x.detach() + 1e-3 * grad.sign()).clamp(0, 1)
    sync(device)
    return batch * reps / (time.perf_counter() - started)


def measured_passes(cfg: ExperimentConfig, checkpoint: str, data: str, device: torch.device) -> dict[str, float]:
    """Mean gradient passes per image of DeepFool and C&W on 64 real test images of a trained model."""
    model = load_model(checkpoint, device)
    test = load_dataset(data, "test", image_size=model.spec.image_size).stratified(7)
    x, y = test.images[:64].float().div(255).to(device), test.labels[:64].to(device)
    df = DeepFool(**dict(cfg.attack.deepfool))
    cw = CarliniWagnerL2(**dict(cfg.attack.cw))
    df_iters = df(model, x, y).iterations
    cw_iters = cw(model, x, y).iterations
    assert df_iters is not None and cw_iters is not None
    return {"deepfool": float(df_iters.float().mean()) * df.candidates, "cw": float(cw_iters.float().mean())}


def labeler_seconds(train_n: int, queries: int, dims: int, pixels: int, device: torch.device) -> float:
    """PCA fit (measured on up to 20,000 rows; its N·D² part scaled to train_n) + projection + 1-NN search."""
    rows = min(train_n, 20_000)
    x = torch.rand(rows, pixels, device=device)
    sync(device)
    started = time.perf_counter()
    mean, components = fit_pca(x, dims)
    sync(device)
    fit = (time.perf_counter() - started) * train_n / rows
    refs = torch.rand(train_n, dims, device=device)
    q = (torch.rand(min(queries, 5_000), pixels, device=device) - mean) @ components
    sync(device)
    started = time.perf_counter()
    knn(q, refs, 1)
    sync(device)
    return fit + (time.perf_counter() - started) * queries / q.shape[0]


def labeler_rate(cfg: ExperimentConfig, shape: tuple[int, int, int, int], device: torch.device) -> float:
    """The labeler's seconds in the protocol: PCA on the training set, 1-NN for every crafted pool and test set."""
    train_n, test_n, size, classes = shape
    queries = sum(max(cfg.retrain.sizes[a]) + min(test_n, cfg.test_images or test_n) for a in cfg.attacks)
    train_n = train_n if not cfg.data.train_per_class else min(train_n, cfg.data.train_per_class * classes)
    return labeler_seconds(train_n, queries, cfg.labeler.pca_dims, 3 * size * size, device)


def print_table(stages: list[tuple[str, float, bool]], processes: int) -> None:
    p = max(1, processes)
    print(f"\n| stage | 1 process | {p} processes |\n|---|---|---|")
    for name, seconds, split in stages:
        print(f"| {name} | {seconds / 3600:.2f} h | {seconds / (p if split else 1) / 3600:.2f} h |")
    one = sum(s for _, s, _ in stages)
    many = sum(s / (p if split else 1) for _, s, split in stages)
    print(f"| **total** | **{one / 3600:.2f} h** | **{many / 3600:.2f} h** |")


def project(
    cfg: ExperimentConfig, rates: dict[str, float], passes: dict[str, float], shape: tuple[int, ...]
) -> list[tuple[str, float, bool]]:
    """(stage, seconds on one process, whether torchrun splits it over ranks)."""
    train_n, test_n, _, classes = shape
    if cfg.data.train_per_class:
        train_n = min(train_n, cfg.data.train_per_class * classes)
    test_n = min(test_n, cfg.test_images or test_n)
    epochs, t, g = cfg.train.epochs, rates["train"], rates["gradient"]
    stages = [("baseline training", epochs * train_n / t, True)]
    pgd_steps = int(ATTACKS["pgd"].configure(cfg.attack.get("pgd")).model_dump()["steps"])
    gap_epochs = int(ATTACKS["gap"].configure(cfg.attack.get("gap")).model_dump()["epochs"])
    for name in cfg.attacks:
        sizes = retrain_sizes(cfg, name, train_n)
        per_image = {"fgsm": 1.0, "deepfool": passes["deepfool"], "cw": passes["cw"]}.get(name, 1.0)
        crafted = max(sizes) + test_n + len(sizes) * test_n  # pool, static test set, one adaptive set per N
        stages.append((f"{name}: crafting {crafted} images", crafted * per_image / g, True))
        if name == "gap":
            stages.append(
                (f"gap: fitting the generator {1 + len(sizes)}×", (1 + len(sizes)) * gap_epochs * train_n / g, True)
            )
        stages.append((f"{name}: {len(sizes)} retrainings", sum(epochs * (train_n + n) / t for n in sizes), True))
        if cfg.pgd_eval:
            stages.append((f"{name}: PGD evaluation", len(sizes) * test_n * pgd_steps / g, False))
    stages.append(("labeler: PCA fit + 1-NN of every crafted set", rates["labeler"], False))
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper-cifar10")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--processes", type=int, default=1, help="torchrun processes to project for")
    parser.add_argument("--checkpoint", help="a trained model, to measure DeepFool's and C&W's passes per image")
    parser.add_argument("--data", help="its dataset (name or path)")
    args = parser.parse_args()
    cfg = build_config(ExperimentConfig, args.config)
    device = resolve_device(args.device)
    shape = SHAPES.get(cfg.data.dataset, SHAPES["cifar10"])
    _, _, size, classes = shape
    attack_batch = int(cfg.attack.cw.get("batch_size", 256))
    rates: dict[str, Any] = {
        "train": train_rate(cfg, size, classes, device),
        "gradient": gradient_rate(cfg, size, classes, device, attack_batch),
    }
    rates["labeler"] = labeler_rate(cfg, shape, device)
    if args.checkpoint and args.data:
        passes = measured_passes(cfg, args.checkpoint, args.data, device)
        how = "measured on 64 real test images"
    else:
        passes = {
            "deepfool": 3.0 * int(cfg.attack.deepfool.get("candidates", 10)),
            "cw": float(int(cfg.attack.cw["binary_search_steps"]) * int(cfg.attack.cw["steps"])),
        }
        how = "assumed (DeepFool 3 iterations, C&W its full budget)"
    print(
        f"{args.config} on {device} ({torch.get_num_threads()} threads): {cfg.model.name}, {size}px, {classes} classes"
    )
    print(
        f"training {rates['train']:.0f} images/s; attack gradient passes {rates['gradient']:.0f} images/s "
        f"(batch {attack_batch}); passes per image: DeepFool {passes['deepfool']:.1f}, C&W {passes['cw']:.0f} ({how})"
    )
    print_table(project(cfg, rates, passes, shape), args.processes)


if __name__ == "__main__":
    main()
