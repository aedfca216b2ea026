"""Fooling images (Nguyen et al. 2015): unrecognisable images a classifier labels with >= 99% confidence.

Gradient ascent on log softmax_t from uniform noise with a pull toward grey (METHOD.md 2.5), batched; plain uniform
noise images too. They exercise the labeler's new-class path on real fooling images, not only on noise.
"""

from __future__ import annotations

import torch
from torch import nn

from .attacks.base import frozen, logits_of


def noise_images(n: int, shape: tuple[int, int, int] = (3, 32, 32), seed: int = 0) -> torch.Tensor:
    """n uniform-noise images in [0,1], N×C×H×W."""
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def fooling_images(
    model: nn.Module,
    targets: torch.Tensor,
    shape: tuple[int, int, int] = (3, 32, 32),
    *,
    steps: int = 500,
    step_size: float = 1 / 255,
    decay: float = 1e-3,
    confidence: float = 0.99,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images driven from noise to `confidence` in their target class; returns (images N×C×H×W, reached mask N).

    x ← clip(x + α · sign ∇ log softmax_t(f(x)) − λ (x − 0.5), 0, 1), until softmax_t ≥ confidence (then frozen).
    """
    device = next(model.parameters()).device
    x = noise_images(targets.shape[0], shape, seed).to(device)
    targets = targets.to(device)
    reached = torch.zeros(targets.shape[0], dtype=torch.bool, device=device)
    with frozen(model):
        for step_index in range(steps + 1):  # the last pass only checks
            active = (~reached).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            xa = x[active].requires_grad_(True)
            log_p = torch.log_softmax(logits_of(model, xa), 1).gather(1, targets[active, None]).squeeze(1)
            done = log_p.detach().exp() >= confidence
            reached[active[done]] = True
            if step_index == steps:
                break
            (grad,) = torch.autograd.grad(log_p.sum(), xa)
            with torch.no_grad():
                step = xa + step_size * grad.sign() - decay * (xa - 0.5)
                x[active[~done]] = step[~done].clamp(0, 1)
    return x.detach(), reached
