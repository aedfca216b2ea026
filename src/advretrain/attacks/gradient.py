"""The L-inf gradient-sign loop shared by FGSM and PGD: FGSM is one step of size eps from the clean image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttackError, AttackResult, Count, LinfBudget, Positive, logits_of, run_batched


class LinfGradientSign:
    """x ← clip(Π_eps(x + step · sign ∇ CE(f(x), y)), 0, 1), `steps` times, from x or a random start in the ball."""

    name = "linf"

    def __init__(
        self,
        *,
        eps: LinfBudget,
        step_size: Positive,
        steps: Count,
        random_start: bool,
        batch_size: Count = 512,
        seed: int = 0,
    ) -> None:
        if not 0 <= eps <= 1 or step_size <= 0 or steps < 1:
            raise AttackError(
                f"{self.name}: need 0 <= eps <= 1, step_size > 0, steps >= 1 (got {eps}, {step_size}, {steps})"
            )
        self.eps, self.step_size, self.steps = eps, step_size, steps
        self.random_start, self.batch_size, self.seed = random_start, batch_size, seed

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        gen = torch.Generator().manual_seed(self.seed)  # drawn on the CPU: the same start on every device
        return run_batched(lambda x, y: self._attack(model, x, y, gen), model, images, labels, self.batch_size)

    def _attack(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> AttackResult:
        x = x0.clone()
        clean_pred = None
        if self.random_start:
            x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0.device) * self.eps).clamp(0, 1)
            with torch.no_grad():
                clean_pred = logits_of(model, x0).argmax(1)
        for _ in range(self.steps):
            x.requires_grad_(True)
            logits = logits_of(model, x)
            if clean_pred is None:  # the first step starts at the clean image: its forward pass gives the prediction
                clean_pred = logits.detach().argmax(1)
            loss = F.cross_entropy(logits, y, reduction="sum")  # sum: per-image gradients, unscaled by N
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = x + self.step_size * grad.sign()
                x = torch.min(torch.max(x, x0 - self.eps), x0 + self.eps).clamp(0, 1)
        assert clean_pred is not None  # steps >= 1
        with torch.no_grad():
            success = logits_of(model, x).argmax(1) != clean_pred
        return AttackResult(x.detach(), success)


class FGSM(LinfGradientSign):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): x* = clip(x + eps · sign ∇ₓ CE(f(x), y), 0, 1).

    `y` is the true label (the paper's Eq. 1); eps = 0.07 in [0,1] pixel space (METHOD.md 2.4).
    """

    name = "fgsm"

    def __init__(self, *, eps: LinfBudget = 0.07, batch_size: Count = 512) -> None:
        super().__init__(eps=eps, step_size=max(eps, 1e-12), steps=1, random_start=False, batch_size=batch_size)


class PGD(LinfGradientSign):
    """L-inf projected gradient descent (Madry et al. 2018): eps 8/255, step 2/255, 10 steps, random start.

    Not in the paper: the standard check that a retrained model is robust rather than hiding its gradients.
    """

    name = "pgd"

    def __init__(
        self,
        *,
        eps: LinfBudget = 8 / 255,
        step_size: Positive = 2 / 255,
        steps: Count = 10,
        random_start: bool = True,
        batch_size: Count = 512,
        seed: int = 0,
    ) -> None:
        super().__init__(
            eps=eps, step_size=step_size, steps=steps, random_start=random_start, batch_size=batch_size, seed=seed
        )
