"""What every attack shares: the result type, input checks, the frozen-model context and batching.

An attack is called as `attack(model, images, labels)` on float [0,1] N×C×H×W images and returns an
`AttackResult` whose `.adversarial` has the same shape and device and whose `.success` is a per-image mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from ..errors import AdvretrainError
from ..models import channels_last


class AttackError(AdvretrainError):
    """Invalid input to an attack (wrong range, shape or dtype)."""


# Setting types for attack constructors: the registry's typed settings check these ranges (and finiteness) before
# any work, from a config, the CLI or `build_attack`.
LinfBudget = Annotated[float, Field(ge=0, le=1)]  # an L-inf bound in [0,1] pixel units
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]  # steps, epochs, queries, images per batch


@dataclass
class AttackResult:
    """adversarial: N×C×H×W in [0,1]; success: N bool; the optional fields are per-image (N,) when known: the
    target class, the steps or queries spent, and for an ensemble the index of the member that succeeded (-1: none)."""

    adversarial: torch.Tensor
    success: torch.Tensor
    targets: torch.Tensor | None = None
    iterations: torch.Tensor | None = None
    member: torch.Tensor | None = None
    extras: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[AttackResult]) -> AttackResult:
        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        tensors = {f.name: cat(f.name) for f in fields(AttackResult) if f.name != "extras"}
        return AttackResult(**tensors, extras=parts[0].extras if parts else {})  # type: ignore[arg-type]


def check_inputs(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise AttackError(f"images must be float N×C×H×W in [0,1], got {tuple(images.shape)} {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise AttackError("images hold NaN or inf; check the data or the model that produced them")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        lo, hi = float(images.min()), float(images.max())
        raise AttackError(f"images must lie in [0,1], got [{lo:.3g}, {hi:.3g}]; divide uint8 images by 255")
    if labels.shape != (images.shape[0],):
        raise AttackError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise AttackError(f"labels must be integer class indices, got {labels.dtype}; pass labels.long()")
    if labels.numel() and int(labels.min()) < 0:
        raise AttackError(f"labels must be class indices >= 0, got {int(labels.min())}")


def check_classes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Labels within the model's classes (one forward pass of one image, in eval mode, tells how many it has)."""
    if not labels.numel():
        return
    param = next(model.parameters())
    with torch.no_grad():
        classes = logits_of(model, images[:1].to(param.device, param.dtype)).shape[1]
    if int(labels.max()) >= classes:
        raise AttackError(f"label {int(labels.max())} is out of range for a model of {classes} classes")


def check_budget(name: str, norm: str, eps: float) -> None:
    """An L-inf or L2 budget: `norm` one of the two, 0 < eps, and eps <= 1 for L-inf (a pixel moves at most 1)."""
    if norm not in ("linf", "l2"):
        raise AttackError(f"{name}: norm must be linf or l2 (got {norm!r})")
    if not 0 < eps <= (1 if norm == "linf" else math.inf):
        raise AttackError(f"{name}: eps must be > 0, and <= 1 for linf (got {eps})")


def other_classes(logits: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The targets of a targeted ensemble member: the classes each image's clean logits (N×classes) rank 2nd, 3rd,
    … (k+1)th, at most all the others, N each. Rank 1 is the image's own class where it is classified correctly, and
    only those are attacked."""
    order = logits.argsort(1, descending=True)
    return [order[:, rank] for rank in range(1, min(k, logits.shape[1] - 1) + 1)]


def empty_result(images: torch.Tensor) -> AttackResult:
    """What an attack returns for 0 images: nothing crafted, nothing fooled."""
    return AttackResult(images.detach().clone(), torch.zeros(0, dtype=torch.bool, device=images.device))


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no parameter gradients (input gradients only: cheaper) and channels-last weights, restored on exit."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with channels_last(model):
            yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def run_batched(
    fn: Callable[[torch.Tensor, torch.Tensor], AttackResult],
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
) -> AttackResult:
    """Check inputs, freeze the model and run `fn` over chunks of at most `batch_size` images on the model's device."""
    check_inputs(images, labels)
    if images.shape[0] == 0:
        return empty_result(images)
    param = next(model.parameters())
    device = param.device
    parts = []
    with frozen(model):
        check_classes(model, images, labels)
        for start in range(0, images.shape[0], batch_size):
            # in the model's own dtype (float32 unless the user's model is another): float64 images are fine
            x = images[start : start + batch_size].to(device, param.dtype).detach().clone()
            y = labels[start : start + batch_size].to(device)
            parts.append(fn(x, y))
    result = AttackResult.concat(parts)
    if not bool(torch.isfinite(result.adversarial).all()):  # NaN logits or gradients poison every step after
        raise AttackError("the attack produced NaN or inf images: the model's logits or gradients are not finite")
    result.adversarial = result.adversarial.to(images.device, images.dtype)
    for name in ("success", "targets", "iterations", "member"):
        value = getattr(result, name)
        if value is not None:
            setattr(result, name, value.to(images.device))
    return result


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits, refused when not finite: a NaN model would otherwise yield silent, meaningless results."""
    out: torch.Tensor = model(x)
    if not bool(torch.isfinite(out).all()):
        raise AttackError("the model's logits are NaN or inf; check the checkpoint (its weights may have diverged)")
    return out


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Z_y − max_{i≠y} Z_i per image (N; logits N×classes): positive while the model still predicts y."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return own - others
