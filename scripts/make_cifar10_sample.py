"""Build the bundled CIFAR-10 sample (src/advretrain/data/cifar10-sample.tar.gz) from a CIFAR-10 image-folder archive.

The sample is stratified (the same number of images per class), seeded, and keeps the original JPEG bytes, so it
is a few MB and loads through the same image-folder code as any user dataset. Reproduce it with:

    python scripts/make_cifar10_sample.py ../shared/datasets/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import tarfile
from pathlib import Path

from advretrain.data.formats import detect
from advretrain.data.trees import open_tree

OUT = Path(__file__).resolve().parents[1] / "src" / "advretrain" / "data" / "cifar10-sample.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("archive", type=Path)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tree = detect(open_tree(args.archive))
    rng = random.Random(args.seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
            for cls in tree.sub(split).children()[1]:
                names = tree.sub(f"{split}/{cls}").names()
                for name in sorted(rng.sample(names, per_class)):
                    data = tree.sub(f"{split}/{cls}").read(name)
                    info = tarfile.TarInfo(f"cifar10-sample/{split}/{cls}/{name}")
                    info.size, info.mtime, info.mode = (
                        len(data),
                        0,
                        0o644,
                    )  # fixed metadata: reproducible bytes
                    out.addfile(info, io.BytesIO(data))
    OUT.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0))  # mtime 0: reproducible bytes
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
