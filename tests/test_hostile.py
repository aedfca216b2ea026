"""Hostile input: every case ends with exit status 2 and one line, `error: ...`, that names the culprit and the fix,
with no traceback; untrusted files never run code or write outside their folder.

Each case builds its bad input in a fresh folder and returns the command line and the fragments the message must
hold. The command runs in-process through `advretrain.cli.main`, exactly as the console script does.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bytes, tar_folder, write_cifar_batches, write_image_folder
from PIL import Image

from advretrain.checkpoint import save_model
from advretrain.cli import main
from advretrain.models import build_model

Case = Callable[[Path, pytest.MonkeyPatch], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


class Pwn:
    """Unpickling this runs `touch <marker>`: the proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def folder(tmp: Path, per_class: int = 3) -> Path:
    root = tmp / "data"
    write_image_folder(root, per_class=per_class, size=16)
    return root


def train_on(data: Path | str, *extra: str) -> list[str]:
    return ["train", "--device", "cpu", f"data.dataset={data}", "train.epochs=1", "train.batch_size=4", *extra]


def run_on_thirty_images(tmp: Path, attack: str) -> list[str]:
    """`advretrain run` on a 3-class, 10-per-class image folder with one attack."""
    data = folder(tmp, per_class=10)
    return ["run", "--out", str(tmp / "r"), f"data.dataset={data}", "data.train_per_class=10", f"attacks=[{attack}]"]


def checkpoint(tmp: Path, name: str = "small", classes: int = 3, size: int = 16) -> Path:
    path = tmp / "ckpt" / "model.safetensors"
    save_model(path, build_model(name, classes, size))
    return path


# ---- datasets ------------------------------------------------------------------------------------------------


@case("truncated-jpeg")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = folder(tmp)
    bad = root / "train" / "bird" / "0001.jpg"
    Image.new("RGB", (16, 16), "red").save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:-40])
    return train_on(root), ["train/bird/0001.jpg", "unreadable image", "remove or replace this file"]


@case("non-image-bytes-with-image-name")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = folder(tmp)
    (root / "test" / "airplane" / "0000.png").write_text("this is not a PNG")
    return train_on(root), ["test/airplane/0000.png", "unreadable image"]


@case("non-image-file-among-images")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = folder(tmp)
    (root / "train" / "bird" / "notes.txt").write_text("x")
    return train_on(root), ["notes.txt: not an image file"]


@case("empty-class-folder")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = folder(tmp)
    for p in (root / "train" / "bird").iterdir():
        p.unlink()
    return train_on(root), ["train/bird: empty class folder"]


@case("train-test-classes-differ")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = folder(tmp)
    (root / "test" / "bird").rename(root / "test" / "birds")
    return train_on(root), ["different classes", "bird"]


@case("image-of-another-size")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = folder(tmp)
    (root / "train" / "bird" / "0000.png").write_bytes(png_bytes(np.zeros((9, 16, 3), np.uint8)))
    return train_on(root), ["0000.png: image is 16x9 but the dataset's images are 16x16", "set data.image_size"]


@case("dataset-path-missing")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return train_on(tmp / "nowhere"), [f"dataset '{tmp / 'nowhere'}' not found", "check the spelling"]


@case("layout-matches-no-format")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = folder(tmp)
    (root / "train").rename(root / "training")
    return train_on(root), ["layout matches no known dataset format"]


@case("offline-download")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    import urllib.error
    import urllib.request

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    mp.setattr(urllib.request, "urlopen", offline)
    return train_on("cifar10", f"data.root={tmp}"), ["cannot download", "cifar-10-python.tar.gz", "offline?"]


@case("malicious-dataset-pickle")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = tmp / "cifar-10-batches-py"
    write_cifar_batches(root)
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Pwn(tmp / "pwned"), b"labels": [0]}, protocol=2))
    return train_on(root), ["data_batch_1: refused to unpickle", "system"]


