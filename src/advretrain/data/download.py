"""Download of the official archives with checksum verification; a clear error when offline."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from ..runtime.io import atomic_path


@dataclass(frozen=True)
class Remote:
    url: str
    filename: str
    md5: str  # the checksum each dataset's authors publish


REMOTES = {
    "cifar10": Remote(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "tinyimagenet": Remote(
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "tiny-imagenet-200.zip",
        "90528d7ca1a48142e341f4ef8d21d0de",
    ),
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(remote: Remote, root: Path) -> Path:
    """Fetch `remote` into `root`, verify its md5 and return the file; the file appears only when verified."""
    target = root / remote.filename
    with atomic_path(target) as tmp:
        try:
            with urllib.request.urlopen(remote.url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                with tqdm(total=total or None, unit="B", unit_scale=True, desc=remote.filename) as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise DataError(
                f"cannot download {remote.url} ({getattr(exc, 'reason', exc)}); offline? "
                f"put {remote.filename} in {root} (or pass --data-root DIR where it is)"
            ) from exc
        if (found := md5sum(tmp)) != remote.md5:
            raise DataError(f"{remote.url}: checksum {found} != {remote.md5}; the download is corrupt, try again")
    return target
