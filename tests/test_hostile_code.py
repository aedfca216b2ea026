"""Hostile input, third pass (issue 32): a file never makes advretrain import code, and the last inputs that ended
in a traceback, a MemoryError or a silent surprise.

The code cases plant a module, `recorder`, on the import path of the command: importing it writes a marker file. A
checkpoint's metadata, a run's recorded config or a stage's model naming `recorder:build` must never import it;
naming it yourself (`--model`, `model.name`, `builder=`) must.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar_batches, write_image_folder
from test_hostile_cli import cli, one_error_line

from advretrain.checkpoint import load_model, save_model
from advretrain.errors import CheckpointError, ConfigError, DataError
from advretrain.labeler import KNNLabeler, LabelerError
from advretrain.models import build_model
from advretrain.runtime.io import save_safetensors

RECORDER = """
import os
import pathlib

import torch

pathlib.Path(os.environ["RECORDER_MARKER"]).write_text("imported")  # the proof that something imported this module


def build(num_classes, image_size):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * image_size * image_size, num_classes))
"""


class Planted:
    """The recorder module in `tmp/plugins`, the environment that makes it importable, and its marker."""

    def __init__(self, tmp: Path) -> None:
        self.folder = tmp / "plugins"
        self.folder.mkdir(exist_ok=True)
        (self.folder / "recorder.py").write_text(RECORDER)
        self.marker = tmp / "recorder-was-imported"
        path = os.pathsep.join(p for p in (str(self.folder), os.environ.get("PYTHONPATH")) if p)
        self.env = {"PYTHONPATH": path, "RECORDER_MARKER": str(self.marker)}

    def imported(self) -> bool:
        return self.marker.exists()


def recorder_checkpoint(tmp: Path, folder: str = "ckpt") -> Path:
    """A checkpoint whose metadata names `recorder:build` (with a registry model's weights: never loaded)."""
    path = tmp / folder / "model.safetensors"
    model = build_model("small", 3, 16)
    spec = {"name": "recorder:build", "num_classes": 3, "image_size": 16, "flip_average": False}
    save_safetensors(path, dict(model.state_dict()), {"spec": json.dumps(spec)})
    return path


# What a run on `data(tmp)` (3 classes of 3 images at 16 px) needs to pass its checks and reach the step tested.
RUNNABLE = ["data.train_per_class=3", "attacks=[fgsm]", "retrain.sizes.fgsm=[3]", "labeler.pca_dims=2", "device=cpu"]


def data(tmp: Path, per_class: int = 3) -> Path:
    root = tmp / "data"
    if not root.exists():
        write_image_folder(root, per_class=per_class, size=16)
    return root


# ---- a file never imports code ---------------------------------------------------------------------------------

CodeCase = Callable[[Path, Planted], list[str]]
CODE_CASES: dict[str, tuple[CodeCase, list[str]]] = {}


def code_case(name: str, *fragments: str) -> Callable[[CodeCase], CodeCase]:
    def register(fn: CodeCase) -> CodeCase:
        CODE_CASES[name] = (fn, list(fragments))
        return fn

    return register


@code_case("attack-checkpoint", "ckpt/model.safetensors", "recorder:build", "--model recorder:build")
def _(tmp: Path, planted: Planted) -> list[str]:
    ckpt = recorder_checkpoint(tmp)
    return ["attack", "--checkpoint", str(ckpt), "--attack", "fgsm", "--data", str(data(tmp)), "--out", "a"]


@code_case("evaluate-checkpoint", "ckpt/model.safetensors", "never runs code")
def _(tmp: Path, planted: Planted) -> list[str]:
    return ["evaluate", "--checkpoint", str(recorder_checkpoint(tmp).parent), "--data", str(data(tmp))]


@code_case("run-with-model-checkpoint", "ckpt/model.safetensors", "model.name=recorder:build")
def _(tmp: Path, planted: Planted) -> list[str]:
    ckpt = recorder_checkpoint(tmp)
    return ["run", "--out", "r", f"data.dataset={data(tmp)}", f"model.checkpoint={ckpt}", *RUNNABLE]


@code_case("attack-checkpoint-naming-another-builder", "recorder:build", "--model recorder:build")
def _(tmp: Path, planted: Planted) -> list[str]:
    (planted.folder / "other.py").write_text("def build(num_classes, image_size):\n    raise SystemExit(3)\n")
    ckpt = recorder_checkpoint(tmp)
    args = ["attack", "--checkpoint", str(ckpt), "--model", "other:build", "--attack", "fgsm"]
    return [*args, "--data", str(data(tmp)), "--out", "a"]


@code_case("run-record-naming-a-model-builder", "holds a run of a different config", "fresh --out")
def _(tmp: Path, planted: Planted) -> list[str]:
    (tmp / "r").mkdir()
    (tmp / "r" / "config.yaml").write_text("model:\n  name: recorder:build\n")
    return ["run", "--out", "r", f"data.dataset={data(tmp)}", *RUNNABLE]


@code_case("run-record-naming-an-attack-class", "holds a run of a different config")
def _(tmp: Path, planted: Planted) -> list[str]:
    (tmp / "r").mkdir()
    (tmp / "r" / "config.yaml").write_text("attacks: [recorder:build]\nretrain:\n  sizes: {recorder:build: [3]}\n")
    return ["run", "--out", "r", f"data.dataset={data(tmp)}", *RUNNABLE]


@code_case("train-record-naming-a-model-builder", "holds a run of a different config")
def _(tmp: Path, planted: Planted) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "config.yaml").write_text("model:\n  name: recorder:build\n")
    return ["train", "--out", "out", f"data.dataset={data(tmp)}", "train.epochs=1", "train.batch_size=4"]


