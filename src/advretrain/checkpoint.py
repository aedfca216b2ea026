"""Trained models on disk: weights in safetensors (no code runs on load) with the model spec in its metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .models import Classifier, ModelSpec, build_model
from .runtime.io import save_safetensors


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
        file = file / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"checkpoint {file} does not exist; train a model first or check the path")
    meta = read_metadata(file)
    try:
        spec = ModelSpec(**json.loads(meta["spec"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: no model spec in its metadata; it was not written by advretrain") from exc
    model = build_model(spec.name, spec.num_classes, spec.image_size, spec.flip_average)
    with safe_open(str(file), "pt") as fh:
        state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(
            f"{file}: weights do not fit a {spec.name} with {spec.num_classes} classes ({first})"
        ) from exc
    return model.to(device).eval()
