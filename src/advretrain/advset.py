"""Adversarial sets on disk: float32 images exactly as crafted, with where they came from and what made them.

A set is a folder `NAME.advset/` of shards (`shard-00000.safetensors`, ...: adversarial N×C×H×W float32, source
indices, source labels, targets (-1: untargeted), success, iterations (a query attack's queries, DeepFool's steps;
-1: not reported), member (the ensemble member that succeeded; -1: none)) and `meta.json` (attack, parameters,
attacked model's fingerprint, shard list). Every file is written atomically and `meta.json` last, so a set without
it is incomplete: a rerun keeps the finished shards and writes only the missing ones. Sets larger than memory are
written and read shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .data import to_float
from .errors import AdvretrainError
from .models import Classifier
from .runtime.distributed import barrier, block, is_main
from .runtime.faults import kill_point
from .runtime.io import read_text_file, save_safetensors, write_json

META = "meta.json"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (and mirror averaging, when on): the identity of the attacked model."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(model, Classifier) and model.spec.flip_average:  # the same weights, another classifier
        digest.update(b"flip_average")
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class AdversarialSet:
    adversarial: torch.Tensor  # N×C×H×W float32 in [0,1]
    indices: torch.Tensor  # N int64: index of the source image in its split
    labels: torch.Tensor  # N int64: the source image's label
    targets: torch.Tensor  # N int64: the attack's target class, -1 when untargeted
    success: torch.Tensor  # N bool
    iterations: torch.Tensor  # N int64: queries or steps per image, -1 when the attack does not report them
    member: torch.Tensor  # N int64: an ensemble's member that fooled the image (AutoAttack), -1: none or no ensemble
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.indices.shape[0])


SHARD_PATTERN = re.compile(r"shard-\d{5,}\.safetensors")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(
    folder: Path,
    i: int,
    adversarial: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None,
    success: torch.Tensor,
    iterations: torch.Tensor | None = None,
    member: torch.Tensor | None = None,
) -> None:
    def per_image(values: torch.Tensor | None) -> torch.Tensor:  # -1 where the attack reports nothing
        return values.long() if values is not None else torch.full_like(indices, -1, dtype=torch.long)

    tensors = {
        "adversarial": adversarial.float(),
        "indices": indices.long(),
        "labels": labels.long(),
        "targets": per_image(targets),
        "success": success.to(torch.uint8),
        "iterations": per_image(iterations),
        "member": per_image(member),
    }
    save_safetensors(folder / shard_name(i), tensors, {})


def finish(folder: Path, shards: int, meta: dict[str, Any]) -> None:
    write_json(folder / META, {**meta, "shards": [shard_name(i) for i in range(shards)]})


def is_complete(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / META).exists()


def iter_shards(folder: str | os.PathLike[str]) -> Iterator[dict[str, torch.Tensor]]:
    path = Path(folder)
    meta = read_meta(path)
    for name in meta["shards"]:
        if not isinstance(name, str) or not SHARD_PATTERN.fullmatch(name):  # never a path out of the folder
            raise AdvretrainError(f"{path / META}: names a shard {str(name)[:40]!r}; delete the set and craft it again")
        try:
            yield load_file(str(path / name))
        except (SafetensorError, OSError) as exc:
            raise AdvretrainError(
                f"{path / name}: unreadable shard ({exc}); delete the set and craft it again"
            ) from exc


def read_meta(folder: Path) -> dict[str, Any]:
    if not (folder / META).exists():
        raise AdvretrainError(f"{folder}: not a complete adversarial set (no {META}); rerun the attack to finish it")
    try:
        meta = json.loads(read_text_file(folder / META, "adversarial set record"))
    except json.JSONDecodeError as exc:
        raise AdvretrainError(f"{folder / META} is damaged ({exc.msg}); delete the set and craft it again") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise AdvretrainError(f"{folder / META} lists no shards; delete the set and craft it again")
    return meta


def load_adversarial_set(folder: str | os.PathLike[str]) -> AdversarialSet:
    shards = list(iter_shards(folder))
    keys = ("adversarial", "indices", "labels", "targets", "success")
    try:
        cat = {key: torch.cat([s[key] for s in shards]) for key in keys}
        n = cat["indices"].shape[0]
        if cat["adversarial"].ndim != 4 or any(cat[k].shape != (n,) for k in keys[1:]) or len(cat["adversarial"]) != n:
            raise ValueError("its tensors disagree in shape")
    except (KeyError, RuntimeError, ValueError) as exc:
        raise AdvretrainError(
            f"{folder}: damaged adversarial set ({str(exc)[:80]}); delete it and craft it again"
        ) from exc
    return AdversarialSet(
        cat["adversarial"],
        cat["indices"],
        cat["labels"],
        cat["targets"],
        cat["success"].bool(),
        torch.cat([s.get("iterations", torch.full_like(s["indices"], -1)) for s in shards]),  # older sets: -1
        torch.cat([s.get("member", torch.full_like(s["indices"], -1)) for s in shards]),
        read_meta(Path(folder)),
    )


def craft_adversarial_set(
    attack: Any,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    folder: str | os.PathLike[str],
    meta: dict[str, Any],
    shard_size: int = 512,
    indices: torch.Tensor | None = None,
) -> Path:
    """Attack `images` (uint8 or [0,1]) shard by shard into `folder`; finished shards of a killed run are kept.

    `indices` are the images' positions in their split (default 0..N-1), stored as the source indices. Under
    torchrun each rank attacks its contiguous block of shards; the shards do not depend on the number of ranks, so
    neither does the set. Rank 0 writes the metadata, last, once every shard is on disk.
    """
    path = Path(folder)
    fingerprint = model_fingerprint(model)
    meta = {
        **meta,
        "model_fingerprint": fingerprint,
        "count": int(labels.shape[0]),
        "image_shape": list(images.shape[1:]),
    }
    stamp = path / "job.json"  # identity of the job the shards belong to
    if stamp.exists() and json.loads(stamp.read_text()) != meta:
        raise AdvretrainError(f"{path} holds a set made by another attack, model or data; choose another --out")
    if is_main():
        write_json(stamp, meta)
    sources = torch.arange(labels.shape[0]) if indices is None else indices.cpu()
    shards = (labels.shape[0] + shard_size - 1) // shard_size
    for i in block(shards):
        if (path / shard_name(i)).exists():
            continue
        span = slice(i * shard_size, (i + 1) * shard_size)
        x = to_float(images[span])
        result = attack(model, x, labels[span])
        write_shard(
            path,
            i,
            result.adversarial.cpu(),
            sources[span],
            labels[span].cpu(),
            None if result.targets is None else result.targets.cpu(),
            result.success.cpu(),
            None if result.iterations is None else result.iterations.cpu(),
            None if result.member is None else result.member.cpu(),
        )
        kill_point("attack-shard")
    barrier()  # every rank's shards are written
    if is_main():
        finish(path, shards, meta)
    barrier()  # the set is complete for every rank
    return path
