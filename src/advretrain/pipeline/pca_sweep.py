"""The labeler's PCA trade-off (METHOD.md 3, 5 item 7): the paper keeps 300 (CIFAR-10) or 2,000 (TinyImageNet)
dimensions "such that high accuracy is achieved in a reasonable amount of time" without showing either.

For each size in `sweep.pca_dims` (and the pixel space itself, "full") and each k in `sweep.k`: the k-NN vote (the
paper's label, no fooling flag) on every attack's training-source pool and test-source set, the exact-source
retrieval rate, and the seconds to fit and to label. One eigendecomposition serves every size (the top d components
are the first d of the largest size's: the same basis a separate fit gives, at the same cost, which does not depend
on d), and one search at the largest k serves every k (its first k neighbours are the k nearest), so a size's label
time is that search plus each k's vote.
"""

from __future__ import annotations

import logging
import time

import torch

from ..data import ImageDataset
from ..labeler import fit_pca, flatten, knn, mean_of, project, vote
from ..results import Metrics, SweepRow
from .stages import AttackArtifacts, Run, cached_stage, digest

log = logging.getLogger("advretrain.pipeline")


def sizes(run: Run, train_set: ImageDataset) -> list[int | str]:
    """The configured sizes PCA can fit on this training set (at most min(N, D) components), in the given order."""
    n, d = len(train_set), int(train_set.images[0].numel())
    kept: list[int | str] = [dims for dims in run.cfg.sweep.pca_dims if dims == "full" or int(dims) <= min(n, d)]
    skipped = [dims for dims in run.cfg.sweep.pca_dims if dims not in kept]
    if skipped:
        log.warning("PCA sweep: %s dimensions exceed what %d images of %d values allow; left out", skipped, n, d)
    return kept


Fit = tuple[torch.Tensor, torch.Tensor | None, float]  # mean D, basis D×d (None: the pixel space), seconds


def fits(x: torch.Tensor, points: list[int | str]) -> dict[int | str, Fit]:
    """Each size's mean and basis: one fit at the largest size, sliced (its cost is each size's fit time)."""
    started = time.perf_counter()
    dims = [int(d) for d in points if d != "full"]
    fitted = fit_pca(x, max(dims)) if dims else None
    seconds = time.perf_counter() - started
    out: dict[int | str, Fit] = {}
    for d in points:  # the pixel space: its own mean (distances need no basis), no fit
        out[d] = (
            (mean_of(x), None, 0.0) if fitted is None or d == "full" else (fitted[0], fitted[1][:, : int(d)], seconds)
        )
    return out


def sweep_point(
    dims: int | str,
    fit: Fit,
    ks: list[int],
    x: torch.Tensor,
    labels: torch.Tensor,
    arts: list[AttackArtifacts],
    classes: int,
) -> list[SweepRow]:
    """One PCA size: every attack's sets labelled at every k."""
    mean, basis, fit_seconds = fit

    started = time.perf_counter()
    refs = project(x, mean, basis)
    metrics: dict[int, Metrics] = {k: {} for k in ks}
    vote_seconds = dict.fromkeys(ks, 0.0)
    for art in arts:
        for part, adversarial_set in (("train_source", art.pool), ("test_source", art.static)):
            queries = project(flatten(adversarial_set.adversarial, x.shape[1]), mean, basis)
            distances, indices = knn(queries, refs, max(ks))
            # training-source: is the nearest reference the clean source itself?
            found = indices[:, 0].cpu() == adversarial_set.indices.cpu()
            for k in ks:
                voting = time.perf_counter()
                voted = vote(labels[indices[:, :k]], distances[:, :k], classes).cpu()
                vote_seconds[k] += time.perf_counter() - voting
                metrics[k][f"{art.name}/{part}_accuracy"] = float(
                    (voted == adversarial_set.labels.cpu()).float().mean()
                )
                if part == "train_source":
                    metrics[k][f"{art.name}/exact_source_retrieval"] = float(found.float().mean())
    search_seconds = time.perf_counter() - started - sum(vote_seconds.values())
    return [SweepRow(dims, k, metrics[k], fit_seconds, search_seconds + vote_seconds[k]) for k in ks]


def sweep_experiment(run: Run, train_set: ImageDataset, arts: list[AttackArtifacts]) -> list[SweepRow]:
    """The sweep as one cached stage (its timings are part of the record: a rerun reports the measured ones)."""
    cfg = run.cfg.sweep
    points = sizes(run, train_set)
    folder = run.stage(f"sweep-{digest(run.cfg.data, points, cfg.k, *(art.key for art in arts))}")

    def compute() -> list[SweepRow]:
        x = flatten(train_set.images).to(run.device)
        labels = train_set.labels.to(run.device)
        rows = []
        for dims, fit in fits(x, points).items():
            log.info("PCA sweep: %s dimensions, k in %s", dims, cfg.k)
            rows += sweep_point(dims, fit, cfg.k, x, labels, arts, train_set.num_classes)
        return rows

    def record(rows: list[SweepRow]) -> dict[str, object]:
        return {"rows": [row.to_dict() for row in rows]}

    def reuse(done: dict[str, object]) -> list[SweepRow]:
        return [SweepRow.from_dict(row) for row in done["rows"]]  # type: ignore[attr-defined]

    return cached_stage(run, "sweep", "PCA sweep", folder, compute, record, reuse)
