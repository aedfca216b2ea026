"""Trained models on disk: weights in safetensors (no code runs on load) with the model spec in its metadata, and
training in a folder that checkpoints each epoch and resumes from the last one.

Each epoch draws its order and augmentation from a generator seeded by (seed, epoch), so an interrupted training
that resumes from the checkpoint of epoch k ends with exactly the weights of an uninterrupted one (on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import TrainConfig
from .data import ImageDataset
from .errors import AdvretrainError, CheckpointError, ConfigError, printable
from .models import Classifier, ModelSpec, build_model
from .plugins import is_import_path
from .runtime.distributed import barrier, is_main
from .runtime.faults import kill_point
from .runtime.io import read_safetensors, save_safetensors, save_torch, write_json
from .runtime.rundir import same_config
from .train import TrainResult, TrainState, train

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # the last epoch's TrainState, with the job's fingerprint and config
MODEL_FILE = "model.safetensors"


def save_model(path: str | os.PathLike[str], model: Classifier, extra: dict[str, str] | None = None) -> None:
    metadata = {"spec": json.dumps(model.spec.to_dict()), **(extra or {})}
    save_safetensors(path, dict(model.state_dict()), metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint ({exc}); give a model.safetensors"
        ) from exc


def load_model(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", builder: str | None = None
) -> Classifier:
    """Rebuild a trained model (eval mode) from a `model.safetensors` written by training.

    A training folder is accepted too (its `model.safetensors` is used). Loading runs no code: the model the
    metadata names is looked up in the registry (`models.MODELS`); a model built by a user's own code
    (`package.module:builder`) is built only when the caller names that builder as `builder` (the user's
    `model.name`, or `--model` on the command line), and the file must name the same one.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MODEL_FILE
    if not file.exists():
        raise CheckpointError(f"checkpoint {file} does not exist; train a model first or check the path")
    spec = model_spec(file)
    if is_import_path(spec.name) and spec.name != builder:
        name = printable(spec.name[:80])
        raise CheckpointError(
            f"{file}: its metadata names the model builder {name!r}, code that loading would import; a checkpoint "
            f"never runs code: to load it deliberately, name that builder yourself (model.name={name} or --model "
            f"{name})"
        )
    try:
        model = build_model(spec.name, spec.num_classes, spec.image_size, spec.flip_average)
    except ConfigError as exc:
        raise CheckpointError(f"{file}: its metadata describes no model advretrain builds ({exc})") from exc
    try:
        state, _ = read_safetensors(file, "checkpoint", "give a model.safetensors written by advretrain")
    except AdvretrainError as exc:
        raise CheckpointError(str(exc)) from exc
    check_dtypes(state, model.state_dict(), file)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(
            f"{file}: weights do not fit a {spec.name} with {spec.num_classes} classes ({first})"
        ) from exc
    return model.to(device).eval()


