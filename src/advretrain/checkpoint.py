"""Trained models on disk: weights in safetensors (no code runs on load) with the model spec in its metadata, and
training in a folder that checkpoints each epoch and resumes from the last one.

Each epoch draws its order and augmentation from a generator seeded by (seed, epoch), so an interrupted training
that resumes from the checkpoint of epoch k ends with exactly the weights of an uninterrupted one (on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import TrainConfig
from .data import ImageDataset
from .errors import AdvretrainError, CheckpointError, ConfigError
from .models import Classifier, ModelSpec, build_model
from .runtime.distributed import barrier, is_main
from .runtime.faults import kill_point
from .runtime.io import read_safetensors, save_safetensors, save_torch, write_json
from .runtime.rundir import same_config
from .train import TrainResult, TrainState, train

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


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Classifier:
    """Rebuild a trained model (eval mode) from a `model.safetensors` written by training.

    A training folder is accepted too (its `model.safetensors` is used).
    """
    file = Path(path)
    if file.is_dir():
        file = file / MODEL_FILE
    if not file.exists():
        raise CheckpointError(f"checkpoint {file} does not exist; train a model first or check the path")
    meta = read_metadata(file)
    try:
        spec = ModelSpec(**json.loads(meta["spec"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: no model spec in its metadata; it was not written by advretrain") from exc
    try:
        model = build_model(spec.name, spec.num_classes, spec.image_size, spec.flip_average)
    except ConfigError as exc:
        raise CheckpointError(f"{file}: its metadata describes no model advretrain builds ({exc})") from exc
    try:
        state, _ = read_safetensors(file, "checkpoint")
    except AdvretrainError as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(
            f"{file}: weights do not fit a {spec.name} with {spec.num_classes} classes ({first})"
        ) from exc
    return model.to(device).eval()


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
) -> TrainResult:
    """`train.train` in `out_dir`: resumed from its checkpoint when one of this job is there, checkpointed after
    every epoch, and ending with `model.safetensors` and `metrics.json` (rank 0 writes)."""
    folder = Path(out_dir)
    key = fingerprint(model, data)
    start = _load_state(folder / STATE_FILE, cfg, key)

    def checkpoint(state: TrainState) -> None:
        if is_main():
            save_torch(folder / STATE_FILE, {"fingerprint": key, "config": cfg.model_dump(mode="json"), **state})
            kill_point("train-epoch")

    result = train(model, data, cfg, device, test, progress, compile, init, start, checkpoint)
    if is_main():
        save_model(folder / MODEL_FILE, result.model)
        write_json(folder / "metrics.json", {"history": result.history, "test_accuracy": result.test_accuracy})
    barrier()  # no rank reads the model before rank 0 has written it
    return result
