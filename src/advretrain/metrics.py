"""The paper's metrics and the ones an honest evaluation adds, each from predictions and images (METHOD.md 0).

`predict` is the one batched forward pass (eval mode, the attacks' memory layout) that every metric reads.

- fooling ratio: share of *all* images whose prediction changes versus the clean prediction (the paper's metric);
- success on correctly classified images; targeted success; accuracy on adversarial images;
- L2 and L-inf perturbation norms (median and mean);
- each again after rounding the adversarial images to 8 bits (round(255x)/255), as a stored PNG would.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .data import to_float
from .models import channels_last


def autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, amp: bool = False) -> torch.Tensor:
    """Logits (float32, on the images' device) for uint8 or [0,1] images, in eval mode, batched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        with channels_last(model):  # the attacks' layout: the same logits to the last bit
            for start in range(0, images.shape[0], batch_size):
                batch = to_float(images[start : start + batch_size].to(device, non_blocking=True))
                with autocast(device, amp):
                    out.append(model(batch).float().to(images.device))
        return torch.cat(out) if out else torch.empty(0)
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy."""
    preds = predict(model, images, batch_size).argmax(1)
    return float((preds.cpu() == labels.cpu()).float().mean())


def fooling_ratio(clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> float:
    return float((clean_pred != adv_pred).float().mean()) if clean_pred.numel() else float("nan")


def success_on_correct(clean_pred: torch.Tensor, adv_pred: torch.Tensor, labels: torch.Tensor) -> float:
    correct = clean_pred == labels
    return float((adv_pred[correct] != labels[correct]).float().mean()) if correct.any() else float("nan")


def targeted_success(adv_pred: torch.Tensor, targets: torch.Tensor) -> float:
    return float((adv_pred == targets).float().mean()) if targets.numel() else float("nan")


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) if labels.numel() else float("nan")


def norms(clean: torch.Tensor, adversarial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L2 and L-inf norms of the perturbation, in [0,1] pixel units. Both N."""
    delta = (adversarial.float() - clean.float()).flatten(1)
    return delta.norm(dim=1), delta.abs().amax(dim=1)


def quantize8(images: torch.Tensor) -> torch.Tensor:
    """round(255x)/255: what survives saving as an 8-bit image."""
    return torch.round(images * 255) / 255


def _norm_stats(values: torch.Tensor, prefix: str) -> dict[str, float]:
    if values.numel() == 0:
        return {f"{prefix}_median": float("nan"), f"{prefix}_mean": float("nan")}
    return {f"{prefix}_median": float(values.median()), f"{prefix}_mean": float(values.mean())}


def attack_metrics(
    model: nn.Module,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None = None,
    batch_size: int = 1024,
    queries: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every metric for one adversarial set against one model, float and 8-bit rounded.

    Norms, and a query attack's `queries` (N, per image), are over the images whose prediction changed (a failed
    attack returns the clean image: norm 0).
    """
    clean_pred = predict(model, clean, batch_size).argmax(1).cpu()
    labels = labels.cpu()
    out: dict[str, float] = {"clean_accuracy": accuracy(clean_pred, labels), "images": float(labels.numel())}
    for suffix, adv in (("", adversarial), ("_8bit", quantize8(adversarial))):
        adv_pred = predict(model, adv, batch_size).argmax(1).cpu()
        fooled = adv_pred != clean_pred
        l2, linf = norms(clean.cpu(), adv.cpu())
        out |= {
            f"fooling_ratio{suffix}": fooling_ratio(clean_pred, adv_pred),
            f"success_on_correct{suffix}": success_on_correct(clean_pred, adv_pred, labels),
            f"adversarial_accuracy{suffix}": accuracy(adv_pred, labels),
            **_norm_stats(l2[fooled], f"l2{suffix}"),
            **_norm_stats(linf[fooled], f"linf{suffix}"),
        }
        if targets is not None:
            out[f"targeted_success{suffix}"] = targeted_success(adv_pred, targets.cpu())
        if queries is not None:
            out |= _norm_stats(queries.cpu()[fooled].double(), f"queries{suffix}")
    return out
