"""Shared fixtures: tiny datasets written in the real on-disk formats, and an isolated cache."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["airplane", "automobile", "bird"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted tiny run: the reference that killed and resumed runs must equal byte for byte."""
    from tiny_run import TINY, advretrain, finish

    run_dir = tmp_path_factory.mktemp("run") / "r"
    finish(advretrain("run", "--out", str(run_dir), *TINY))
    return run_dir


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own dataset cache and data root: no test reads another's state or the user's."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ADVRETRAIN_CACHE", str(cache))
    monkeypatch.setenv("ADVRETRAIN_DATA", str(tmp_path_factory.mktemp("data-root")))
    return cache


def write_cifar_batches(folder: Path, per_batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10 python batches as the official files hold them: dicts of bytes keys, N×3072 uint8 rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written: dict[str, np.ndarray] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = data
        written[name + ":labels"] = np.array(labels)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def tar_folder(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return archive


def png_bytes(array: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def write_image_folder(
    root: Path, per_class: int = 3, size: int = 8, seed: int = 0, classes: list[str] | None = None
) -> dict[str, np.ndarray]:
    """train/<class>/<i>.png and test/<class>/<i>.png, lossless, returning the pixels written (N×H×W×C)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        arrays = []
        for cls in classes or CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                (root / split / cls / f"{i:04d}.png").write_bytes(png_bytes(img))
                arrays.append(img)
        written[split] = np.stack(arrays)
    return written


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "folder-data"
    return root, write_image_folder(root)
