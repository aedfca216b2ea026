"""The limits policy for data entering advretrain: one place, checked where the bytes are read (README, bad input).

- Only regular files are read: a FIFO, a device or a socket in a dataset is refused (it could hang a run or read
  forever); a symbolic link is followed only to a regular file, and a dangling one is refused.
- An image may declare at most `MAX_IMAGE_PIXELS` pixels (checked from its header, before it is decoded): a PNG of
  a few KB can declare gigapixels.
- A file, and an archive or dataset folder in total, may hold at most `MAX_FILE_BYTES` / `MAX_DATASET_BYTES`
  (archives are read in memory: their members' declared sizes are checked before anything is inflated).

The defaults admit ImageNet-scale data (its largest images are ~ 40 MP, its training set ~ 150 GB); set
`ADVRETRAIN_MAX_IMAGE_PIXELS`, `ADVRETRAIN_MAX_FILE_BYTES` or `ADVRETRAIN_MAX_DATASET_BYTES` to change them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import DataError


def _limit(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"{name}={raw[:40]!r} is not a whole number; unset it or give a number") from None
    if value < 1:
        raise DataError(f"{name}={value} must be at least 1; unset it or give a positive number")
    return value


# Pixels a side of the images a model takes (data.image_size, a checkpoint's spec): 16x ImageNet's usual 256.
MAX_IMAGE_SIDE = 4096


def max_image_pixels() -> int:
    return _limit("ADVRETRAIN_MAX_IMAGE_PIXELS", 64 * 2**20)


def max_file_bytes() -> int:
    return _limit("ADVRETRAIN_MAX_FILE_BYTES", 2 * 2**30)


def max_dataset_bytes() -> int:
    return _limit("ADVRETRAIN_MAX_DATASET_BYTES", 512 * 2**30)


def regular_file_size(path: Path, where: str) -> int:
    """The size of `path` if it is (or links to) a regular file within the per-file limit; else one DataError."""
    try:
        st = path.stat()  # follows a link: a dangling one raises here
    except FileNotFoundError:
        raise DataError(f"{where}: a broken link (its target does not exist); remove it or fix the link") from None
    except OSError as exc:
        raise DataError(f"{where}: cannot be read ({exc.strerror}); check its permissions") from exc
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{where}: not a regular file (a FIFO, device or socket); remove it from the dataset")
    check_file_bytes(st.st_size, where)
    return st.st_size


def check_file_bytes(size: int, where: str) -> None:
    if size > max_file_bytes():
        raise DataError(
            f"{where}: {size:,} bytes, over the {max_file_bytes():,}-byte limit per file; remove it or raise "
            "ADVRETRAIN_MAX_FILE_BYTES"
        )


def check_total_bytes(total: int, where: str) -> None:
    if total > max_dataset_bytes():
        raise DataError(
            f"{where}: {total:,} bytes in all, over the {max_dataset_bytes():,}-byte limit per dataset; use a "
            "subset or raise ADVRETRAIN_MAX_DATASET_BYTES"
        )


def check_pixels(width: int, height: int, where: str) -> None:
    if width * height > max_image_pixels():
        raise DataError(
            f"{where}: declares {width}x{height} pixels, over the {max_image_pixels():,}-pixel limit per image; "
            "remove it or raise ADVRETRAIN_MAX_IMAGE_PIXELS"
        )


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_decoded_bytes(count: int, width: int, height: int, where: str, value_bytes: int = 1) -> None:
    """Refuse, before allocating, `count` RGB images of width×height (`value_bytes` a value) that memory cannot
    hold: a resize to a large `data.image_size` would otherwise end in MemoryError."""
    need, have = count * 3 * width * height * value_bytes, memory_bytes()
    if need > have:
        raise DataError(
            f"{where}: {count:,} images at {width}x{height} px need {need / 2**30:,.1f} GiB, more than this machine's "
            f"{have / 2**30:,.1f} GiB of memory; lower data.image_size or use a subset of the images"
        )
