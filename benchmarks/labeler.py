"""Benchmark: the true-label generator on CIFAR-10 (accuracy, flags, speed against scikit-learn) and at the paper's
TinyImageNet scale on synthetic data.

    python benchmarks/labeler.py --data cifar10 --checkpoint runs/small/model.safetensors [--gap gap.safetensors]
    python benchmarks/labeler.py --tiny-scale      # 100,000 × 12,288 → PCA 2,000, 10,000 queries
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from advretrain import load_dataset, load_model
from advretrain.attacks import FGSM, GAP
from advretrain.fooling import fooling_images, noise_images
from advretrain.labeler import KNNLabeler, label_report
from advretrain.runtime.io import read_safetensors


def timed(label: str, fn):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    out = fn()
    print(f"  {label}: {time.perf_counter() - started:.1f} s")
    return out


def speed_against_sklearn(train_x: torch.Tensor, train_y: torch.Tensor, queries: torch.Tensor, dims: int) -> None:
    print(f"speed, PCA-{dims} on {len(train_y)} references, 1-NN for {len(queries)} queries:")
    ours = timed("advretrain fit", lambda: KNNLabeler(pca_dims=dims).fit(train_x, train_y))
    labels = timed("advretrain predict", lambda: ours.predict(queries))
    flat = (train_x.reshape(len(train_x), -1).float() / 255).numpy()
    q = (queries.reshape(len(queries), -1).float() / 255).numpy()
    pca = timed("sklearn PCA(covariance_eigh) fit", lambda: PCA(dims, svd_solver="covariance_eigh").fit(flat))
    timed("sklearn PCA(auto) fit", lambda: PCA(dims, random_state=0).fit(flat))
    refs = pca.transform(flat)
    nn_index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(refs)
    idx = timed("sklearn transform + brute 1-NN", lambda: nn_index.kneighbors(pca.transform(q))[1][:, 0])
    same = np.mean(train_y.numpy()[idx] == labels.numpy())
    print(f"  labels identical to scikit-learn's: {same:.4%}")


def cifar(args: argparse.Namespace) -> None:
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    speed_against_sklearn(train.images, train.labels, test.images, 300)
    if args.speed_only:
        return
    model = load_model(args.checkpoint)
    labeler = KNNLabeler(pca_dims=300, fooling_percentile=args.percentile or None).fit(train.images, train.labels)
    rng = torch.Generator().manual_seed(0)
    sources = torch.randperm(len(train), generator=rng)[: args.queries]
    test_idx = torch.arange(min(args.queries, len(test)))
    if args.gap:
        universal = GAP().load_state_dict(*read_safetensors(args.gap, "fitted GAP", "fit it again")).perturbation
        name = "GAP universal perturbation"
    else:
        universal = torch.sign(torch.randn(1, *train.images.shape[1:], generator=rng)) * 10 / 255
        name = "random-sign universal pattern ±10/255"
    assert universal is not None
    targets = torch.randint(0, 10, (args.fooling,), generator=rng)
    generated, reached = fooling_images(model, targets, tuple(train.images.shape[1:]), steps=500)  # type: ignore[arg-type]
    fooling = torch.cat([generated[reached], noise_images(args.fooling, tuple(train.images.shape[1:]))])  # type: ignore[arg-type]
    print(
        f"fooling images: {int(reached.sum())}/{args.fooling} generated reached 0.99 confidence, "
        f"+ {args.fooling} uniform noise"
    )
    for attack_name, make in (
        ("FGSM eps 0.07", lambda x, y: FGSM()(model, x, y).adversarial),
        (name, lambda x, y: (x + universal).clamp(0, 1)),
    ):
        x_train = train.images[sources].float() / 255
        x_test = test.images[test_idx].float() / 255
        report = label_report(
            labeler,
            (make(x_train, train.labels[sources]), train.labels[sources], sources),
            (make(x_test, test.labels[test_idx]), test.labels[test_idx]),
            (test.images, test.labels),
            fooling,
        )
        print(
            f"\n{attack_name} (PCA-300, k=1, {args.queries} queries per source, fooling percentile {args.percentile}):"
        )
        for key, value in report.items():
            print(f"  {key:36s} {value:.4f}")


def tiny_scale() -> None:
    """Synthetic data at the paper's TinyImageNet scale: low-rank 'images' plus noise, 200 classes."""
    n, d, dims, queries = 100_000, 12_288, 2_000, 10_000
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(64, d, generator=gen) / 8
    labels = torch.randint(0, 200, (n,), generator=gen)
    centres = torch.randn(200, 64, generator=gen)
    images = torch.empty(n, d, dtype=torch.uint8)
    for start in range(0, n, 10_000):  # built in chunks to stay inside memory
        z = centres[labels[start : start + 10_000]] + 0.5 * torch.randn(
            len(labels[start : start + 10_000]), 64, generator=gen
        )
        x = 128 + 20 * (z @ basis) + 10 * torch.randn(len(z), d, generator=gen)
        images[start : start + 10_000] = x.clamp(0, 255).to(torch.uint8)
    images = images.view(n, 3, 64, 64)
    started = time.perf_counter()
    labeler = KNNLabeler(pca_dims=dims).fit(images, labels)
    fit_s = time.perf_counter() - started
    predicted = labeler.predict(images[:queries])
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"TinyImageNet scale ({n} × {d} → {dims}, {queries} queries): fit {fit_s:.0f} s, total {total:.0f} s, "
        f"peak memory {peak:.1f} GiB, self-label accuracy {(predicted == labels[:queries]).float().mean():.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--checkpoint")
    parser.add_argument("--gap", help="a fitted GAP (.safetensors) for the universal perturbation")
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--fooling", type=int, default=500)
    parser.add_argument("--percentile", type=float, default=99.9, help="0: no fooling-image branch")
    parser.add_argument("--tiny-scale", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only the comparison with scikit-learn")
    args = parser.parse_args()
    if args.tiny_scale:
        tiny_scale()
    else:
        cifar(args)


if __name__ == "__main__":
    main()