@case("cifar-batch-of-wrong-shape")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    root = tmp / "cifar-10-batches-py"
    write_cifar_batches(root)
    batch = {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]}
    (root / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    return train_on(root), ["data_batch_2"]


def evil_tar(path: Path, member: str) -> Path:
    with tarfile.open(path, "w") as tar:
        payload = png_bytes(np.zeros((8, 8, 3), np.uint8))
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


@case("archive-member-escapes-with-dotdot")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return train_on(evil_tar(tmp / "evil.tar", "../escape.png")), ["../escape.png", "escapes the archive"]


@case("archive-member-with-absolute-path")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return train_on(evil_tar(tmp / "evil.tar", str(tmp / "abs.png"))), ["escapes the archive"]


@case("truncated-archive")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    archive = tar_folder(folder(tmp), tmp / "data.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return train_on(archive), [str(archive)]


@case("tinyimagenet-annotation-names-unknown-class")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    from test_data import write_tinyimagenet

    root = tmp / "tiny-imagenet-200"
    write_tinyimagenet(root)
    notes = root / "val" / "val_annotations.txt"
    notes.write_text(notes.read_text().replace("n03", "n77"))
    return train_on(root), ["val_annotations.txt", "n77"]


@case("per-class-count-larger-than-a-class")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return train_on(folder(tmp), "data.train_per_class=5"), ["5 images per class requested", "has 3", "at most 3"]


@case("unknown-split")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["evaluate", "--checkpoint", str(checkpoint(tmp)), "--split", "dev"], ["'dev' is not one of", "--help"]


# ---- configs -------------------------------------------------------------------------------------------------


@case("unknown-key-with-suggestion")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["run", "train.epoch=3"], ["unknown config key 'train.epoch'", "did you mean 'train.epochs'?"]


@case("unknown-section-with-suggestion")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["run", "atack.fgsm.eps=0.1"], ["unknown config key 'atack'", "did you mean 'attack'?"]


@case("negative-eps")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args = run_on_thirty_images(tmp, "fgsm")
    expected = ["attack fgsm: eps", "greater than or equal to 0", "-0.1"]
    return [*args, "attack.fgsm.eps=-0.1", "retrain.sizes.fgsm=[5]"], expected


@case("retraining-size-larger-than-the-pool")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args = run_on_thirty_images(tmp, "gap")
    return [*args, "retrain.sizes.gap=[31]"], ["retrain.sizes.gap=[31]: N must lie in 1..30"]


@case("pca-dims-larger-than-the-data-in-a-run")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args = run_on_thirty_images(tmp, "fgsm")
    return [*args, "retrain.sizes.fgsm=[5]"], ["labeler.pca_dims=300 exceeds what 30 training images", "lower it"]


@case("pca-dims-larger-than-the-data-when-labelling")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    from advretrain.advset import craft_adversarial_set
    from advretrain.attacks import FGSM

    model = build_model("small", 10, 32)
    craft_adversarial_set(FGSM(), model, torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), tmp / "a", {})
    args = ["label", "--adversarial", str(tmp / "a"), "--pca-dims", "99999", "--out", str(tmp / "l.safetensors")]
    return args, ["pca_dims 99999 exceeds what 5000 images of 3072 values allow", "lower pca_dims"]


@case("config-file-not-yaml")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "bad.yaml").write_text("train: [unclosed\n")
    return ["run", "--config", str(tmp / "bad.yaml")], ["bad.yaml is not valid YAML", "fix its syntax"]


@case("config-file-not-a-mapping")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "list.yaml").write_text("- train\n")
    return ["run", "--config", str(tmp / "list.yaml")], ["must be a mapping of sections"]


@case("config-name-unknown")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["run", "--config", "cpu-quik"], ["config 'cpu-quik' is neither a file nor one of", "cpu-quick"]


@case("override-without-value")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["run", "train.epochs"], ["override 'train.epochs' is not KEY=VALUE"]


@case("value-of-the-wrong-type")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["run", "train.epochs=many"], ["config train.epochs", "'many'", "fix the value"]


@case("zero-epochs")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["train", "train.epochs=0"], ["config train.epochs: Input should be greater than or equal to 1"]


@case("unknown-attack-name")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["run", "attacks=[fgsn]"], ["config attacks.0", "'fgsn'"]


@case("unknown-attack-keyword")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args = run_on_thirty_images(tmp, "fgsm")
    return [*args, "attack.fgsm.epss=0.1", "retrain.sizes.fgsm=[5]"], ["attack fgsm:", "epss"]


@case("unknown-model-with-suggestion")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["train", "model.name=vgg61"], ["config model.name: unknown model (did you mean 'vgg16'?)"]


@case("model-too-small-for-the-images")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return train_on(folder(tmp), "model.name=vgg16"), ["model vgg16 needs images of at least 32px, got 16px"]


@case("cuda-requested-without-a-gpu")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    mp.setattr(torch.cuda, "is_available", lambda: False)
    return ["evaluate", "--checkpoint", str(checkpoint(tmp)), "--device", "cuda"], ["no CUDA GPU is visible"]


# ---- checkpoints and artifacts -------------------------------------------------------------------------------


@case("checkpoint-missing")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return ["evaluate", "--checkpoint", str(tmp / "model.safetensors")], ["does not exist", "train a model first"]


@case("malicious-pickle-checkpoint")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    torch.save({"model": Pwn(tmp / "pwned")}, tmp / "model.pt")
    return ["evaluate", "--checkpoint", str(tmp / "model.pt")], ["not a readable safetensors checkpoint"]


@case("safetensors-not-written-by-advretrain")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    return ["evaluate", "--checkpoint", str(tmp / "model.safetensors")], ["no model spec in its metadata"]


