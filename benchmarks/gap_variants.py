"""Benchmark: GAP's variants (loss × lr × iterations per epoch × initialisation) against one trained model.

    python benchmarks/gap_variants.py --checkpoint runs/small --data cifar10 --test-images 2000

Each variant is fitted on the training images (best epoch chosen on the held-out ones, as the pipeline does) and
measured on a seeded random subset of the test set (--test-images 10000: all of CIFAR-10's) at L-inf 10/255: the
fooling ratio (predictions changed from the clean ones, computed once), the generator's saturation (share of
|tanh| > 0.99) after every epoch, and the fit's wall time. Prints a Markdown table (METHOD.md 2.1).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from advretrain import load_dataset, load_model
from advretrain.attacks import GAP
from advretrain.data import to_float
from advretrain.metrics import predict
from advretrain.runtime.device import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--losses", default="least-likely,untargeted")
    parser.add_argument("--lrs", default="0.002,0.0002")
    parser.add_argument("--max-iters", default="50", help="steps per epoch; 'full' for whole passes")
    parser.add_argument("--inits", default="reference,pytorch")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    model = load_model(args.checkpoint, resolve_device(args.device))
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.test_images]
    x = to_float(test.images[pick])
    clean = predict(model, x).argmax(1)  # once: every variant's FR is against these predictions
    accuracy = float((clean == test.labels[pick]).float().mean())
    print(f"model accuracy on the {len(pick)} test images: {accuracy:.4f}\n")
    print("| loss | lr | steps/epoch | init | held-out FR per epoch | saturation per epoch | test FR | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    grid = itertools.product(
        args.losses.split(","), map(float, args.lrs.split(",")), args.max_iters.split(","), args.inits.split(",")
    )
    for loss, lr, max_iter, init in grid:
        steps = None if max_iter == "full" else int(max_iter)
        gap = GAP(lr=lr, epochs=args.epochs, batch_size=args.batch_size, max_iter=steps, loss=loss, init=init)  # type: ignore[arg-type]
        started = time.perf_counter()
        gap.fit(model, train.images)
        seconds = time.perf_counter() - started
        assert gap.perturbation is not None
        fr = float((predict(model, (x + gap.perturbation.cpu()).clamp(0, 1)).argmax(1) != clean).float().mean())
        frs = " ".join(f"{h['holdout_fooling_ratio']:.2f}" for h in gap.history)
        sats = " ".join(f"{h['saturation']:.2f}" for h in gap.history)
        print(f"| {loss} | {lr:g} | {max_iter} | {init} | {frs} | {sats} | {fr:.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
