"""The paper's true-label generator: PCA + k-nearest-neighbour labels against clean reference images, with a
new class (or k-means classes) for "fooling images" that lie far from all clean data.

Two facts shape it (METHOD.md 3): 1-NN recovers ~100% of labels only when an adversarial image's clean source is in
the reference set (it finds the source); for adversarials of unseen images it falls to plain 1-NN accuracy. And
PCA-space distance cannot flag noise-like fooling images (PCA discards the noise): the PCA reconstruction residual
||(x − μ) − P Pᵀ (x − μ)|| can, so that is the out-of-distribution score here.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import torch

from .data import to_float
from .errors import AdvretrainError


class LabelerError(AdvretrainError):
    """Invalid labeler input or state."""


CHUNK = 8192  # images per float32 block: bounds every float copy of a reference set (12,288 values: 400 MB)


def flatten(images: torch.Tensor, values: int | None = None) -> torch.Tensor:
    """uint8 or [0,1] float N×C×H×W → N×D, uint8 kept as uint8 (a quarter of float32's memory: 1.2 GB, not 5, for
    TinyImageNet's 101,000 images); `block` makes the float32 [0,1] rows. NaN, out-of-range or misshapen images are
    refused, and so is a D other than `values` (the reference set's)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise LabelerError(f"labeler: images must be an N×C×H×W tensor, got {shape}")
    x = images.flatten(1)  # N×D, also for N = 0; a view of a contiguous set
    if x.dtype != torch.uint8:
        x = x.float()  # no copy for float32
        for start in range(0, x.shape[0], CHUNK):
            part = x[start : start + CHUNK]
            if not bool(torch.isfinite(part).all()):
                raise LabelerError("labeler: images hold NaN or inf; check the data or the attack that produced them")
            if part.numel() and (float(part.min()) < 0 or float(part.max()) > 1):
                raise LabelerError("labeler: float images must lie in [0,1]; divide uint8 images by 255")
    if values is not None and x.shape[1] != values:
        raise LabelerError(
            f"labeler: images of {x.shape[1]} values, the reference set's have {values}; resize them to its size"
        )
    return x


def block(x: torch.Tensor, start: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 [0,1] rows start..start+CHUNK of a flattened set (of `rows`, an index into it, when given)."""
    part = x[start : start + CHUNK] if rows is None else x[rows[start : start + CHUNK].to(x.device)]
    return to_float(part)


def gram(chunk: torch.Tensor) -> torch.Tensor:
    """chunkᵀ·chunk (N×D → D×D). On the CPU through NumPy, whose BLAS call for a matrix times its own transpose is
    syrk: half the flops of the GEMM torch runs (measured 2.1x faster on 8,192×3,072, same float32 result)."""
    if chunk.device.type == "cpu":
        c = chunk.contiguous().numpy()
        return torch.from_numpy(c.T @ c)
    return chunk.T @ chunk


def mean_of(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The mean image (D, float32) of a flattened set's `rows` (all by default), summed over blocks in float64."""
    n = x.shape[0] if rows is None else rows.numel()
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, n, CHUNK):
        total += block(x, start, rows).sum(0, dtype=torch.float64)
    return (total / max(1, n)).float()


def project(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Flattened N×D (see `flatten`) → centred coordinates on `basis` (D×d; None: the pixel space), N×d on mean's
    device, in float blocks: no float copy of all of x."""
    parts = [block(x, start).to(mean.device) - mean for start in range(0, x.shape[0], CHUNK)]
    parts = parts if basis is None else [part @ basis for part in parts]
    return torch.cat(parts) if parts else torch.empty(0, mean.numel() if basis is None else basis.shape[1])


def fit_pca(x: torch.Tensor, dims: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D) and the top `dims` principal directions (D×dims) of x's `rows` (all by default), by eigh of the
    covariance: right when N ≫ D. x is flattened (uint8 or float, see `flatten`) and read in float blocks.

    Each block's Gram matrix is a float32 GEMM on centred data and the eigendecomposition is float32, as
    scikit-learn's covariance_eigh does (float64 eigh measured 2x slower for the same top components); the blocks
    are summed in float64.
    """
    n = x.shape[0] if rows is None else rows.numel()
    mean = mean_of(x, rows)
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, n, CHUNK):
        cov += gram(block(x, start, rows) - mean).double()
    cov /= max(1, n - 1)
    _, vectors = torch.linalg.eigh(cov.float())  # ascending eigenvalues
    components = vectors[:, -dims:].flip(1)  # D×dims, largest first
    # Sign convention (as scikit-learn's svd_flip): the largest-magnitude entry of each component is positive.
    signs = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    return mean, components * signs


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """||a_i − b_j||² for a: Q×d, b: N×d (b_sq: N precomputed) → Q×N, clamped at 0 against rounding."""
    d2 = torch.addmm(b_sq, a, b.T, alpha=-2)  # b_sq − 2ab in one pass: the Q×N block is the memory cost
    return d2.add_((a * a).sum(1, keepdim=True)).clamp_min_(0)


def knn_faiss(queries: torch.Tensor, refs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same exact search by faiss's IndexFlatL2 (the optional `faiss` extra), on the CPU; Q×k distances, indices."""
    try:
        import faiss
    except ImportError as exc:
        raise LabelerError("labeler: backend 'faiss' needs faiss; pip install 'advretrain[faiss]'") from exc
    index = faiss.IndexFlatL2(refs.shape[1])
    index.add(refs.detach().float().cpu().contiguous().numpy())
    d2, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    device = queries.device
    return torch.from_numpy(d2).clamp_min(0).sqrt().to(device), torch.from_numpy(idx).long().to(device)


def knn(queries: torch.Tensor, refs: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest references of each query (Euclidean), in chunks of `chunk` queries: memory chunk×N.

    Returns distances and indices, both Q×k, nearest first.
    """
    refs_sq = (refs * refs).sum(1)
    dists, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        d2 = pairwise_sq_dist(queries[start : start + chunk], refs, refs_sq)
        if k == 1:  # the paper's case: a min is much cheaper than a top-k
            values, indices = d2.min(1, keepdim=True)
        else:
            values, indices = d2.topk(k, dim=1, largest=False)  # sorted ascending
        dists.append(values.sqrt())
        idx.append(indices)
    if not dists:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(dists), torch.cat(idx)


def vote(neighbour_labels: torch.Tensor, distances: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over k neighbours; a tie goes to the tied class with the nearest member. Both Q×k → Q."""
    counts = torch.zeros(neighbour_labels.shape[0], num_classes, device=neighbour_labels.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(distances))
    tied = counts == counts.amax(1, keepdim=True)  # Q×classes
    is_tied = tied.gather(1, neighbour_labels)  # Q×k: neighbour belongs to a top class
    first = is_tied.float().argmax(1)  # neighbours are sorted by distance: the first tied one is nearest
    return neighbour_labels.gather(1, first[:, None]).squeeze(1)


class KNNLabeler:
    """Labels images by their nearest clean reference images in PCA space.

    Args:
        pca_dims: principal components kept (paper: 300 for CIFAR-10, 2000 for TinyImageNet).
        k: neighbours that vote (paper: 1).
        fooling_percentile: flag images whose PCA residual exceeds this percentile of held-out clean images'
            residuals as fooling images (e.g. 99.9); None: never flag.
        fooling_clusters: flagged images form this many new classes (k-means in PCA space), numbered from C.
        chunk_size: queries per distance block (memory chunk_size × references).
        device: where PCA and search run ("cpu" or "cuda").
        backend: "torch" (chunked exact search on `device`) or "faiss" (exact IndexFlatL2, optional extra).
    """

    def __init__(
        self,
        pca_dims: int = 300,
        k: int = 1,
        fooling_percentile: float | None = None,
        fooling_clusters: int = 1,
        chunk_size: int = 1024,
        device: str | torch.device = "cpu",
        holdout: int = 1000,
        seed: int = 0,
        backend: Literal["torch", "faiss"] = "torch",
    ) -> None:
        if pca_dims < 1 or k < 1 or fooling_clusters < 1 or chunk_size < 1:
            raise LabelerError("labeler: pca_dims, k, fooling_clusters and chunk_size must be >= 1")
        if fooling_percentile is not None and not 0 < fooling_percentile < 100:
            raise LabelerError(f"labeler: fooling_percentile must lie in (0, 100), got {fooling_percentile}")
        self.pca_dims, self.k, self.fooling_percentile = pca_dims, k, fooling_percentile
        self.fooling_clusters, self.chunk_size, self.device = fooling_clusters, chunk_size, torch.device(device)
        self.holdout, self.seed, self.backend = holdout, seed, backend
        self.mean: torch.Tensor | None = None  # D
        self.components: torch.Tensor | None = None  # D×pca_dims
        self.ref_features: torch.Tensor | None = None  # N×pca_dims
        self.ref_labels: torch.Tensor | None = None  # N
        self.num_classes = 0
        self.threshold: float | None = None

    def held_out(self, n: int) -> int:
        """Reference images left out of the PCA fit to calibrate the fooling threshold (when no holdout is given)."""
        return min(self.holdout, n // 5) if self.fooling_percentile is not None else 0

    def max_pca_dims(self, n: int, d: int) -> int:
        """PCA needs at least as many fitted images as components (without a given holdout)."""
        return min(n - self.held_out(n), d)

    def fit(self, images: torch.Tensor, labels: torch.Tensor, holdout: torch.Tensor | None = None) -> KNNLabeler:
        """Reference set: `images` (uint8 or [0,1] N×C×H×W) and `labels`; `holdout` calibrates the fooling threshold.

        Without `holdout`, `self.holdout` reference images are left out of the PCA fit (not of the search) and
        calibrate it, so their residuals are those of unseen clean images.
        """
        x = flatten(images).to(self.device)
        if labels.shape != (x.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise LabelerError(
                f"labeler: {x.shape[0]} images need {x.shape[0]} integer labels, got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        if x.shape[0] == 0 or int(labels.min()) < 0:
            raise LabelerError("labeler: the reference set is empty or has negative labels; give labelled images")
        limit = min(x.shape) if holdout is not None else self.max_pca_dims(*x.shape)
        if self.pca_dims > limit:
            raise LabelerError(
                f"labeler: pca_dims {self.pca_dims} exceeds what {x.shape[0]} images of {x.shape[1]} values allow "
                f"({limit}); lower pca_dims"
            )
        fit_rows = torch.arange(x.shape[0])  # PCA's rows: all, or all but the held-out ones
        calibration = None
        if self.fooling_percentile is not None:
            if holdout is not None:
                calibration = flatten(holdout, x.shape[1]).to(self.device)
                if calibration.shape[0] == 0:
                    raise LabelerError(
                        "labeler: the holdout set is empty; give clean images to calibrate the threshold"
                    )
            else:
                n_hold = self.held_out(x.shape[0])
                if n_hold == 0:  # a fifth of fewer than five images is none: no clean residuals to calibrate on
                    raise LabelerError(
                        f"labeler: {x.shape[0]} reference images leave none held out to calibrate the fooling "
                        "threshold (a fifth is held out); give at least 5 images, a holdout set, or no percentile"
                    )
                order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
                fit_rows, calibration = order[n_hold:].sort().values, x[order[:n_hold].to(x.device)]
        all_rows = fit_rows.numel() == x.shape[0]
        self.mean, self.components = fit_pca(x, self.pca_dims, None if all_rows else fit_rows)
        self.ref_features = self.project(x)
        self.ref_labels = labels.to(self.device).long()
        self.num_classes = int(labels.max()) + 1
        if calibration is not None and self.fooling_percentile is not None:
            scores = self.residual(calibration).cpu().double().numpy()
            self.threshold = float(np.percentile(scores, self.fooling_percentile))
        return self

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, components = self._basis()
        if self.ref_features is None or self.ref_labels is None:
            raise LabelerError("labeler: not fitted; call fit(reference_images, labels) or load() first")
        return mean, components, self.ref_features, self.ref_labels

    def _basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.components is None:
            raise LabelerError("labeler: not fitted; call fit(reference_images, labels) or load() first")
        return self.mean, self.components

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened N×D (see `flatten`) → PCA coordinates N×pca_dims, in float blocks: no float copy of all of x."""
        return project(x, *self._basis())

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """PCA reconstruction residual ||(x − μ) − P Pᵀ(x − μ)|| per image (N), the out-of-distribution score."""
        mean, components = self._basis()
        norms = []
        for i in range(0, x.shape[0], CHUNK):
            centred = block(x, i).to(self.device) - mean  # CHUNK×D
            # A difference of vectors, not ||c||² − ||Pᵀc||²: that difference of large numbers cancels.
            norms.append((centred - (centred @ components) @ components.T).norm(dim=1))
        return torch.cat(norms) if norms else torch.empty(0, device=self.device)

    def _search(self, queries: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "faiss":
            return knn_faiss(queries, refs, self.k)
        return knn(queries, refs, self.k, self.chunk_size)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """int64 labels (N, on the CPU); flagged fooling images get classes num_classes, num_classes + 1, ..."""
        return self.predict_parts(images)[2]

    def predict_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the nearest reference's index, the k-NN vote alone — the paper's label —, the final labels with fooling
        classes), each N on the CPU, from one search."""
        mean, _, refs, ref_labels = self._fitted()
        x = flatten(images, mean.shape[0])
        distances, indices = self._search(self.project(x), refs)
        voted = vote(ref_labels[indices], distances, self.num_classes)
        labels = voted.clone()
        if self.threshold is not None:
            flagged = self.residual(x) > self.threshold
            labels[flagged] = self.num_classes + self._clusters(self.project(x[flagged.to(x.device)]))
        return indices[:, 0].cpu(), voted.cpu(), labels.cpu()

    def _clusters(self, features: torch.Tensor) -> torch.Tensor:
        n = min(self.fooling_clusters, features.shape[0])
        if n <= 1:
            return torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        from sklearn.cluster import KMeans  # here, not at the top: scikit-learn takes ~1.5 s to import

        km = KMeans(n_clusters=n, n_init=4, random_state=self.seed).fit(features.cpu().numpy())
        return torch.from_numpy(km.labels_.astype(np.int64)).to(features.device)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The fitted labeler as tensors and metadata (what `from_state_dict` rebuilds it from)."""
        mean, components, refs, labels = self._fitted()
        config = {
            "pca_dims": self.pca_dims,
            "k": self.k,
            "fooling_percentile": self.fooling_percentile,
            "fooling_clusters": self.fooling_clusters,
            "num_classes": self.num_classes,
            "threshold": self.threshold,
            "seed": self.seed,
        }
        tensors = {"mean": mean, "components": components, "ref_features": refs, "ref_labels": labels}
        return tensors, {"config": json.dumps(config)}

    @classmethod
    def from_state_dict(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], device: str | torch.device = "cpu"
    ) -> KNNLabeler:
        try:
            config = json.loads(metadata["config"])
            labeler = cls(
                config["pca_dims"],
                config["k"],
                config["fooling_percentile"],
                config["fooling_clusters"],
                device=device,
                seed=config["seed"],
            )
            labeler.mean, labeler.components = tensors["mean"].to(device), tensors["components"].to(device)
            labeler.ref_features, labeler.ref_labels = (
                tensors["ref_features"].to(device),
                tensors["ref_labels"].to(device),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise LabelerError(f"not a saved labeler ({exc}); fit one again") from exc
        labeler.num_classes, labeler.threshold = config["num_classes"], config["threshold"]
        return labeler


def _rate(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


def label_report(
    labeler: KNNLabeler,
    train_source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    test_source: tuple[torch.Tensor, torch.Tensor] | None = None,
    clean_test: tuple[torch.Tensor, torch.Tensor] | None = None,
    fooling: torch.Tensor | None = None,
) -> dict[str, float]:
    """What a label accuracy means, measured (METHOD.md 3.4). Every part is optional.

    Args:
        train_source: (adversarial images, source labels, source indices into the reference set): adversarials
            whose clean sources the reference holds; reports label accuracy and the exact-source retrieval rate.
        test_source: (adversarial images, source labels) of images the reference has never seen.
        clean_test: (clean images, labels) the reference has never seen: the plain 1-NN baseline.
        fooling: fooling images (generated or noise): their flag rate.
    """
    report: dict[str, float] = {}
    flags: dict[str, torch.Tensor] = {}
    if train_source is not None:
        images, labels, indices = train_source
        nearest, voted, predicted = labeler.predict_parts(images)
        report["train_source_accuracy"] = _rate(predicted == labels.cpu())
        report["train_source_vote_accuracy"] = _rate(voted == labels.cpu())  # the paper's metric: no flags
        report["exact_source_retrieval"] = _rate(nearest == indices.cpu())
        flags["train_source_adversarial"] = predicted >= labeler.num_classes
    if test_source is not None:
        predicted = labeler.predict(test_source[0])
        report["test_source_accuracy"] = _rate(predicted == test_source[1].cpu())
        flags["test_source_adversarial"] = predicted >= labeler.num_classes
    if clean_test is not None:
        predicted = labeler.predict(clean_test[0])
        report["clean_test_accuracy"] = _rate(predicted == clean_test[1].cpu())
        flags["clean_test"] = predicted >= labeler.num_classes
    if fooling is not None:
        flags["fooling"] = labeler.predict(fooling) >= labeler.num_classes
    if labeler.threshold is not None:
        report |= {f"flag_rate_{name}": _rate(mask) for name, mask in flags.items()}
    return report
