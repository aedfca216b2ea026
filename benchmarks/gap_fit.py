"""Benchmark: fit GAP on full CIFAR-10 against a trained model on this CPU; the fooling ratio on the test set.

    python benchmarks/gap_fit.py --checkpoint runs/small/model.safetensors --data cifar10 --batch-size 128 --epochs 5

The reference's batch of 30 spends most of each step in the generator on a CPU (one G(z) per step whatever the
batch); 128 images per step fit ~2.6x more images per second, so the CPU run uses it and says so.
"""

from __future__ import annotations

import argparse
import logging
import time

from advretrain import load_dataset, load_model
from advretrain.attacks import GAP
from advretrain.metrics import attack_metrics
from advretrain.runtime.io import save_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--out", help="save the fitted GAP here (.safetensors)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_model(args.checkpoint)
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    started = time.perf_counter()
    gap = GAP(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size).fit(model, train.images)
    seconds = time.perf_counter() - started
    x = test.images.float() / 255
    result = gap(model, x, test.labels)
    metrics = attack_metrics(model, x, result.adversarial, test.labels)
    print(
        f"GAP fitted in {seconds:.0f} s ({args.epochs} epochs, batch {args.batch_size}, lr {args.lr}); "
        f"held-out FR per epoch {[round(h['holdout_fooling_ratio'], 3) for h in gap.history]}"
    )
    print(
        f"test set ({len(test)} images): clean accuracy {metrics['clean_accuracy']:.4f}, fooling ratio "
        f"{metrics['fooling_ratio']:.4f} (8-bit {metrics['fooling_ratio_8bit']:.4f}), accuracy on adversarials "
        f"{metrics['adversarial_accuracy']:.4f}, L-inf {float(result.adversarial.sub(x).abs().max()):.5f}"
    )
    if args.out:
        save_state(args.out, gap)


if __name__ == "__main__":
    main()
