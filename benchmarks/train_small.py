"""Benchmark: the `small` model on full CIFAR-10 on this machine's CPU.

Measures (1) the images/s of advretrain's training loop against a plain PyTorch loop (DataLoader over a
TensorDataset, per-sample crop + flip, same model, optimiser and batch size), and (2) the test accuracy and wall
time of a full training run with configs/train-small-cifar10.yaml.

    python benchmarks/train_small.py --data ../shared/datasets/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from advretrain import TrainJob, build_config, evaluate, load_dataset, train, train_resumable
from advretrain.runtime.device import resolve_device
from advretrain.train import make_optimizer


class PlainAugmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The usual per-sample pipeline: pad, random crop, random flip, to float."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(self.images[i], (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        x = x[:, dy : dy + 32, dx : dx + 32]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.float() / 255, self.labels[i]


def plain_loop_images_per_second(job: TrainJob, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model = job.model.build(10)
    optimizer = make_optimizer(model, job.train)
    loader = DataLoader(PlainAugmented(images, labels), batch_size=job.train.batch_size, shuffle=True, drop_last=True)
    model.train()
    seen, started = 0, 0.0
    for i, (x, y) in enumerate(loader):
        if i == 2:  # warm-up steps excluded, as for ours
            started, seen = time.perf_counter(), 0
        loss = F.cross_entropy(model(x), y, label_smoothing=job.train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        if i == steps + 1:
            break
    return seen / (time.perf_counter() - started)


def ours_images_per_second(job: TrainJob, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    from advretrain import ImageDataset

    n = job.train.batch_size * (steps + 2)
    subset = ImageDataset(images[:n], labels[:n], [str(i) for i in range(10)])
    cfg = job.train.model_copy(update={"epochs": 1, "progressive_sizes": []})  # full-size images, as the plain loop
    torch.manual_seed(0)
    result = train(job.model.build(10), subset, cfg, torch.device("cpu"), progress=False)
    return result.history[0]["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10", help="cifar10 or a path (e.g. the cifar10-jpeg archive)")
    parser.add_argument("--config", default="configs/train-small-cifar10.yaml")
    parser.add_argument("--steps", type=int, default=40, help="steps timed for the loop comparison")
    parser.add_argument("--skip-full", action="store_true", help="only the loop comparison")
    parser.add_argument("--skip-loop", action="store_true", help="only the full run")
    parser.add_argument("--out", help="keep the fully trained model here (a training folder)")
    args = parser.parse_args()
    job = build_config(TrainJob, args.config, [f"data.dataset={args.data}"])
    train_set, test_set = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    if not args.skip_loop:
        plain = plain_loop_images_per_second(job, train_set.images, train_set.labels, args.steps)
        ours = ours_images_per_second(job, train_set.images, train_set.labels, args.steps)
        print(
            f"loop throughput, {args.steps} steps of {job.train.batch_size}: advretrain {ours:.0f} img/s, "
            f"plain PyTorch loop {plain:.0f} img/s ({ours / plain:.2f}x)"
        )
    if args.skip_full:
        return
    torch.manual_seed(job.train.seed)
    started = time.perf_counter()
    model = job.model.build(train_set.num_classes)
    out = Path(args.out) if args.out else None
    result = train_resumable(
        model, train_set, job.train, resolve_device(job.device), out, test=test_set, progress=False
    )
    seconds = time.perf_counter() - started
    for h in result.history:
        print(
            f"  epoch {h['epoch']:.0f}: {h['seconds']:.0f} s, loss {h['loss']:.3f}, train acc {h['train_accuracy']:.4f}"
        )
    print(
        f"full run: {job.train.epochs} epochs in {seconds:.0f} s, test accuracy {result.test_accuracy:.4f} "
        f"on {len(test_set)} images ({torch.get_num_threads()} threads)"
    )
    if result.model.spec.flip_average:  # the same weights on the image alone, to show what the averaging adds
        result.model.spec = replace(result.model.spec, flip_average=False)
        alone = evaluate(result.model, test_set.images, test_set.labels)
        print(f"  that accuracy averages each image with its mirror; on the image alone: {alone:.4f}")


if __name__ == "__main__":
    main()
