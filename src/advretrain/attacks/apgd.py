"""Auto-PGD (Croce & Hein, ICML 2020): PGD without a step size to tune, L-inf or L2, untargeted (CE or DLR loss) or
targeted (DLR at each of the top-k other classes in turn) — AutoAttack's white-box members (METHOD.md 2.8;
reference: fra31/auto-attack, autoattack/autopgd_base.py).

The step size starts at 2ε and is halved at checkpoints w_j (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} −
0.03, 0.06) of the steps) for each image where at most ρ = 75% of the steps since the last checkpoint raised the
loss, or where the step size was not halved at the last checkpoint and the best loss has not moved since; such an
image restarts from its best point. Steps carry momentum 0.75. An image leaves the batch as soon as it is
misclassified: nothing it could still do changes the result, and the others' schedules do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import AttackError, AttackResult, Count, check_budget, logits_of, other_classes, run_batched
from .square import draws, image_keys

Norm = Literal["linf", "l2"]
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # logits, labels, targets → N

MOMENTUM = 0.75  # the reference's alpha: the weight of the new step against the last one


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy per image (N), to be raised."""
    return F.cross_entropy(logits, labels, reduction="none")


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio per image (N), to be raised (Croce & Hein 2020, eq. 6 and 7).

    Untargeted: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3); targeted at t: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2), with
    z_π the logits sorted in decreasing order. Invariant to shifting and rescaling the logits: a model cannot hide
    behind large logits. Needs at least 3 classes (4 targeted).
    """
    ranked = logits.sort(1, descending=True).values  # N×classes
    own = logits.gather(1, labels[:, None]).squeeze(1)
    if targets is None:
        others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
        return -(own - others) / (ranked[:, 0] - ranked[:, 2] + 1e-12)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(own - target) / (ranked[:, 0] - (ranked[:, 2] + ranked[:, 3]) / 2 + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """The iterations after which step sizes are checked: ⌈p_j · steps⌉ on the paper's schedule, as the reference
    counts them (first window 22% of the steps, each next 3% shorter, never under 6%)."""
    first, least, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, at, length = [], 0, first
    while at + length <= steps:
        at += length
        out.append(at)
        length = max(length - shrink, least)
    return out


def uniform(keys: torch.Tensor, stream: int, shape: torch.Size) -> torch.Tensor:
    """N×shape uniform draws in (0, 1) from each image's own counter-based stream (`square.draws`): an image starts
    at the same point whatever batch, shard or process it is attacked in."""
    bits = draws(keys, stream, int(torch.tensor(shape[1:]).prod()))  # N×D in [0, 2^32)
    return ((bits.double() + 0.5) / 2**32).float().view(shape)


def random_start(x0: torch.Tensor, eps: float, norm: Norm, keys: torch.Tensor, restart: int) -> torch.Tensor:
    """The reference's random start: x0 + ε·t/‖t‖ with t uniform in [−1, 1] per value (L-inf: ‖·‖∞) or Gaussian
    (L2: ‖·‖₂, by Box-Muller), clipped to [0,1]; `restart` picks the stream."""
    if norm == "linf":
        t = uniform(keys, 2 * restart, x0.shape).to(x0) * 2 - 1
        t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    else:
        radius = (-2 * uniform(keys, 2 * restart, x0.shape).log()).sqrt()
        t = (radius * torch.cos(2 * torch.pi * uniform(keys, 2 * restart + 1, x0.shape))).to(x0)
        t = t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x0 + eps * t).clamp(0, 1)


def project(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """x onto the ε-ball around x0 (L-inf: clip; L2: rescale the difference) and [0,1]."""
    if norm == "linf":
        return torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0, 1)
    delta = x - x0
    norms: torch.Tensor = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (x0 + delta * (eps / norms.clamp_min(1e-12)).clamp(max=1)).clamp(0, 1)


def ascent(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The steepest ascent direction of unit norm: the gradient's sign (L-inf) or its direction (L2)."""
    if norm == "linf":
        return grad.sign()
    direction: torch.Tensor = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return direction