def model_spec(file: Path) -> ModelSpec:
    """The model spec a checkpoint's metadata holds (read, never acted on)."""
    meta = read_metadata(file)
    try:
        return ModelSpec(**json.loads(meta["spec"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: no model spec in its metadata; it was not written by advretrain") from exc


def check_dtypes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse integer tensors where the model holds floats (quantised weights without their scales would load as
    nonsense); say so when floats of another precision are cast to the model's (float16 → float32)."""
    cast: dict[str, str] = {}
    for key, tensor in state.items():
        target = expected.get(key)
        if target is None or not target.is_floating_point() or tensor.dtype == target.dtype:
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{file}: tensor {printable(key[:60])!r} is {str(tensor.dtype).removeprefix('torch.')} where the "
                f"model holds {str(target.dtype).removeprefix('torch.')}; save the float weights (dequantised)"
            )
        cast[key] = str(tensor.dtype).removeprefix("torch.")
    if cast:
        kinds = ", ".join(sorted(set(cast.values())))
        log.warning("%s: %d tensors of %s cast to float32 on load", file, len(cast), kinds)


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks: a user's checkpoint is identified by its bytes, not its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    file = file / MODEL_FILE if file.is_dir() else file
    if not file.is_file():
        raise CheckpointError(f"model.checkpoint {file} is not a file; give a trained model's file or folder")
    return file


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a safetensors file or a PyTorch file (`weights_only=True`: no code runs)."""
    if file.suffix == ".safetensors":
        try:
            return read_safetensors(file, "checkpoint", "save the model's state_dict with safetensors again")[0]
        except AdvretrainError as exc:
            raise CheckpointError(str(exc)) from exc
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # an untrusted file: any failure to read it is the file's fault
        raise CheckpointError(
            f"{file}: not a PyTorch state_dict that loads with weights_only=True ({type(exc).__name__}); save "
            "model.state_dict() with torch.save or safetensors"
        ) from exc
    for key in ("state_dict", "model"):  # the usual wrappers of training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: holds no state_dict (names → tensors); save model.state_dict()")
    return {str(k).removeprefix("module."): v for k, v in state.items()}  # DDP's prefix


def load_weights_into(model: Classifier, state: dict[str, torch.Tensor], file: Path) -> Classifier:
    """`state` into `model` (or, for a user's network, into the network itself), strictly; a mismatch names the
    first missing or unexpected key."""
    net = getattr(model, "net", None)
    target: torch.nn.Module = net if isinstance(net, torch.nn.Module) and set(state) == set(net.state_dict()) else model
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        which = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise CheckpointError(
            f"{file}: does not fit a {model.spec.name} with {model.spec.num_classes} classes ({which}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected); set model.name and the data to its architecture"
        )
    check_dtypes(state, target.state_dict(), file)
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:120])
        raise CheckpointError(f"{file}: {first}; set model.name and the data to its architecture") from exc
    return model


def load_pretrained(path: str | os.PathLike[str], model: Classifier) -> Classifier:
    """A user's trained model as f0: `model` (built from the config) with the weights of `path`, which is a model
    written by `advretrain train` (its folder or model.safetensors), a safetensors file or a PyTorch state_dict."""
    file = checkpoint_file(path)
    if file.suffix == ".safetensors" and "spec" in read_metadata(file):  # written by advretrain: it knows its model
        trained = load_model(file, builder=model.spec.name)  # a builder of the user's own only when they named it
        ours, theirs = model.spec, trained.spec
        if (theirs.name, theirs.num_classes, theirs.image_size) != (ours.name, ours.num_classes, ours.image_size):
            raise CheckpointError(
                f"{file} holds a {theirs.name} for {theirs.num_classes} classes at {theirs.image_size}px; the config "
                f"asks for a {ours.name} for {ours.num_classes} at {ours.image_size}px; set model.name and the data"
            )
        return trained
    return load_weights_into(model, read_state_dict(file), file)


def fingerprint(model: Classifier, data: ImageDataset) -> str:
    """What a training job trains: the model's architecture and the exact training data (its config is kept apart).

    Mirror averaging acts at inference only (training mode never averages), so it is not part of the job.
    """
    digest = hashlib.blake2b(digest_size=16)
    architecture = {k: v for k, v in model.spec.to_dict().items() if k != "flip_average"}
    digest.update(json.dumps(architecture, sort_keys=True).encode())
    digest.update(data.images.contiguous().numpy().tobytes())
    digest.update(data.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_state(path: Path, cfg: TrainConfig, expected: str) -> dict[str, Any] | None:
    """The checkpoint of this job, if any: a checkpoint from another job must never be resumed into this one.

    Its config is read through the current schema, as `rundir.record_config` reads a run's: a key added since, at
    its default, does not make it another job; a changed value (a changed default included) does.
    """
    if not path.exists():
        return None
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an untrusted or torn file: weights_only refuses code, anything else is corrupt
        raise CheckpointError(f"{path}: unreadable training checkpoint ({exc}); delete it to restart") from exc
    # a checkpoint without a config (older versions) or with one this version cannot read is another job's too
    if state.get("fingerprint") != expected or not same_config(state.get("config"), cfg):
        raise CheckpointError(
            f"{path} belongs to a different training job (config, model or data changed); use a fresh --out"
        )
    return state


def train_resumable(
    model: Classifier,
    data: ImageDataset,
    cfg: TrainConfig,
    device: torch.device,
    out_dir: str | os.PathLike[str],
    test: ImageDataset | None = None,
    progress: bool = True,
    compile: bool = False,
    init: bool = True,
    on_record: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """`train.train` in `out_dir`: resumed from its checkpoint when one of this job is there, checkpointed after
    every epoch, and ending with `model.safetensors` and `metrics.json` (rank 0 writes). `on_record` gets each
    epoch's record (loss, accuracy, lr, ...) once it is on disk: a tracker's hook."""
    folder = Path(out_dir)
    key = fingerprint(model, data)
    start = _load_state(folder / STATE_FILE, cfg, key)

    def checkpoint(state: TrainState) -> None:
        if is_main():
            save_torch(folder / STATE_FILE, {"fingerprint": key, "config": cfg.model_dump(mode="json"), **state})
            if on_record is not None:
                on_record(state["history"][-1])
            kill_point("train-epoch")

    result = train(model, data, cfg, device, test, progress, compile, init, start, checkpoint)
    if is_main():
        save_model(folder / MODEL_FILE, result.model)
        write_json(folder / "metrics.json", {"history": result.history, "test_accuracy": result.test_accuracy})
    barrier()  # no rank reads the model before rank 0 has written it
    return result
