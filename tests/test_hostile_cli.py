"""Hostile input, second pass: each case runs the real CLI in a subprocess under a time and a memory limit, so that
a hang or a bomb fails its test instead of stalling CI. Organised by the four kinds of failure (issue 24):

1. resources: inputs that would hang the process or exhaust its memory;
2. tracebacks: errors that used to escape as a Python traceback;
3. silent wrong results: inputs that used to give a wrong answer without a word;
4. (in `test_api_*` below) the Python API: advretrain's own errors, and 0 images as a legitimate input.

Every failing case must end with exactly one line `error: <what>; <fix>`, exit status 2, no traceback, no object
repr and no unbounded value; the cases that are legitimate input assert the documented handling instead.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar_batches, write_image_folder, zip_folder
from PIL import Image

from advretrain.checkpoint import save_model
from advretrain.models import build_model
from advretrain.runtime.io import save_safetensors

TIME_LIMIT_S = 90
MEMORY_LIMIT = 6 * 2**30  # address space: torch alone maps ~2-3 GiB; a bomb needs far more

HELD: list[object] = []  # locks the test process keeps while a case's command runs
Case = Callable[[Path], tuple[list[str], list[str]] | tuple[list[str], list[str], dict[str, str]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


def cli(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m advretrain -q ARGS` in `tmp`, with the limits above."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "advretrain", "-q", *args],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
        preexec_fn=limits,
        env=full_env,
        cwd=tmp,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    line = errors[0]
    assert "; " in line and len(line) < 400, line  # a fix, and no unbounded value
    assert " object at 0x" not in line and "<class " not in line, line  # no object repr
    return line


def images(tmp: Path, per_class: int = 3, size: int = 16) -> Path:
    root = tmp / "data"
    write_image_folder(root, per_class=per_class, size=size)
    return root


def train_on(data: Path | str, *extra: str) -> list[str]:
    return [
        "train",
        "--device",
        "cpu",
        "--out",
        "out",
        f"data.dataset={data}",
        "train.epochs=1",
        "train.batch_size=4",
        *extra,
    ]


def png_header_declaring(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width×height, then one tiny IDAT: a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def checkpoint(tmp: Path, spec: dict[str, object] | None = None) -> Path:
    path = tmp / "ckpt" / "model.safetensors"
    model = build_model("small", 3, 16)
    save_model(path, model)
    if spec is not None:
        save_safetensors(path, dict(model.state_dict()), {"spec": json.dumps(spec)})
    return path


def yaml_alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# ---- 1. resources ---------------------------------------------------------------------------------------------


@case("resources/yaml-alias-bomb-in-a-config")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "bomb.yaml").write_text(yaml_alias_bomb())
    return ["run", "--config", str(tmp / "bomb.yaml")], ["aliases expand it past 100,000 nodes"]


@case("resources/yaml-alias-bomb-in-an-override")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    flow = "{" + ", ".join(f"k{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 9) + "]" for i in range(9)) + "}"
    return ["run", f"attack={flow}"], ["override attack is not valid YAML", "aliases expand it past"]


@case("resources/yaml-nested-ten-thousand-deep")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "deep.yaml").write_text("a: " + "[" * 10000 + "]" * 10000 + "\n")
    return ["run", "--config", str(tmp / "deep.yaml")], ["deep.yaml"]


@case("resources/config-file-of-twenty-mebibytes")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "big.yaml").write_text("# " + "x" * (20 * 2**20) + "\n")
    return ["run", "--config", str(tmp / "big.yaml")], ["over 16 MiB"]


@case("resources/fifo-named-like-an-image")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    data = images(tmp)
    os.mkfifo(data / "train" / "bird" / "9999.png")
    return train_on(data), ["9999.png", "not a regular file"]


@case("resources/symlink-to-a-device")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    data = images(tmp)
    (data / "train" / "bird" / "9999.png").symlink_to("/dev/zero")
    return train_on(data), ["9999.png", "not a regular file"]


@case("resources/png-declaring-ten-gigapixels")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    data = images(tmp)
    (data / "train" / "bird" / "0000.png").write_bytes(png_header_declaring(100_000, 100_000))
    return train_on(data), ["0000.png", "100000x100000", "pixel limit"]


@case("resources/png-declaring-gigapixels-inside-a-zip")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    data = images(tmp)
    (data / "test" / "bird" / "0001.png").write_bytes(png_header_declaring(60_000, 60_000))
    return train_on(zip_folder(data, tmp / "data.zip")), ["0001.png", "pixel limit"]


@case("resources/file-over-the-per-file-limit")
def _(tmp: Path) -> tuple[list[str], list[str], dict[str, str]]:
    return train_on(images(tmp)), ["over the 100-byte limit per file"], {"ADVRETRAIN_MAX_FILE_BYTES": "100"}


@case("resources/tar-member-declaring-more-than-the-limit")
def _(tmp: Path) -> tuple[list[str], list[str], dict[str, str]]:
    data = images(tmp)
    archive = tmp / "data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(data, arcname="data")
    return train_on(archive), ["data.tar", "over the 150-byte limit per file"], {"ADVRETRAIN_MAX_FILE_BYTES": "150"}


@case("resources/zip-over-the-dataset-limit")
def _(tmp: Path) -> tuple[list[str], list[str], dict[str, str]]:
    archive = zip_folder(images(tmp), tmp / "data.zip")
    return train_on(archive), ["data.zip", "limit per dataset"], {"ADVRETRAIN_MAX_DATASET_BYTES": "1000"}


@case("resources/folder-over-the-dataset-limit")
def _(tmp: Path) -> tuple[list[str], list[str], dict[str, str]]:
    return train_on(images(tmp)), ["limit per dataset"], {"ADVRETRAIN_MAX_DATASET_BYTES": "1000"}


@case("resources/pixel-limit-set-below-the-images")
def _(tmp: Path) -> tuple[list[str], list[str], dict[str, str]]:
    return train_on(images(tmp)), ["declares 16x16 pixels", "pixel limit"], {"ADVRETRAIN_MAX_IMAGE_PIXELS": "10"}


@case("resources/limit-that-is-not-a-number")
def _(tmp: Path) -> tuple[list[str], list[str], dict[str, str]]:
    return train_on(images(tmp)), ["ADVRETRAIN_MAX_IMAGE_PIXELS='lots'"], {"ADVRETRAIN_MAX_IMAGE_PIXELS": "lots"}


@case("resources/checkpoint-declaring-a-billion-classes")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    ckpt = checkpoint(tmp, {"name": "small", "num_classes": 10**9, "image_size": 16})
    return ["evaluate", "--checkpoint", str(ckpt), "--data", str(images(tmp))], ["1000000000 classes", "1..100,000"]


@case("resources/checkpoint-declaring-huge-images")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    ckpt = checkpoint(tmp, {"name": "small", "num_classes": 3, "image_size": 10**6})
    return ["evaluate", "--checkpoint", str(ckpt), "--data", str(images(tmp))], ["image size 1000000", "4096"]


@case("resources/gap-state-declaring-a-huge-generator")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    from advretrain.attacks import GAP

    data = images(tmp)
    gap = GAP(epochs=1, batch_size=4, holdout=2, ngf=4).fit(build_model("small", 3, 16), torch.rand(12, 3, 16, 16))
    tensors, metadata = gap.state_dict()
    save_safetensors(tmp / "gap.safetensors", tensors, {**metadata, "ngf": str(10**7)})
    args = ["attack", "--checkpoint", str(checkpoint(tmp)), "--attack", "gap", "--data", str(data)]
    args += ["--fitted", str(tmp / "gap.safetensors"), "--out", str(tmp / "adv"), "--limit", "3"]
    return args, ["__no_error__"]


# ---- 2. tracebacks --------------------------------------------------------------------------------------------


@case("tracebacks/override-with-an-unclosed-bracket")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["train", "train.epochs=[1"], ["override train.epochs is not valid YAML", "line 1"]


@case("tracebacks/override-with-a-python-tag")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["train", "train.epochs=!!python/object/apply:os.system [id]"], ["explicit tag"]


@case("tracebacks/config-with-a-binary-tag")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "c.yaml").write_text("train:\n  epochs: !!binary aGVsbG8=\n")
    return ["train", "--config", str(tmp / "c.yaml")], ["c.yaml", "explicit tag"]


@case("tracebacks/config-with-a-custom-tag")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "c.yaml").write_text("train: !mine {epochs: 2}\n")
    return ["run", "--config", str(tmp / "c.yaml")], ["explicit tag '!mine'"]


@case("tracebacks/config-not-utf8")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "c.yaml").write_bytes("train:\n  epochs: 2 # caf\xe9\n".encode("latin-1"))
    return ["run", "--config", str(tmp / "c.yaml")], ["c.yaml", "not UTF-8"]


@case("tracebacks/config-is-a-directory")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "conf.yaml").mkdir()
    return ["run", "--config", str(tmp / "conf.yaml")], ["conf.yaml", "not a regular file"]


@case("tracebacks/run-record-config-not-utf8")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    (tmp / "r" / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
    return ["run", "--out", str(tmp / "r")], ["config.yaml", "not UTF-8"]


@case("tracebacks/run-record-config-is-a-directory")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r" / "config.yaml").mkdir(parents=True)
    return ["run", "--out", str(tmp / "r")], ["config.yaml", "not a regular file"]


@case("tracebacks/run-record-config-with-a-python-tag")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    (tmp / "r" / "config.yaml").write_text("!!python/object/apply:os.system [id]\n")
    return ["run", "--out", str(tmp / "r")], ["explicit tag"]


@case("tracebacks/zip-member-with-a-bad-crc")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    archive = zip_folder(images(tmp), tmp / "data.zip")
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("data/train/bird/0000.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 20] ^= 0xFF  # a byte of the stored member (zip_folder stores; the CRC no longer matches)
    archive.write_bytes(bytes(raw))
    return train_on(archive), ["data.zip", "0000.png", "damaged or encrypted member"]


def set_zip_flag(raw: bytearray, member: str, bit: int) -> None:
    """Set a general-purpose flag bit of `member` in its local header and its central directory entry."""
    name = member.encode()
    local = raw.find(name) - 30  # a local header is 30 bytes before its file name
    raw[local + 6] |= bit
    central = raw.find(b"PK\x01\x02")
    while central >= 0:
        length = int.from_bytes(raw[central + 28 : central + 30], "little")
        if raw[central + 46 : central + 46 + length] == name:
            raw[central + 8] |= bit
            return
        central = raw.find(b"PK\x01\x02", central + 4)
    raise AssertionError(member)


@case("tracebacks/zip-member-marked-encrypted")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    archive = zip_folder(images(tmp), tmp / "data.zip")
    raw = bytearray(archive.read_bytes())
    set_zip_flag(raw, "data/train/bird/0000.png", 0x01)  # "encrypted": a password would be needed
    archive.write_bytes(bytes(raw))
    return train_on(archive), ["0000.png", "damaged or encrypted member"]


@case("tracebacks/dangling-symlink-in-a-dataset")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    data = images(tmp)
    (data / "train" / "bird" / "9999.png").symlink_to(tmp / "nowhere.png")
    return train_on(data), ["9999.png", "broken link"]


@case("tracebacks/dataset-without-any-image")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    for split in ("train", "test"):
        (tmp / "data" / split / "cat").mkdir(parents=True)
    return train_on(tmp / "data"), ["empty class folder"]


@case("tracebacks/cifar-batch-holding-strings")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    root = tmp / "cifar-10-batches-py"
    write_cifar_batches(root)
    batch = {b"data": ["not", "pixels"], b"labels": [0, 1]}
    (root / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    return train_on(root), ["data_batch_2", "not a uint8 array"]


@case("tracebacks/cifar-labels-that-are-not-integers")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    root = tmp / "cifar-10-batches-py"
    write_cifar_batches(root)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["cat", "dog"]}
    (root / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    return train_on(root), ["test_batch", "labels are not a list of integers"]


@case("tracebacks/cifar-meta-that-is-a-list")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    root = tmp / "cifar-10-batches-py"
    write_cifar_batches(root)
    (root / "batches.meta").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    return train_on(root), ["batches.meta", "not a CIFAR meta file"]


@case("tracebacks/annotation-line-of-one-column")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    from test_data import write_tinyimagenet

    root = tmp / "tiny-imagenet-200"
    write_tinyimagenet(root)
    notes = root / "val" / "val_annotations.txt"
    notes.write_text(notes.read_text() + "lonely.JPEG\n")
    return train_on(root), ["val_annotations.txt", "one column"]


@case("tracebacks/adversarial-set-record-damaged")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "adv").mkdir()
    (tmp / "adv" / "meta.json").write_text("{not json")
    return ["label", "--adversarial", str(tmp / "adv"), "--reference", str(images(tmp)), "--out", "l.safetensors"], [
        "meta.json",
        "damaged",
    ]


@case("tracebacks/adversarial-set-naming-a-shard-outside-it")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "adv").mkdir()
    (tmp / "adv" / "meta.json").write_text(json.dumps({"shards": ["../../etc/passwd"]}))
    return ["label", "--adversarial", str(tmp / "adv"), "--reference", str(images(tmp)), "--out", "l.safetensors"], [
        "names a shard"
    ]


@case("tracebacks/adversarial-set-with-missing-tensors")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "adv").mkdir()
    save_safetensors(tmp / "adv" / "shard-00000.safetensors", {"adversarial": torch.rand(2, 3, 16, 16)}, {})
    (tmp / "adv" / "meta.json").write_text(json.dumps({"shards": ["shard-00000.safetensors"]}))
    return ["label", "--adversarial", str(tmp / "adv"), "--reference", str(images(tmp)), "--out", "l.safetensors"], [
        "damaged adversarial set"
    ]


@case("tracebacks/report-on-a-record-that-is-not-json")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text("{")
    return ["report", str(tmp / "r")], ["results.json", "unreadable"]


@case("tracebacks/report-on-a-record-of-another-schema")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text('{"schema_version": 99}')
    return ["report", str(tmp / "r")], ["schema version 99"]


@case("tracebacks/train-batch-of-one")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return train_on(images(tmp), "train.batch_size=1"), ["train.batch_size", "greater than or equal to 2"]


@case("tracebacks/attack-batch-size-zero")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    args = ["attack", "--checkpoint", str(checkpoint(tmp)), "--attack", "fgsm", "--data", str(images(tmp))]
    return [*args, "--out", str(tmp / "adv"), "batch_size=0"], ["attack fgsm: batch_size"]


@case("tracebacks/debug-still-exits-2")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["--debug", "train", "train.epochs=[1"], ["__debug__"]


@case("tracebacks/override-of-a-section-by-a-value")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "train.epochs.x=3"], ["config train.epochs: Input should be a valid integer"]


@case("tracebacks/evaluate-a-text-file-as-checkpoint")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "m.safetensors").write_text("hello")
    return ["evaluate", "--checkpoint", str(tmp / "m.safetensors"), "--data", str(images(tmp))], ["m.safetensors"]


@case("tracebacks/checkpoint-spec-of-the-wrong-types")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    ckpt = checkpoint(tmp, {"name": "small", "num_classes": "three", "image_size": 16})
    return ["evaluate", "--checkpoint", str(ckpt), "--data", str(images(tmp))], ["'three' classes"]


@case("tracebacks/label-a-folder-that-is-no-set")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "adv").mkdir()
    return ["label", "--adversarial", str(tmp / "adv"), "--reference", str(images(tmp)), "--out", "l.safetensors"], [
        "not a complete"
    ]


# ---- 3. silent wrong results ----------------------------------------------------------------------------------


@case("silent/attack-eps-of-two")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    args = ["attack", "--checkpoint", str(checkpoint(tmp)), "--attack", "fgsm", "--data", str(images(tmp))]
    return [*args, "--out", str(tmp / "adv"), "eps=2"], ["attack fgsm: eps", "less than or equal to 1"]


@case("silent/attack-lr-nan-in-a-run")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "attack.gap.lr=.nan"], ["attack gap: lr", "finite number"]


@case("silent/attack-steps-not-whole")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "attack.deepfool.steps=2.5"], ["attack deepfool: steps", "valid integer"]


@case("silent/attack-queries-infinite")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "attack.square.p_init=.inf"], ["attack square: p_init"]


@case("silent/training-lr-nan")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["train", "train.lr=.nan"], ["config train.lr", "finite number"]


@case("silent/threat-budget-above-one")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "threats.budgets=[2]"], ["threats.budgets.0"]


@case("silent/gap-generator-of-no-width")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "attack.gap.ngf=0"], ["attack gap: ngf"]


@case("silent/float-image-in-a-dataset")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    data = images(tmp)
    Image.fromarray(np.full((16, 16), 0.5, np.float32), mode="F").save(data / "train" / "bird" / "0000.tif")
    return train_on(data), ["0000.tif", "floating-point pixels"]


@case("silent/train-refused-leaves-the-folder-config-untouched")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "out").mkdir()
    (tmp / "out" / "config.yaml").write_text("train:\n  epochs: 7\n")
    return train_on(images(tmp)), ["holds a run of a different config"]


@case("silent/train-on-a-folder-in-use")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    import fcntl

    (tmp / "out").mkdir()
    held = open(tmp / "out" / ".lock", "w")  # noqa: SIM115 (kept open by the test process while the CLI runs)
    fcntl.flock(held, fcntl.LOCK_EX)
    HELD.append(held)
    return train_on(images(tmp)), ["is in use by another advretrain run"]


@case("resources/yaml-alias-bomb-in-a-run-record")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    (tmp / "r" / "config.yaml").write_text(yaml_alias_bomb())
    return ["run", "--out", str(tmp / "r")], ["config.yaml", "aliases expand it past"]


@case("silent/labeling-adversarials-that-hold-nan")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    adv = tmp / "adv"
    adv.mkdir()
    tensors = {
        "adversarial": torch.full((2, 3, 16, 16), float("nan")),
        "indices": torch.arange(2),
        "labels": torch.zeros(2, dtype=torch.long),
        "targets": torch.full((2,), -1),
        "success": torch.ones(2, dtype=torch.bool),
    }
    save_safetensors(adv / "shard-00000.safetensors", tensors, {})
    (adv / "meta.json").write_text(json.dumps({"shards": ["shard-00000.safetensors"]}))
    args = ["label", "--adversarial", str(adv), "--reference", str(images(tmp, per_class=10)), "--out", "l.safetensors"]
    return [*args, "--pca-dims", "5"], ["NaN or inf"]


@case("silent/white-box-attack-listed-as-query-only")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "threats.query=[pgd]"], ["threats.query.0", "pgd is not a query-only attack"]


@case("silent/surrogate-that-would-be-f0")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "threats.surrogate_seed=0"], ["the surrogate would be f0 itself"]


@case("tracebacks/report-on-a-record-that-is-a-list")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text("[1, 2]")
    return ["report", str(tmp / "r")], ["results.json"]


@case("tracebacks/report-with-its-figure-data-missing")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    from advretrain.results import AttackResults, Results, RetrainRow

    metrics = {"fooling_ratio": 0.5, "fooling_ratio_8bit": 0.5, "success_on_correct": 0.5, "l2_median": 0.1}
    metrics |= {"adversarial_accuracy": 0.4}
    row = RetrainRow(10, 0.5, 0.4, metrics, metrics, None)
    attack = AttackResults("FGSM", "white-box", {}, metrics, {}, [row])
    record = Results("cifar10-sample", 10, "small", 100, 10, 0.5, "scratch", "oracle", {"fgsm": attack})
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text(json.dumps(record.to_dict()))
    return ["report", str(tmp / "r")], ["figures/fgsm.safetensors", "figure data of fgsm"]


@case("tracebacks/report-on-a-record-missing-a-metric")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    from advretrain.results import AttackResults, Results, RetrainRow

    row = RetrainRow(10, 0.5, 0.4, {}, {}, None)
    attack = AttackResults("FGSM", "white-box", {}, {}, {}, [row])
    record = Results("cifar10-sample", 10, "small", 100, 10, 0.5, "scratch", "oracle", {"fgsm": attack})
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text(json.dumps(record.to_dict()))
    return ["report", str(tmp / "r")], ["results.json is damaged", "KeyError"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_cli_case(name: str, tmp_path: Path) -> None:
    made = CASES[name](tmp_path)
    args, fragments = made[0], made[1]
    env = made[2] if len(made) == 3 else None  # type: ignore[misc]
    before = (tmp_path / "out" / "config.yaml").read_bytes() if (tmp_path / "out" / "config.yaml").exists() else None
    proc = cli(args, tmp_path, env)
    if fragments == ["__no_error__"]:  # legitimate input: the documented handling, not an error
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    if fragments == ["__debug__"]:
        assert (
            proc.returncode == 2 and "Traceback" in proc.stderr and proc.stderr.splitlines()[-1].startswith("error: ")
        )
        return
    line = one_error_line(proc)
    for fragment in fragments:
        assert fragment in line, line
    if before is not None:  # refused before anything in the folder was written
        assert (tmp_path / "out" / "config.yaml").read_bytes() == before


def test_the_second_pass_is_large() -> None:
    assert len(CASES) >= 60


# ---- 3. silent wrong results, checked on the values ------------------------------------------------------------


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    from advretrain import load_dataset

    data = images(tmp_path)
    grey = np.full((16, 16), 32768, np.uint16)  # mid-grey in 16 bits: 8-bit 128, not white
    Image.fromarray(grey).save(data / "train" / "bird" / "0000.png")
    loaded = load_dataset(str(data), "train")
    bird = loaded.classes.index("bird")
    first_bird = int((loaded.labels == bird).nonzero()[0])
    assert loaded.images[first_bird].unique().tolist() == [128]


def test_stale_temporary_files_are_removed_by_the_next_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".model.safetensors.abc123.tmp").write_bytes(b"half a file")
    proc = cli(train_on(images(tmp_path)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.rglob("*.tmp")) and (out / "model.safetensors").exists()


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    from advretrain.runtime.io import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "tables.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "tables.md").stat().st_mode & 0o777 == 0o644


# ---- 4. the Python API --------------------------------------------------------------------------------------------


def api_model() -> torch.nn.Module:
    return build_model("small", 3, 16).eval()


@pytest.mark.parametrize(
    ("images_", "labels", "message"),
    [
        (torch.rand(2, 3, 16, 16), torch.tensor([0.0, 1.0]), "labels must be integer class indices"),
        (torch.rand(2, 3, 16, 16), torch.tensor([0, 7]), "label 7 is out of range for a model of 3 classes"),
        (torch.rand(2, 3, 16, 16), torch.tensor([0, -1]), "labels must be class indices >= 0"),
        (torch.rand(2, 16, 16), torch.tensor([0, 1]), "float N×C×H×W"),
        (torch.full((2, 3, 16, 16), float("nan")), torch.tensor([0, 1]), "NaN or inf"),
    ],
)
def test_api_attacks_raise_advretrains_errors(images_: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    from advretrain.attacks import AttackError, build_attack

    with pytest.raises(AttackError, match=message):
        build_attack("pgd", steps=1)(api_model(), images_, labels)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "deepfool", "cw", "square", "gap"])
def test_api_zero_images_give_an_empty_result(name: str) -> None:
    from advretrain.attacks import build_attack

    attack = build_attack(name, **({"epochs": 1, "holdout": 2, "ngf": 4, "batch_size": 4} if name == "gap" else {}))
    if name == "gap":
        attack.fit(api_model(), torch.rand(12, 3, 16, 16))
    result = attack(api_model(), torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
    assert result.adversarial.shape == (0, 3, 16, 16) and result.success.shape == (0,)


def test_api_float64_images_are_attacked_in_the_models_dtype() -> None:
    from advretrain.attacks import build_attack

    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    result = build_attack("fgsm", eps=0.03)(api_model(), x, torch.tensor([0, 1]))
    assert result.adversarial.dtype == torch.float64 and float((result.adversarial - x).abs().max()) <= 0.03 + 1e-6


def test_api_labeler_refuses_nan_mismatched_sizes_and_bad_labels() -> None:
    from advretrain.labeler import KNNLabeler, LabelerError

    refs, labels = torch.rand(40, 3, 8, 8), torch.arange(40) % 4
    with pytest.raises(LabelerError, match="NaN or inf"):
        KNNLabeler(5, fooling_percentile=None).fit(torch.full((40, 3, 8, 8), float("nan")), labels)
    with pytest.raises(LabelerError, match="integer labels"):
        KNNLabeler(5, fooling_percentile=None).fit(refs, labels.float())
    labeler = KNNLabeler(5, fooling_percentile=None).fit(refs, labels)
    with pytest.raises(LabelerError, match="images of 768 values, the reference set's have 192"):
        labeler.predict(torch.rand(2, 3, 16, 16))
    with pytest.raises(LabelerError, match="NaN or inf"):
        labeler.predict(torch.full((2, 3, 8, 8), float("inf")))


def test_api_absurd_class_counts_are_refused_before_allocating() -> None:
    from advretrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"1\.\.100,000"):
        build_model("small", 10**9, 32)
