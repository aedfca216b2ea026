"""Parsers for the on-disk dataset formats, each reading a `Tree` and returning (images, labels, classes).

- CIFAR-10 python batches (`data_batch_1..5`, `test_batch`, `batches.meta`), via a restricted unpickler.
- Image folders: `train/<class>/*` and `test/<class>/*` (or `val/<class>/*`), classes in sorted order, which for
  CIFAR-10 is its official label order.
- tiny-imagenet-200: `wnids.txt` order, `train/<wnid>/images/*`, `val/images/*` labelled by `val_annotations.txt`.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from ..errors import DataError
from .decode import decode_all
from .limits import check_decoded_bytes
from .trees import Tree

Split = Literal["train", "test"]
Parsed = tuple[torch.Tensor, torch.Tensor, list[str]]  # uint8 N×3×H×W, int64 N, class names
Format = Literal["cifar-pickle", "tinyimagenet", "image-folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# What a CIFAR batch legitimately holds: dicts, lists, bytes, ints and numpy arrays. Nothing else may be built.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("__builtin__", "bytes"),  # how numpy pickles an empty array's buffer (protocol 2)
    ("builtins", "bytes"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"{self.where}: refused to unpickle {module}.{name}, which a CIFAR batch never contains; "
            "the file is corrupt or malicious, download it again"
        )


def safe_unpickle(data: bytes, where: str) -> Any:
    try:
        return _RestrictedUnpickler(data, where).load()
    except DataError:
        raise
    except Exception as exc:  # any decoding failure of an untrusted file is a data error
        raise DataError(f"{where}: unreadable pickle ({exc}); download the dataset again") from exc


def _key(batch: dict[Any, Any], name: str, where: str) -> Any:
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    raise DataError(f"{where}: missing field {name!r}; not a CIFAR python batch")


def cifar_batch(batch: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpickled CIFAR batch → uint8 N×3×32×32 images and int64 N labels, its types checked."""
    if not isinstance(batch, dict):
        raise DataError(f"{where}: not a CIFAR python batch (no dict inside); download the dataset again")
    data, labels = _key(batch, "data", where), _key(batch, "labels", where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{where}: data is not a uint8 array ({type(data).__name__}); not a CIFAR python batch")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: data has shape {data.shape}, expected N×3072; download the dataset again")
    if not isinstance(labels, list | np.ndarray) or not all(isinstance(v, int | np.integer) for v in labels):
        raise DataError(f"{where}: labels are not a list of integers; not a CIFAR python batch")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(list(labels), dtype=torch.int64)


def parse_cifar(tree: Tree, split: Split, image_size: int | None = None) -> Parsed:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in files:
        if not tree.has(name):
            raise DataError(f"{tree.describe(name)}: missing CIFAR batch; the dataset is incomplete")
        x, y = cifar_batch(safe_unpickle(tree.read(name), tree.describe(name)), tree.describe(name))
        images.append(x)
        labels.append(y)
    meta = safe_unpickle(tree.read("batches.meta"), tree.describe("batches.meta")) if tree.has("batches.meta") else {}
    if not isinstance(meta, dict):
        raise DataError(f"{tree.describe('batches.meta')}: not a CIFAR meta file (no dict inside); download it again")
    raw = _key(meta, "label_names", tree.describe("batches.meta"))
    if not isinstance(raw, list | tuple) or not all(isinstance(c, bytes | str) for c in raw):
        raise DataError(f"{tree.describe('batches.meta')}: label_names is not a list of names; download it again")
    classes = [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in raw]
    x, y = torch.cat(images), torch.cat(labels)
    if x.shape[0] != y.shape[0] or (y.numel() and (y.min() < 0 or y.max() >= len(classes))):
        raise DataError(f"{tree.location}: labels do not match images or classes; download the dataset again")
    if x.shape[0] == 0:
        raise DataError(f"{tree.describe(files[0])}: {', '.join(files)} hold no images; download the dataset again")
    if image_size is not None and image_size != 32:
        check_decoded_bytes(x.shape[0], image_size, image_size, tree.describe(files[0]), value_bytes=4)
        x = resize_uint8(x, image_size)
    return x, y, classes


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    scaled = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return scaled.round().clamp(0, 255).to(torch.uint8)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _class_files(tree: Tree, folder: str) -> dict[str, list[str]]:
    """class name → its image paths (relative to `tree`), refusing empty classes and non-image files."""
    _, classes = tree.sub(folder).children()
    if not classes:
        raise DataError(f"{tree.describe(folder)}: no class folders; expected {folder}/<class>/<image>")
    out: dict[str, list[str]] = {}
    for cls in classes:
        names = [n for n in tree.sub(f"{folder}/{cls}").names() if not n.split("/")[-1].startswith(".")]
        strays = [n for n in names if not _is_image(n)]
        if strays:
            raise DataError(f"{tree.describe(f'{folder}/{cls}/{strays[0]}')}: not an image file; remove it")
        if not names:
            raise DataError(f"{tree.describe(f'{folder}/{cls}')}: empty class folder; add images or remove it")
        out[cls] = [f"{folder}/{cls}/{n}" for n in names]
    return out


