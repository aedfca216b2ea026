"""Benchmark: how much of a test set can ONE universal L-inf perturbation fool, optimised directly (no generator)?

    python benchmarks/uap_ceiling.py --checkpoint <model> --data <cifar10-jpeg.tar.gz> --eps 10,20,44

GAP reparameterises one universal pattern U through a generator fed a fixed noise input, so its fooling ratio is
bounded by what the best universal pattern at that budget reaches. This fits U itself with signed-gradient steps
(cosine-decayed, projected on the ε-ball) on random training batches, minimising the clamped margin
max(Z_pred − max_{i≠pred} Z_i, −κ) of each image's clean prediction: an image already fooled by κ stops pulling U, so
the pattern is spent on the images it has not fooled yet (Shafahi et al. 2020 clamp their loss for the same reason).
Prints, per budget (ε in 1/255 pixel units), the fooling ratio on a seeded random subset of the test set at four
points of the fit, and its wall time: a Markdown table (METHOD.md 2.1).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from advretrain import load_dataset, load_model
from advretrain.attacks.base import frozen, margin
from advretrain.data import to_float
from advretrain.metrics import fooling_ratio, predict
from advretrain.runtime.device import resolve_device


def universal_fr(model: torch.nn.Module, x: torch.Tensor, clean: torch.Tensor, u: torch.Tensor) -> float:
    """The fooling ratio of the pattern u (1×C×H×W) on x, against the clean predictions (N)."""
    return fooling_ratio(clean, predict(model, (x + u).clamp(0, 1)).argmax(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--eps", default="10", help="budgets in 1/255 pixel units, comma-separated")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--step-size", type=float, default=1.0, help="first step, in 1/255 (cosine-decayed)")
    parser.add_argument("--kappa", type=float, default=5.0, help="margin below which a fooled image stops pulling")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.test_images]
    x = to_float(test.images[pick])
    clean = predict(model, x).argmax(1)  # every budget's FR is against these predictions
    accuracy = float((clean == test.labels[pick]).float().mean())
    print(f"model accuracy on the {len(pick)} test images: {accuracy:.4f}\n")
    marks = [args.steps * k // 4 for k in (1, 2, 3, 4)]
    print(f"| ε | test FR after {' / '.join(map(str, marks))} steps of {args.batch_size} | fit s |")
    print("|---|---|---|")
    for eps in (float(e) / 255 for e in args.eps.split(",")):
        gen = torch.Generator().manual_seed(1)  # the same training batches at every budget
        u = torch.zeros(1, *x.shape[1:], device=device)  # 1×C×H×W
        frs, started = [], time.perf_counter()
        with frozen(model):
            for step in range(args.steps):
                xb = to_float(train.images[torch.randint(0, len(train), (args.batch_size,), generator=gen)]).to(device)
                with torch.no_grad():
                    pred = model(xb).argmax(1)
                w = u.clone().requires_grad_(True)
                loss = margin(model((xb + w).clamp(0, 1)), pred).clamp_min(-args.kappa).mean()
                (grad,) = torch.autograd.grad(loss, w)
                size = args.step_size / 255 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
                u = (u - size * grad.sign()).clamp(-eps, eps)
                if step + 1 in marks:
                    frs.append(universal_fr(model, x, clean, u.cpu()))
        seconds = time.perf_counter() - started
        print(f"| {eps * 255:g}/255 | {' / '.join(f'{fr:.4f}' for fr in frs)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