@case("checkpoint-of-another-architecture")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    path = checkpoint(tmp)
    from advretrain.checkpoint import read_metadata
    from advretrain.runtime.io import save_safetensors

    weights = build_model("small", 3, 16).state_dict()
    spec = json.loads(read_metadata(path)["spec"]) | {"name": "resnet18"}
    save_safetensors(path, dict(weights), {"spec": json.dumps(spec)})
    return ["evaluate", "--checkpoint", str(path)], ["weights do not fit a resnet18 with 3 classes"]


@case("checkpoint-with-fewer-classes-than-the-data")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    args = ["evaluate", "--checkpoint", str(checkpoint(tmp, classes=2)), "--data", str(folder(tmp))]
    return args, ["has 3 classes but the model predicts 2"]


@case("malicious-training-state")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    out = tmp / "out"
    out.mkdir()
    torch.save({"fingerprint": Pwn(tmp / "pwned")}, out / "train_state.pt")
    return [*train_on(folder(tmp)), "--out", str(out)], ["train_state.pt: unreadable training checkpoint"]


@case("training-state-of-another-job")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    out = tmp / "out"
    out.mkdir()
    torch.save({"fingerprint": "someone else's", "epoch": 1}, out / "train_state.pt")
    return [*train_on(folder(tmp)), "--out", str(out)], ["belongs to a different training job", "fresh --out"]


@case("fitted-file-that-is-not-a-gap")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "gap.safetensors").write_bytes(b"\x00" * 64)
    ckpt = str(checkpoint(tmp))
    args = ["attack", "--checkpoint", ckpt, "--attack", "gap", "--data", str(folder(tmp)), "--out", str(tmp / "a")]
    return [*args, "--fitted", str(tmp / "gap.safetensors")], [
        "not a readable fitted gap",
        "give the fitted.safetensors an attack wrote",
    ]


@case("folder-that-is-not-an-adversarial-set")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "a").mkdir()
    return ["label", "--adversarial", str(tmp / "a"), "--out", str(tmp / "l.safetensors")], ["adversarial set"]


@case("adversarial-set-folder-of-another-job")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "a").mkdir()
    (tmp / "a" / "job.json").write_text('{"attack": "deepfool"}')
    ckpt = str(checkpoint(tmp))
    args = ["attack", "--checkpoint", ckpt, "--attack", "fgsm", "--data", str(folder(tmp)), "--out", str(tmp / "a")]
    return args, ["holds a set made by another attack, model or data", "choose another --out"]


@case("report-of-an-unfinished-run")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    return ["report", str(tmp / "r")], ["has no results.json", "rerun `advretrain run --out`"]


# ---- NaN and inf ---------------------------------------------------------------------------------------------


@case("training-diverges-to-nan")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    return train_on(folder(tmp), "train.lr=1e30", "train.epochs=3"), ["training diverged", "lower train.lr"]


@case("model-with-nan-weights-under-attack")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    model = build_model("small", 3, 16)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 4).fill_(float("nan"))
    save_model(tmp / "nan.safetensors", model)
    args = ["attack", "--checkpoint", str(tmp / "nan.safetensors"), "--attack", "fgsm", "--data", str(folder(tmp))]
    return [*args, "--out", str(tmp / "a")], ["the model's logits are NaN or inf", "check the checkpoint"]


# ---- the disk ------------------------------------------------------------------------------------------------


@case("disk-full-while-writing-an-artifact")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr("advretrain.runtime.io.os.replace", full)
    return [*train_on(folder(tmp)), "--out", str(tmp / "out")], ["cannot write", "No space left on device"]


@case("read-only-output-folder")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    mp.setattr("advretrain.runtime.io.tempfile.mkstemp", read_only)
    return [*train_on(folder(tmp)), "--out", str(tmp / "out")], ["Read-only file system", "writable output folder"]


@case("output-folder-is-a-file")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "out").write_text("x")
    return [*train_on(folder(tmp)), "--out", str(tmp / "out")], ["is a file", "--help"]


@case("run-directory-of-another-config")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    (tmp / "r").mkdir()
    (tmp / "r" / "config.yaml").write_text("train:\n  epochs: 99\n")
    return ["run", "--out", str(tmp / "r")], ["holds a run of a different config", "use a fresh --out"]


@case("run-directory-in-use")
def _(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    import fcntl

    (tmp / "r").mkdir()
    held = open(tmp / "r" / ".lock", "w")  # noqa: SIM115 (held until the process ends, like a running run's)
    fcntl.flock(held, fcntl.LOCK_EX)
    mp.setattr(sys.modules[__name__], "_held_lock", held, raising=False)
    return ["run", "--out", str(tmp / "r")], ["is in use by another advretrain run"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_gets_one_line_and_exit_2(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args, fragments = CASES[name](tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)  # anything written to the working folder would show up here
    monkeypatch.setattr(sys, "argv", ["advretrain", "-q", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not (tmp_path / "pwned").exists()  # no file ever ran code...
    assert not (tmp_path.parent / "escape.png").exists() and not (tmp_path / "abs.png").exists()  # ...or escaped


def test_the_suite_is_large() -> None:
    assert len(CASES) >= 30