def parse_image_folder(tree: Tree, split: Split, image_size: int | None = None) -> Parsed:
    eval_folder = "test" if tree.has_dir("test") else "val"
    if not tree.has_dir(eval_folder):
        raise DataError(f"{tree.location}: no test/ or val/ folder beside train/; add the evaluation split")
    train_classes = tree.sub("train").children()[1]
    eval_classes = tree.sub(eval_folder).children()[1]
    if train_classes != eval_classes:
        only = ", ".join(repr(name[:40]) for name in sorted(set(train_classes) ^ set(eval_classes))[:3])
        raise DataError(
            f"{tree.location}: train/ and {eval_folder}/ have different classes (e.g. {only}); "
            "make both splits hold the same class folders"
        )
    per_class = _class_files(tree, "train" if split == "train" else eval_folder)
    classes = list(per_class)
    names = [n for cls in classes for n in per_class[cls]]
    labels = torch.tensor([i for i, cls in enumerate(classes) for _ in per_class[cls]], dtype=torch.int64)
    return decode_all(tree, names, image_size), labels, classes


def _lines(tree: Tree, name: str) -> list[list[str]]:
    if not tree.has(name):
        raise DataError(f"{tree.describe(name)}: missing; not a complete tiny-imagenet-200 folder")
    text = tree.read(name).decode("utf-8", errors="replace")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def parse_tinyimagenet(tree: Tree, split: Split, image_size: int | None = None) -> Parsed:
    wnids = [row[0].strip() for row in _lines(tree, "wnids.txt")]
    words = (
        {row[0]: row[1].split(",")[0].strip() for row in _lines(tree, "words.txt") if len(row) > 1}
        if tree.has("words.txt")
        else {}
    )
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        names, labels = [], []
        for wnid in wnids:
            files = [f"train/{wnid}/images/{n}" for n in tree.sub(f"train/{wnid}/images").names() if _is_image(n)]
            if not files:
                where = tree.describe(f"train/{wnid}/images")
                raise DataError(f"{where}: empty class folder; the dataset is incomplete")
            names += files
            labels += [index[wnid]] * len(files)
    else:
        rows = sorted(_lines(tree, "val/val_annotations.txt"))
        where = tree.describe("val/val_annotations.txt")
        if not rows:
            raise DataError(f"{where}: lists no validation images; write <file><TAB><wnid> on each line")
        short = [r for r in rows if len(r) < 2]
        if short:
            raise DataError(f"{where}: line {short[0][0][:40]!r} has one column; write <file><TAB><wnid> on each line")
        unknown = [r[1] for r in rows if r[1] not in index]
        if unknown:
            raise DataError(f"{where}: class {unknown[0][:40]!r} not in wnids.txt; fix the annotations")
        names = [f"val/images/{r[0]}" for r in rows]
        labels = [index[r[1]] for r in rows]
    classes = [words.get(w, w) for w in wnids]
    return decode_all(tree, names, image_size), torch.tensor(labels, dtype=torch.int64), classes


PARSERS: dict[Format, Callable[[Tree, Split, int | None], Parsed]] = {
    "cifar-pickle": parse_cifar,
    "tinyimagenet": parse_tinyimagenet,
    "image-folder": parse_image_folder,
}


def detect(tree: Tree) -> tuple[Format, Tree]:
    """Find the dataset's format from its layout, descending through single wrapping folders."""
    for _ in range(4):
        files, folders = tree.children()
        if "batches.meta" in files or "data_batch_1" in files:
            return "cifar-pickle", tree
        if "wnids.txt" in files:
            return "tinyimagenet", tree
        if "train" in folders:
            return "image-folder", tree
        if "cifar-10-batches-py" in folders:
            return "cifar-pickle", tree.sub("cifar-10-batches-py")
        if len(folders) != 1 or files:
            break
        tree = tree.sub(folders[0])
    raise DataError(
        f"{tree.location}: layout matches no known dataset format; expected CIFAR python batches, "
        "tiny-imagenet-200, or train/<class>/<image> with test/ or val/ beside it"
    )