@pytest.mark.parametrize("name", sorted(CODE_CASES))
def test_a_file_naming_code_is_refused_without_importing_it(name: str, tmp_path: Path) -> None:
    planted = Planted(tmp_path)
    make, fragments = CODE_CASES[name]
    args = make(tmp_path, planted)
    line = one_error_line(cli(args, tmp_path, planted.env))
    for fragment in fragments:
        assert fragment in line, line
    assert not planted.imported(), f"{name}: the module a file named was imported"
    assert not (tmp_path / "r" / "stages").exists() and not (tmp_path / "a").exists()


def test_report_on_a_run_whose_files_name_code_imports_nothing(finished_run: Path, tmp_path: Path) -> None:
    """`report` reads the record only: a recorded config and stage checkpoints naming code change nothing."""
    planted = Planted(tmp_path)
    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "config.yaml").write_text("model:\n  name: recorder:build\nattacks: [recorder:build]\n")
    for stage in sorted((run_dir / "stages").glob("baseline-*")):
        recorder_checkpoint(stage, ".")  # stage/model.safetensors now names recorder:build
    proc = cli(["report", str(run_dir)], tmp_path, planted.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not planted.imported()


def test_load_model_refuses_a_file_naming_code_and_loads_it_when_asked(tmp_path: Path) -> None:
    """The API: refused without a word of code run; `builder=` the file's own name loads it (and imports it)."""
    planted = Planted(tmp_path)
    ckpt = tmp_path / "mine" / "model.safetensors"
    script = (
        "import sys; from advretrain.models import build_model; from advretrain.checkpoint import save_model; "
        "save_model(sys.argv[1], build_model('recorder:build', 3, 16))"
    )
    env = {**os.environ, **planted.env}
    subprocess.run([sys.executable, "-c", script, str(ckpt)], check=True, env=env)
    planted.marker.unlink()  # writing it imported the module; loading must not
    refuse = "from advretrain.checkpoint import load_model; import sys; load_model(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", refuse, str(ckpt)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "CheckpointError" in proc.stderr and "never runs code" in proc.stderr
    assert not planted.imported()
    deliberate = (
        "from advretrain.checkpoint import load_model; import sys, torch; "
        "m = load_model(sys.argv[1], builder='recorder:build'); print(tuple(m(torch.rand(2, 3, 16, 16)).shape))"
    )
    proc = subprocess.run([sys.executable, "-c", deliberate, str(ckpt)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 3)", proc.stderr[-2000:]
    assert planted.imported()


def test_evaluate_with_the_checkpoints_own_builder_named_loads_it(tmp_path: Path) -> None:
    planted = Planted(tmp_path)
    ckpt = tmp_path / "mine" / "model.safetensors"
    script = (
        "import sys; from advretrain.models import build_model; from advretrain.checkpoint import save_model; "
        "save_model(sys.argv[1], build_model('recorder:build', 3, 16))"
    )
    subprocess.run([sys.executable, "-c", script, str(ckpt)], check=True, env={**os.environ, **planted.env})
    planted.marker.unlink()
    args = ["evaluate", "--checkpoint", str(ckpt), "--model", "recorder:build", "--data", str(data(tmp_path))]
    proc = cli(args, tmp_path, planted.env)
    assert proc.returncode == 0 and "accuracy" in proc.stdout, proc.stderr[-2000:]
    assert planted.imported()


def test_load_model_in_process_leaves_the_module_unimported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = Planted(tmp_path)
    monkeypatch.syspath_prepend(str(planted.folder))
    monkeypatch.setenv("RECORDER_MARKER", str(planted.marker))
    with pytest.raises(CheckpointError, match="never runs code"):
        load_model(recorder_checkpoint(tmp_path))
    assert "recorder" not in sys.modules and not planted.imported()


# ---- the last tracebacks and surprises -------------------------------------------------------------------------

Case = Callable[[Path], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


@case("image-size-of-a-hundred-thousand")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "--out", "r", "data.image_size=100000"], ["data.image_size", "4096"]


@case("cifar-batches-without-images")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    write_cifar_batches(tmp / "cifar-10-batches-py", per_batch=0)
    args = ["train", "--out", "out", f"data.dataset={tmp / 'cifar-10-batches-py'}", "train.epochs=1"]
    return args, ["data_batch_1", "hold no images"]


@case("retrain-sizes-empty")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["run", "--out", "r", "retrain.sizes.gap=[]"], ["retrain.sizes", "gap: no N given"]


@case("default-sizes-larger-than-the-data-are-not-quoted-as-typed")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    config = tmp / "mine.yaml"  # a config of the user's that leaves the sizes to the attack's default
    config.write_text(f"data: {{dataset: {data(tmp)}}}\nattacks: [gap]\ndevice: cpu\n")
    args = ["run", "--config", str(config), "--out", "r"]
    return args, ["gap's default N [50000, 25000, 12500, 9000]", "set retrain.sizes.gap"]


@case("undecodable-image-names-the-file-not-a-buffer")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    root = data(tmp)
    (root / "train" / "bird" / "0001.png").write_bytes(b"GIF89a" + b"\x00" * 20)  # a header Pillow then rejects
    return ["train", "--out", "out", f"data.dataset={root}"], ["train/bird/0001.png", "unreadable image", "Pillow"]


@case("newline-in-a-class-folder-name")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    root = data(tmp)
    (root / "train" / "bi\nrd2").mkdir()
    (root / "test" / "bi\nrd2").mkdir()
    return ["train", "--out", "out", f"data.dataset={root}"], ["bi\\nrd2", "empty class folder"]


@case("dataset-empty-string")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    write_image_folder(tmp / "train-here", per_class=1, size=8)  # a folder a walk of '.' would find
    return ["train", "--out", "out", 'data.dataset=""'], ["dataset '' names nothing"]


@case("dataset-is-the-file-system-root")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    return ["train", "--out", "out", "data.dataset=/"], ["root of the file system"]


@case("checkpoint-of-int8-weights")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "ckpt" / "model.safetensors"
    model = build_model("small", 3, 16)
    save_model(path, model)
    quantised = {k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_safetensors(path, quantised, {"spec": json.dumps(model.spec.to_dict())})
    return ["evaluate", "--checkpoint", str(path), "--data", str(data(tmp))], ["is int8", "save the float weights"]


@case("user-state-dict-of-int8-weights")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    model = build_model("small", 3, 16)
    quantised = {k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(quantised, tmp / "weights.pt")
    args = ["run", "--out", "r", f"data.dataset={data(tmp)}", f"model.checkpoint={tmp / 'weights.pt'}", *RUNNABLE]
    return args, ["weights.pt", "is int8"]


@case("lock-file-that-is-a-folder")
def _(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "r" / ".lock").mkdir(parents=True)
    return ["run", "--out", "r"], ["r/.lock: not a lock file", "remove it"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_third_pass(name: str, tmp_path: Path) -> None:
    args, fragments = CASES[name](tmp_path)
    line = one_error_line(cli(args, tmp_path))
    for fragment in fragments:
        assert fragment in line, line
    for out in ("r", "out"):  # a refused command writes nothing (a folder the case made itself aside)
        assert not (tmp_path / out / "config.yaml").exists(), f"{name}: refused, yet {out}/config.yaml was written"


def test_a_refused_run_writes_nothing_so_the_corrected_one_is_accepted(tmp_path: Path) -> None:
    base = ["run", "--out", "r", f"data.dataset={data(tmp_path, per_class=10)}", "data.train_per_class=10"]
    base += ["attacks=[fgsm]", "device=cpu"]
    refused = cli([*base, "retrain.sizes.fgsm=[999]"], tmp_path)
    assert "N must lie in 1..30" in one_error_line(refused)
    assert not (tmp_path / "r").exists()  # not even the folder: nothing for the corrected run to disagree with
    refused = cli([*base, "model.name=vgg16"], tmp_path)  # 16 px images: too small for VGG16's poolings
    assert "needs images of at least 32px" in one_error_line(refused)
    assert not (tmp_path / "r").exists()


def test_a_refused_training_writes_nothing(tmp_path: Path) -> None:
    args = ["train", "--out", "out", f"data.dataset={data(tmp_path)}", "model.name=vgg16", "train.epochs=1"]
    assert "needs images of at least 32px" in one_error_line(cli(args, tmp_path))
    assert not (tmp_path / "out").exists()


def test_a_float16_checkpoint_is_cast_with_a_word(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "model.safetensors"
    model = build_model("small", 3, 16)
    save_model(path, model)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_safetensors(path, half, {"spec": json.dumps(model.spec.to_dict())})
    proc = cli(["evaluate", "--checkpoint", str(path), "--data", str(data(tmp_path)), "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tensors of float16 cast to float32" in proc.stderr


def test_resizing_beyond_memory_is_refused_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import advretrain.data.limits as limits
    from advretrain import load_dataset

    monkeypatch.setattr(limits, "memory_bytes", lambda: 2**28)  # a 256 MiB machine
    with pytest.raises(DataError, match=r"9 images at 4096x4096 px need 0\.4 GiB, more than this machine's 0\.2 GiB"):
        load_dataset(str(data(tmp_path)), "train", image_size=4096)
    write_cifar_batches(tmp_path / "cifar", per_batch=2)
    with pytest.raises(DataError, match="more than this machine's"):
        load_dataset(str(tmp_path / "cifar"), "train", image_size=4096)  # resized in float32: 4 bytes a value


def test_the_labeler_on_one_image_refuses_in_a_sentence() -> None:
    one = torch.rand(1, 3, 4, 4)
    with pytest.raises(LabelerError, match="give at least 5 images"):
        KNNLabeler(pca_dims=1, fooling_percentile=99).fit(one, torch.zeros(1, dtype=torch.long))
    labeler = KNNLabeler(pca_dims=1, fooling_percentile=99)
    with pytest.raises(LabelerError, match="holdout set is empty"):
        labeler.fit(one, torch.zeros(1, dtype=torch.long), holdout=torch.rand(0, 3, 4, 4))
    fitted = KNNLabeler(pca_dims=1).fit(one, torch.zeros(1, dtype=torch.long))  # no percentile: one image is enough
    assert fitted.predict(one).tolist() == [0]


def test_empty_sizes_and_a_too_large_image_size_are_config_errors() -> None:
    from advretrain.config import ExperimentConfig, build_config

    with pytest.raises(ConfigError, match="no N given"):
        build_config(ExperimentConfig, None, ["retrain.sizes.fgsm=[]"])
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        build_config(ExperimentConfig, None, ["data.image_size=100000"])


def test_empty_tinyimagenet_annotations_are_named(tmp_path: Path) -> None:
    from advretrain import load_dataset

    root = tmp_path / "tiny-imagenet-200"
    (root / "train" / "n01" / "images").mkdir(parents=True)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n01\n")
    (root / "val" / "val_annotations.txt").write_text("\n")
    img = np.zeros((8, 8, 3), np.uint8)
    from PIL import Image

    Image.fromarray(img).save(root / "train" / "n01" / "images" / "n01_0.JPEG")
    with pytest.raises(DataError, match=r"val_annotations\.txt: lists no validation images"):
        load_dataset(str(root), "test")


def test_a_damaged_file_of_a_finished_stage_says_how_to_redo_it(finished_run: Path, tmp_path: Path) -> None:
    from tiny_run import TINY

    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    labeler = next((run_dir / "stages").glob("labeler-*/labeler.safetensors"))
    labeler.write_bytes(b"\0" * 64)
    line = one_error_line(cli(["run", "--out", str(run_dir), *TINY], tmp_path))
    assert f"delete its stage folder {labeler.parent.name} and rerun `advretrain run --out {run_dir}`" in line, line
