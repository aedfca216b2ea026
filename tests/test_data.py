"""Datasets load from every supported on-disk format with exact labels and class order; bad data is named."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, png_bytes, tar_folder, write_cifar_batches, zip_folder

from advretrain import DataError, load_dataset
from advretrain.data import formats


def test_cifar_pickles_folder_and_archive_load_exactly(tmp_path: Path) -> None:
    written = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    archive = tar_folder(tmp_path / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    for spec in (tmp_path / "cifar-10-batches-py", archive, tmp_path):
        train = load_dataset(str(spec), "train")
        test = load_dataset(str(spec), "test")
        expected = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
        assert torch.equal(train.images, torch.from_numpy(expected))
        labels = np.concatenate([written[f"data_batch_{i}:labels"] for i in range(1, 6)])
        assert train.labels.tolist() == labels.tolist()
        assert test.labels.tolist() == written["test_batch:labels"].tolist()
        assert train.classes[:3] == CLASSES and train.classes[-1] == "truck" and len(train.classes) == 10


def test_named_cifar10_is_found_under_the_data_root(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    assert len(load_dataset("cifar10", "test", root=tmp_path)) == 4


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Boom(), b"labels": [0]}, protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"test_batch: refused to unpickle (posix|os)\.system"):
        load_dataset(str(folder), "test")
    assert not (tmp_path / "pwned").exists()


def test_image_folder_loads_exact_pixels_labels_and_sorted_classes(image_folder: tuple[Path, dict]) -> None:
    root, written = image_folder
    archive = tar_folder(root, root.parent / "data.tar.gz")
    for spec in (root, archive, zip_folder(root, root.parent / "data.zip")):
        for split in ("train", "test"):
            data = load_dataset(str(spec), split)
            assert data.classes == CLASSES
            assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
            assert torch.equal(data.images, torch.from_numpy(written[split]).permute(0, 3, 1, 2))
            assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64


def test_val_folder_is_the_evaluation_split(image_folder: tuple[Path, dict]) -> None:
    root, written = image_folder
    (root / "test").rename(root / "val")
    assert len(load_dataset(str(root), "val")) == len(written["test"])


def write_tinyimagenet(root: Path) -> list[str]:
    wnids = ["n02", "n01", "n03"]  # deliberately unsorted: wnids.txt order is the label order
    rng = np.random.default_rng(1)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn03\tsnail\nn99\tx\n")
    for wnid in wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(2):
            mode = "L" if (wnid, i) == ("n03", 1) else "RGB"  # TinyImageNet has grayscale JPEGs
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            (root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG").write_bytes(png_bytes(img, mode))
    annotations = [("val_1.JPEG", "n03"), ("val_0.JPEG", "n01"), ("val_2.JPEG", "n02")]
    for name, _ in annotations:
        (root / "val" / "images" / name).write_bytes(png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t10\t10\n" for n, w in annotations))
    return wnids


def test_tinyimagenet_layout_labels_from_annotations(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    write_tinyimagenet(root)
    for spec in (str(root), str(zip_folder(root, tmp_path / "tiny-imagenet-200.zip"))):
        train = load_dataset(spec, "train")
        assert train.classes == ["tabby", "goldfish", "snail"]
        assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
        assert train.images.shape == (6, 3, 64, 64)
        val = load_dataset(spec, "test")
        assert val.labels.tolist() == [1, 2, 0]  # val_0 → n01, val_1 → n03, val_2 → n02 (sorted by file)
    assert torch.equal(load_dataset("tinyimagenet", "val", root=tmp_path).labels, val.labels)


def test_a_mirror_with_extra_classes_and_macos_litter_loads_like_the_official_archive(tmp_path: Path) -> None:
    """The public mirror's layout (rangeetpan/IMagenet): wnids.txt lists two classes more than the official 200, and
    .DS_Store files lie in every folder; the official zip loads the same way."""
    official = tmp_path / "official" / "tiny-imagenet-200"
    wnids = write_tinyimagenet(official)
    mirror = tmp_path / "mirror" / "tiny-imagenet-200"
    write_tinyimagenet(mirror)
    extra = ["n04", "n05"]
    (mirror / "wnids.txt").write_text("\n".join([*wnids, *extra]) + "\n")
    rng = np.random.default_rng(2)
    for wnid in extra:
        (mirror / "train" / wnid / "images").mkdir(parents=True)
        (mirror / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t8\t8\n")
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        (mirror / "train" / wnid / "images" / f"{wnid}_0.JPEG").write_bytes(png_bytes(img))
        (mirror / "val" / "images" / f"val_{wnid}.JPEG").write_bytes(png_bytes(img))
    with open(mirror / "val" / "val_annotations.txt", "a") as fh:
        fh.writelines(f"val_{wnid}.JPEG\t{wnid}\t0\t0\t8\t8\n" for wnid in extra)
    litter = [mirror, mirror / "train", mirror / "train" / "n01", mirror / "train" / "n01" / "images", mirror / "val"]
    for folder in [*litter, mirror / "val" / "images", mirror.parent]:
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(64)))
    train, val = load_dataset(str(mirror), "train"), load_dataset(str(mirror), "test")
    assert train.num_classes == 5 and train.classes[-2:] == ["n04", "n05"]  # no words.txt entry: the wnid itself
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 4] and val.labels.tolist() == [1, 2, 0, 3, 4]
    reference = load_dataset(str(zip_folder(official, tmp_path / "tiny-imagenet-200.zip")), "train")
    assert reference.num_classes == 3 and torch.equal(reference.images, train.images[:6])


def test_bundled_sample_is_stratified_cifar10() -> None:
    train, test = load_dataset("cifar10-sample", "train"), load_dataset("cifar10-sample", "test")
    assert train.classes[0] == "airplane" and train.classes[-1] == "truck" and len(train.classes) == 10
    assert train.labels.bincount().tolist() == [500] * 10 and test.labels.bincount().tolist() == [100] * 10
    assert train.images.shape[1:] == (3, 32, 32)


def test_second_load_comes_from_the_cache(image_folder: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = image_folder
    first = load_dataset(str(root), "train")

    def fail(*args: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setitem(formats.PARSERS, "image-folder", fail)
    second = load_dataset(str(root), "train")
    assert torch.equal(first.images, second.images) and second.classes == first.classes


def test_a_changed_file_is_decoded_again(image_folder: tuple[Path, dict]) -> None:
    root, written = image_folder
    first = torch.from_numpy(written["train"][0]).permute(2, 0, 1)
    assert torch.equal(load_dataset(str(root), "train").images[0], first)
    changed = root / "train" / CLASSES[0] / "0000.png"
    changed.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    os.utime(changed, ns=(1, 1))  # a new mtime even on a file system with coarse timestamps
    assert int(load_dataset(str(root), "train").images[0].sum()) == 0


def test_truncated_jpeg_is_named(image_folder: tuple[Path, dict]) -> None:
    root, _ = image_folder
    from PIL import Image

    bad = root / "train" / "bird" / "0001.jpg"
    Image.new("RGB", (8, 8), "red").save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"train/bird/0001\.jpg: unreadable image"):
        load_dataset(str(root), "train")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "train" / "extra").mkdir(), r"different classes \(e\.g\. 'extra'\)"),
        (lambda r: [p.unlink() for p in (r / "train" / "bird").iterdir()], r"train/bird: empty class folder"),
        (lambda r: (r / "train" / "bird" / "notes.txt").write_text("x"), r"notes\.txt: not an image file"),
        (
            lambda r: (r / "train" / "bird" / "0000.png").write_bytes(png_bytes(np.zeros((9, 8, 3), np.uint8))),
            r"0000\.png: image is 8x9 but the dataset's images are 8x8; set data.image_size",
        ),
        (lambda r: (r / "train").rename(r / "training"), r"layout matches no known dataset format"),
    ],
)
def test_bad_folders_get_one_line_errors(image_folder: tuple[Path, dict], damage, message: str) -> None:  # type: ignore[no-untyped-def]
    root, _ = image_folder
    damage(root)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(root), "train")
    assert "\n" not in str(info.value)


def test_other_sizes_are_resized_when_a_size_is_given(image_folder: tuple[Path, dict]) -> None:
    root, _ = image_folder
    (root / "train" / "bird" / "0000.png").write_bytes(png_bytes(np.zeros((12, 12, 3), np.uint8), "L"))
    data = load_dataset(str(root), "train", image_size=8)
    assert data.images.shape == (9, 3, 8, 8)
    assert int(data.images[6].max()) == 0  # the grayscale black image became RGB black


def test_missing_path_and_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_dataset("cifar10-sample", "dev")


def test_offline_download_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"cannot download .*cifar-10-python\.tar\.gz.*offline\?"):
        load_dataset("cifar10", "train", root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_archive_with_path_traversal_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escape.png")
        payload = png_bytes(np.zeros((8, 8, 3), np.uint8))
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match="escapes the archive"):
        load_dataset(str(archive), "train")
    assert not (tmp_path.parent / "escape.png").exists()


def test_stratified_subset_takes_equal_counts() -> None:
    data = load_dataset("cifar10-sample", "test").stratified(7, seed=3)
    assert data.labels.bincount().tolist() == [7] * 10
