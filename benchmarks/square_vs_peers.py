"""Benchmark: advretrain's Square against torchattacks' Square and ART's SquareAttack, on one model, the same
correctly classified CIFAR-10 test images, norm, ε and query budget (margin loss, p_init 0.8, one restart).

Prints, per library and seed: images/s, success rate (the share of the correctly classified images it
misclassifies), the largest perturbation's norm, and (ours) mean and median queries of the fooled images; then, per
library, the mean and spread of the success rate over the seeds. One seed's success is one draw of windows and signs:
at 200 images its standard error is about 3 points, so two libraries are compared over several seeds (--seeds).
Every library gets the same budget of model queries per image, the initial stripes included (the peers count only
their window steps, so they are given one step fewer). Without --checkpoint the default run's baseline recipe trains
a small CNN on the bundled sample first (about 55% accuracy, a few seconds a epoch).
Peers: `pip install adversarial-robustness-toolbox packaging scipy` and `pip install --no-deps torchattacks`.

    python benchmarks/square_vs_peers.py --images 200 --queries 1000 --seeds 3
    python benchmarks/square_vs_peers.py --norm l2 --eps 0.5 --images 200 --queries 1000 --seeds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from advretrain import ExperimentConfig, build_config, build_model, load_dataset, load_model, train
from advretrain.attacks import Square
from advretrain.metrics import norms, predict

Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def baseline(checkpoint: str | None) -> nn.Module:
    if checkpoint:
        return load_model(checkpoint)
    cfg = build_config(ExperimentConfig, "default").train
    torch.manual_seed(0)
    data = load_dataset("cifar10-sample", "train").stratified(150)
    return train(build_model("small", 10), data, cfg, torch.device("cpu"), progress=False).model


def runners(norm: Literal["linf", "l2"], eps: float, queries: int, seed: int) -> dict[str, Runner]:
    def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        result = Square(eps=eps, max_queries=queries, norm=norm, seed=seed)(model, x, y)
        assert result.iterations is not None
        fooled = result.iterations[result.success].double()
        if fooled.numel():
            print(f"  advretrain queries of fooled images: mean {fooled.mean():.1f}, median {fooled.median():.0f}")
        return result.adversarial

    def torchattacks_square(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torchattacks

        # n_queries counts window steps after the initial stripes: queries - 1 of them make `queries` in all
        attack = torchattacks.Square(
            model,
            norm={"linf": "Linf", "l2": "L2"}[norm],
            eps=eps,
            n_queries=queries - 1,
            p_init=0.8,
            loss="margin",
            seed=seed,
        )
        return attack(x, y)  # type: ignore[no-any-return]

    def art_square(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from art.attacks.evasion import SquareAttack
        from art.estimators.classification import PyTorchClassifier

        classifier = PyTorchClassifier(
            model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10, clip_values=(0.0, 1.0)
        )
        np.random.seed(seed)  # ART draws from numpy's and Python's global generators
        random.seed(seed)
        attack = SquareAttack(
            classifier,
            norm=np.inf if norm == "linf" else 2,
            eps=eps,
            max_iter=queries - 1,
            p_init=0.8,
            batch_size=len(x),
        )
        attack.verbose = False
        return torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))

    return {"advretrain": ours, "torchattacks": torchattacks_square, "ART": art_square}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model.safetensors (default: train the default recipe's small CNN)")
    parser.add_argument("--data", default="cifar10-sample")
    parser.add_argument("--images", type=int, default=200, help="correctly classified test images attacked")
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
    parser.add_argument("--eps", type=float, default=8 / 255, help="the bound (L-inf default 8/255; L2: say 0.5)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=1, help="attack seeds 0..K-1 per library")
    parser.add_argument("--libraries", default="advretrain,torchattacks,ART")
    args = parser.parse_args()
    model = baseline(args.checkpoint).eval()
    test = load_dataset(args.data, "test").stratified(100)
    x_all, y_all = test.images.float() / 255, test.labels
    correct = predict(model, x_all).argmax(1) == y_all
    x, y = x_all[correct][: args.images], y_all[correct][: args.images]
    print(
        f"{len(y)} correctly classified test images of {args.data}, {args.norm} eps {args.eps:.5f}, "
        f"{args.queries} queries"
    )
    names = args.libraries.split(",")
    successes: dict[str, list[float]] = {name: [] for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for seed in range(args.seeds):
        library = runners(args.norm, args.eps, args.queries, seed)
        for name in names:
            started = time.perf_counter()
            adv = library[name](model, x.clone(), y.clone()).detach().float()
            seconds = time.perf_counter() - started
            success = float((predict(model, adv).argmax(1) != y).float().mean())
            l2, linf = norms(x, adv)
            size = float(linf.amax() * 255 if args.norm == "linf" else l2.amax())
            successes[name].append(success)
            rates[name].append(len(y) / seconds)
            print(
                f"{name:13s} seed {seed}  {len(y) / seconds:8.1f} images/s  success {success:.4f}  "
                f"largest {args.norm} {size:.3f}" + ("/255" if args.norm == "linf" else ""),
                flush=True,
            )
    for name in names:
        spread = statistics.stdev(successes[name]) if len(successes[name]) > 1 else float("nan")
        print(
            f"{name:13s} over {args.seeds} seed(s): success {statistics.mean(successes[name]):.4f} "
            f"(sd {spread:.4f}, min {min(successes[name]):.4f}, max {max(successes[name]):.4f}), "
            f"{statistics.mean(rates[name]):.1f} images/s"
        )


if __name__ == "__main__":
    main()