class _State:
    """Per-image state of one APGD run over the images still active (each tensor indexed by the batch)."""

    def __init__(self, x: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, eps: float) -> None:
        n = x.shape[0]
        self.x, self.previous, self.grad = x, x.clone(), grad  # current iterate, the one before, ∇ at x
        self.best, self.best_grad, self.best_loss = x.clone(), grad.clone(), loss.clone()  # the highest-loss point
        self.last_loss = loss.clone()  # the loss at the last iterate, to count the steps that raised it
        self.raised = torch.zeros(n, device=x.device)  # steps since the last checkpoint that raised the loss
        self.step = torch.full((n, 1, 1, 1), 2 * eps, device=x.device, dtype=x.dtype)
        self.checked_loss = loss.clone()  # the best loss at the last checkpoint
        self.halved_last = torch.ones(n, dtype=torch.bool, device=x.device)  # the reference starts as "just halved"

    def keep(self, rows: torch.Tensor) -> None:
        """Only the images `rows` stay in the batch."""
        for name, value in vars(self).items():
            setattr(self, name, value[rows])


def apgd(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    eps: float,
    norm: Norm,
    steps: int,
    loss_fn: Loss,
    rho: float,
    keys: torch.Tensor,
    restart: int,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start on x0 (N×C×H×W, all correctly classified or not): the adversarial images
    (the first misclassified iterate, else the highest-loss one), the success mask (misclassified: pred ≠ y) and the
    best loss reached (N each). `on_step` sees every image's best loss so far (N) after each step."""

    def evaluate(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        logits = logits_of(model, x)
        t = None if targets is None else targets[rows]
        loss = loss_fn(logits.float(), y[rows], t)
        (grad,) = torch.autograd.grad(loss.sum(), x)  # sum: each image's own gradient
        return loss.detach(), grad.detach(), logits.detach().argmax(1) != y[rows]

    out, best_loss = x0.clone(), torch.full((x0.shape[0],), float("-inf"), device=x0.device)
    success = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    rows = torch.arange(x0.shape[0], device=x0.device)  # the images still in the batch
    x = random_start(x0, eps, norm, keys, restart)
    loss, grad, fooled = evaluate(x, rows)
    state = _State(x, loss, grad, eps)
    checks, since = set(checkpoints(steps)), 0
    for i in range(steps):
        if fooled.any():  # these images are done: their fooling point is kept and they leave the batch
            out[rows[fooled]], success[rows[fooled]] = state.x[fooled], True
            best_loss[rows[fooled]] = torch.maximum(state.best_loss[fooled], state.last_loss[fooled])
            keep = (~fooled).nonzero().squeeze(1)
            state.keep(keep)
            rows, fooled = rows[keep], fooled[keep]
            if rows.numel() == 0:
                break
        origin = x0[rows]
        with torch.no_grad():
            z = project(state.x + state.step * ascent(state.grad, norm), origin, eps, norm)
            weight = MOMENTUM if i > 0 else 1.0
            moved = project(
                state.x + weight * (z - state.x) + (1 - weight) * (state.x - state.previous), origin, eps, norm
            )
        state.previous, state.x = state.x, moved
        loss, state.grad, fooled = evaluate(moved, rows)
        state.raised += (loss > state.last_loss).float()
        state.last_loss = loss
        better = loss > state.best_loss
        state.best[better], state.best_grad[better], state.best_loss[better] = (
            moved[better],
            state.grad[better],
            loss[better],
        )
        if on_step is not None:
            so_far = best_loss.clone()
            so_far[rows] = state.best_loss
            on_step(so_far)
        since += 1
        if i + 1 in checks:
            _checkpoint(state, since, rho)
            since = 0
    out[rows[~fooled]] = state.best[~fooled]
    out[rows[fooled]], success[rows[fooled]] = state.x[fooled], True
    best_loss[rows] = state.best_loss
    return out, success, best_loss


def _checkpoint(state: _State, window: int, rho: float) -> None:
    """Halve the step of every image whose loss rose in at most ρ of the last `window` steps, or whose step was not
    halved last time while its best loss stood still; those restart from their best point and its gradient."""
    oscillating = state.raised <= rho * window  # the reference: at most ρ of the steps raised the loss
    stalled = ~state.halved_last & (state.best_loss <= state.checked_loss)
    halve = oscillating | stalled
    state.step[halve] /= 2
    # restart from the best point; the momentum of the next step is then best − the iterate before the last step,
    # as in the reference
    state.x[halve], state.grad[halve] = state.best[halve], state.best_grad[halve]
    state.halved_last, state.checked_loss = halve, state.best_loss.clone()
    state.raised.zero_()


class APGD:
    """Auto-PGD, untargeted (Croce & Hein 2020): AutoAttack's first member with the cross-entropy loss (APGD-CE).

    Args:
        eps: the budget in [0,1] pixels (L-inf 8/255, the field's CIFAR-10 budget; L2 0.5).
        norm: "linf" or "l2".
        steps: iterations per restart (100, AutoAttack's standard).
        loss: "ce" (APGD-CE) or "dlr" (the difference of logits ratio, untargeted).
        restarts: random starts; a restart attacks only the images no earlier one fooled (1 in AutoAttack).
        rho: the share of steps that must raise the loss for the step size to stay (0.75).
        seed: seeds the random starts.
        batch_size: images per chunk; fooled images leave their chunk at once.

    `success` marks images the model misclassifies (pred ≠ label); an image it misclassified before the attack is
    not attacked and counts as a success with the clean image as its adversarial.
    """

    name = "apgd-ce"
    loss_name = "ce"

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0)] = 8 / 255,
        norm: Norm = "linf",
        steps: Count = 100,
        loss: Literal["ce", "dlr"] = "ce",
        restarts: Count = 1,
        rho: Annotated[float, Field(gt=0, lt=1)] = 0.75,
        seed: int = 0,
        batch_size: Count = 512,
    ) -> None:
        check_budget(self.name, norm, eps)
        if loss not in ("ce", "dlr"):
            raise AttackError(f"{self.name}: loss must be ce or dlr (got {loss!r})")
        if steps < 1 or restarts < 1 or not 0 < rho < 1:
            raise AttackError(
                f"{self.name}: need steps >= 1, restarts >= 1, 0 < rho < 1 (got {steps}, {restarts}, {rho})"
            )
        self.eps, self.norm, self.steps, self.loss = eps, norm, steps, loss
        self.restarts, self.rho, self.seed, self.batch_size = restarts, rho, seed, batch_size

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        return run_batched(lambda x, y: self._attack(model, x, y), model, images, labels, self.batch_size)

    def runs(self, logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """The target of each run (None: untargeted), `restarts` runs."""
        return [None] * self.restarts

    def loss_fn(self, targeted: bool) -> Loss:
        return dlr_loss if targeted or self.loss == "dlr" else ce_loss

    def _attack(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> AttackResult:
        with torch.no_grad():
            logits = logits_of(model, x0)
        adversarial = x0.clone()
        success = logits.argmax(1) != y  # misclassified already: nothing to attack
        keys = image_keys(x0, self.seed)  # N: each image's random stream
        for run, targets in enumerate(self.runs(logits, y)):
            todo = (~success).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            t = None if targets is None else targets[todo]
            found, fooled, _ = apgd(
                model, x0[todo], y[todo], t, eps=self.eps, norm=self.norm, steps=self.steps,
                loss_fn=self.loss_fn(t is not None), rho=self.rho, keys=keys[todo], restart=run,
            )  # fmt: skip
            adversarial[todo] = found  # the fooling point, or the highest-loss point of this run
            success[todo[fooled]] = True
        return AttackResult(adversarial, success)


class APGDT(APGD):
    """Targeted Auto-PGD with the DLR loss (APGD-T): one run at each of the `targets` classes the model ranks highest
    after the image's own, on the images no earlier target fooled (AutoAttack's second member; 9 targets)."""

    name = "apgd-t"

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0)] = 8 / 255,
        norm: Norm = "linf",
        steps: Count = 100,
        targets: Count = 9,
        restarts: Count = 1,
        rho: Annotated[float, Field(gt=0, lt=1)] = 0.75,
        seed: int = 0,
        batch_size: Count = 512,
    ) -> None:
        super().__init__(
            eps=eps, norm=norm, steps=steps, loss="dlr", restarts=restarts, rho=rho, seed=seed, batch_size=batch_size
        )
        if targets < 1:
            raise AttackError(f"apgd-t: targets must be >= 1 (got {targets})")
        self.targets = targets

    def runs(self, logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """The k-th run aims at the class ranked k+1 by the clean logits (the top one is the image's own when it is
        classified correctly, and only those are attacked), `restarts` times each."""
        if logits.shape[1] < 4:
            raise AttackError(
                f"apgd-t: the targeted DLR loss needs at least 4 classes, the model has {logits.shape[1]}"
            )
        return [target for target in other_classes(logits, self.targets) for _ in range(self.restarts)]
