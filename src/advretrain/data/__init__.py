"""Datasets → whole uint8 image tensors, int64 labels and class names, decoded once and cached.

`load_dataset(spec, split)` takes `"cifar10"`, `"tinyimagenet"`, `"cifar10-sample"` (bundled with the package) or a
path to a dataset folder or archive in any supported format, detected from its layout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import DataError
from .cache import cache_key, load_cached, store_cached
from .download import REMOTES, download
from .formats import PARSERS, Split, detect
from .trees import fingerprint as tree_fingerprint
from .trees import open_tree

log = logging.getLogger(__name__)

NAMED = ("cifar10", "tinyimagenet", "cifar10-sample")
# Where each named dataset may already lie below the data root, in order of preference.
_LOCAL_NAMES = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "tinyimagenet": ("tiny-imagenet-200", "tiny-imagenet-200.zip"),
}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] or float [0,1] → float32 [0,1]: the one place pixels become floats."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


@dataclass(frozen=True)
class ImageDataset:
    """A dataset held whole in memory. `images` is uint8 N×C×H×W (float32 in [0,1] for sets that mix in
    adversarial images, which must not be rounded); `labels` is int64 N."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[indices], self.labels[indices], self.classes, self.source)

    def stratified(self, per_class: int, seed: int = 0) -> ImageDataset:
        """The first `per_class` images of each class in a seeded random order, in class-major order."""
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=gen)
        keep = [order[self.labels[order] == c][:per_class] for c in range(self.num_classes)]
        short = [(self.classes[c], len(k)) for c, k in enumerate(keep) if len(k) < per_class]
        if short:
            name, count = short[0]
            raise DataError(
                f"{self.source}: {per_class} images per class requested but class {name!r} has {count}; "
                f"lower the per-class count to at most {min(len(k) for k in keep)}"
            )
        return self.subset(torch.cat(keep))


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("ADVRETRAIN_DATA", Path.home() / ".cache" / "advretrain" / "data"))


def sample_path() -> Path:
    return Path(str(resources.files("advretrain.data") / "cifar10-sample.tar.gz"))


def normalise_split(split: str) -> Split:
    if split == "train":
        return "train"
    if split in ("test", "val"):
        return "test"
    raise DataError(f"unknown split {split!r}; use 'train' or 'test' ('val' means 'test')")


def resolve(spec: str, root: str | os.PathLike[str] | None = None, fetch: bool = True) -> Path:
    """Where the dataset `spec` lies on disk; named datasets are downloaded when missing and `fetch` is set."""
    if not spec.strip():  # Path("") is the current folder: a run would walk whatever lies there
        raise DataError("dataset '' names nothing; give a dataset name or the path of its folder or archive")
    if spec == "cifar10-sample":
        return sample_path()
    if spec in _LOCAL_NAMES:
        base = data_root(root)
        for name in _LOCAL_NAMES[spec]:
            if (base / name).exists():
                return base / name
        if not fetch:
            raise DataError(f"{spec} not found in {base}; run `advretrain datasets --download` or pass --data-root")
        return download(REMOTES[spec], base)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"dataset {spec!r} not found: not a path that exists nor one of {', '.join(NAMED)}; check the spelling"
        )
    if path.resolve() == Path(path.resolve().anchor):  # "/" would walk every mounted file system
        raise DataError(f"dataset {spec!r} is the root of the file system; give the dataset's own folder or archive")
    return path


def load_dataset(
    spec: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a whole split as tensors. Decoded once, then served from the cache (see `advretrain.data.cache`).

    Example:
        >>> train = load_dataset("cifar10-sample", "train")
        >>> train.images.dtype, train.images.shape[1:], train.classes[0]
        (torch.uint8, torch.Size([3, 32, 32]), 'airplane')
    """
    which = normalise_split(split)
    path = resolve(spec, root).resolve()
    key = cache_key(str(path), tree_fingerprint(path), which, str(image_size))
    cached = load_cached(key)
    if cached is None:
        fmt, tree = detect(open_tree(path))
        log.info("decoding %s (%s, %s split)", path, fmt, which)
        cached = PARSERS[fmt](tree, which, image_size)
        store_cached(key, *cached)
    images, labels, classes = cached
    return ImageDataset(images, labels, classes, source=f"{spec}:{which}")


__all__ = ["NAMED", "ImageDataset", "data_root", "load_dataset", "resolve", "sample_path"]
