"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf or L2: AutoAttack's third
member (reference: fra31/auto-attack, autoattack/fab_base.py, fab_pt.py and fab_projections.py, MIT licence; the
two projections below follow fab_projections.py).

FAB looks for the smallest perturbation that crosses the boundary to a target class. Each step linearises the logit
difference z_t − z_y at the iterate x, projects both x and the clean image x0 onto that hyperplane within [0,1]
(the smallest step in the norm), and moves to a mix of the two projections, overshot by η and biased toward x0 by
α ≤ α_max; a point that is misclassified is pulled back toward x0 by β, to search for a smaller one. AutoAttack's
standard version runs it without random starts at each of the top-9 other classes in turn, 100 steps each.

An image counts as broken once an iterate is misclassified within ε of x0, and then leaves the batch: the reference
keeps shrinking the perturbation below ε, which changes no verdict (robust accuracy), and each image's steps depend
on no other image.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .apgd import Norm
from .base import AttackError, AttackResult, Count, check_budget, logits_of, other_classes, run_batched


def projection_linf(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest-L-inf step d (N×D) taking each point t (N×D) onto the hyperplane w·(t + d) = b with t + d in
    [0,1], or as close to it as the box allows. Sorts each row's coordinates by how far they can move and finds, by
    a binary search over that order (log2 D rounds, every row at once), how many coordinates reach their bound."""
    t, w, b = points, w.clone(), b.clone()
    sign = 2 * ((w * t).sum(1) - b >= 0).to(w.dtype) - 1  # N: which side of the plane t lies on
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)
    a = (w < 0).to(w.dtype)  # N×D: the box bound (0 or 1) each coordinate moves toward
    d = (a - t) * (w != 0).to(w.dtype)  # N×D: the largest move of each coordinate
    p = a - t * (2 * a - 1)  # N×D: its length
    order = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    reverse = order.flip((1,))
    ws = w.gather(1, reverse)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(-ws * d.gather(1, reverse), dim=1) + b0.unsqueeze(1)
    b2 = sb[:, -1] - s[:, -1] * p.gather(1, order[:, 0:1]).squeeze(1)
    whole = b - b2 > 0  # no coordinate saturates: one λ for all
    searched = (b - b0 > 0) & ~whole  # some saturate: search how many
    lb = torch.zeros(int(searched.sum()), device=t.device, dtype=t.dtype)
    ub = torch.full_like(lb, w.shape[1] - 1)
    order_, sb_, s_, p_, b_ = order[searched], sb[searched], s[searched], p[searched], b[searched]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        middle = torch.floor((lb + ub) / 2)
        at = middle.long().unsqueeze(1)
        current = order_.gather(1, order_.size(1) - 1 - at)
        c = b_ - (sb_.gather(1, at) - s_.gather(1, at) * p_.gather(1, current)).squeeze(1) > 0
        lb, ub = torch.where(c, middle, lb), torch.where(c, ub, middle)
    found = lb.long()
    if whole.any():
        lmbd = torch.clamp_min((b[whole] - sb[whole, -1]) / (-s[whole, -1]), min=0).unsqueeze(-1)
        d[whole] = (2 * a[whole] - 1) * lmbd
    lmbd = torch.clamp_min((b[searched] - sb[searched, found]) / (-s[searched, found]), min=0).unsqueeze(-1)
    d[searched] = torch.min(lmbd, d[searched]) * a[searched] + torch.max(-lmbd, d[searched]) * (1 - a[searched])
    return d * (w != 0).to(w.dtype)


def projection_l2(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest-L2 step d (N×D) taking each point t (N×D) onto the hyperplane w·(t + d) = b with t + d in
    [0,1]: coordinates clip at the box one by one as the step grows along w, found by a binary search over their
    sorted clipping points (log2 D rounds, every row at once)."""
    t, w = points, w.clone()
    c = (w * t).sum(1) - b  # N: signed distance in w's units
    side = 2 * (c >= 0).to(w.dtype) - 1
    w.mul_(side.unsqueeze(1))
    c = c * side
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)  # N×D: where each coordinate clips
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r[r == -1e12] *= -1
    rs, indr = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs2.masked_fill_(rs2 == 1e12, 0)
    w3s = (w**2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w) * (w.abs() > 1e-8).to(w.dtype)
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)
    free = s[:, 0] + c < 0  # no coordinate clips: the plain projection
    unreachable = (d * w).sum(dim=1) + c > 0  # every coordinate clipped and still short: go to the box corner
    searched = ~(free | unreachable)
    lb = torch.zeros(int(searched.sum()), device=t.device, dtype=t.dtype)
    ub = torch.full_like(lb, w.shape[1] - 1)
    s_, c_ = s[searched], c[searched]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        middle = torch.floor((lb + ub) / 2)
        above = s_.gather(1, middle.long().unsqueeze(1)).squeeze(1) + c_ > 0
        lb, ub = torch.where(above, middle, lb), torch.where(above, ub, middle)
    found = lb.long()
    if free.any():
        d[free] = -(c[free] / w5[free].squeeze(-1)).unsqueeze(-1) * w[free]
    if searched.any():
        alpha = (s[searched, found] + c[searched]) / ws[searched, found] + rs[searched, found]
        alpha[ws[searched, found] == 0] = 0
        clipped = (alpha.unsqueeze(-1) > r[searched]).to(w.dtype)
        d[searched] = d[searched] * clipped - alpha.unsqueeze(-1) * w[searched] * (1 - clipped)
    return d * (w.abs() > 1e-8).to(w.dtype)


def size(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-row norm (N) of N×... perturbations."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def fab_targeted(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor,
    *,
    eps: float,
    norm: Norm,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAB run toward `targets` (N) from x0 (N×C×H×W): the adversarial images (the first misclassified iterate
    within ε, else x0) and the success mask (N)."""
    project = projection_linf if norm == "linf" else projection_l2
    out = x0.clone()
    success = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    rows = torch.arange(x0.shape[0], device=x0.device)  # the images still in the batch
    x = x0.clone()
    for _ in range(steps):
        n, origin = rows.numel(), x0[rows]
        point = x.detach().requires_grad_(True)
        logits = logits_of(model, point)
        index = torch.arange(n, device=x.device)
        gap = logits[index, targets[rows]] - logits[index, y[rows]]  # N: z_t − z_y, 0 on the boundary
        (grad,) = torch.autograd.grad(gap.sum(), point)  # sum: each image's own gradient (eval mode)
        with torch.no_grad():
            w = grad.flatten(1)  # N×D: the linearised boundary w·z = b
            b = (w * x.flatten(1)).sum(1) - gap.detach()
            steps_to = project(torch.cat((x.flatten(1), origin.flatten(1))), torch.cat((w, w)), torch.cat((b, b)))
            from_x, from_x0 = steps_to[:n].view_as(x), steps_to[n:].view_as(x)
            lengths = size(steps_to, norm).clamp_min(1e-8).view(-1, 1, 1, 1)
            alpha = (lengths[:n] / (lengths[:n] + lengths[n:])).clamp(0, alpha_max)  # N×1×1×1: the pull toward x0
            x = ((x + eta * from_x) * (1 - alpha) + (origin + eta * from_x0) * alpha).clamp(0, 1)
            fooled = logits_of(model, x).argmax(1) != y[rows]
            within = fooled & (size(x - origin, norm) <= eps)
            out[rows[within]], success[rows[within]] = x[within], True
            x = torch.where(fooled[:, None, None, None], origin + (x - origin) * beta, x)  # back toward x0
            keep = (~within).nonzero().squeeze(1)
            rows, x = rows[keep], x[keep]
        if rows.numel() == 0:
            break
    return out, success


class FABT:
    """FAB-T (targeted FAB, AutoAttack's third member): one run at each of the `targets` classes the model ranks
    highest after the image's own, on the images no earlier target broke within ε.

    Args:
        eps: the budget in [0,1] pixels (L-inf 8/255; L2 0.5): a perturbation larger than this does not count.
        norm: "linf" or "l2".
        steps: iterations per target (100, AutoAttack's standard).
        targets: target classes (9).
        alpha_max: the largest pull toward the clean image per step (0.1, the reference's).
        eta: overshoot past the linearised boundary (1.05).
        beta: the backward step after a misclassified iterate (0.9).
        batch_size: images per chunk; broken images leave their chunk at once.

    `success` marks images misclassified within ε; an image misclassified before the attack is not attacked and
    counts as a success with the clean image as its adversarial. Deterministic: the standard version has no random
    start.
    """

    name = "fab-t"

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0)] = 8 / 255,
        norm: Norm = "linf",
        steps: Count = 100,
        targets: Count = 9,
        alpha_max: Annotated[float, Field(ge=0, le=1)] = 0.1,
        eta: Annotated[float, Field(ge=1)] = 1.05,
        beta: Annotated[float, Field(gt=0, lt=1)] = 0.9,
        batch_size: Count = 512,
    ) -> None:
        check_budget(self.name, norm, eps)
        if steps < 1 or targets < 1:
            raise AttackError(f"fab-t: need steps >= 1, targets >= 1 (got {steps}, {targets})")
        self.eps, self.norm, self.steps, self.targets = eps, norm, steps, targets
        self.alpha_max, self.eta, self.beta, self.batch_size = alpha_max, eta, beta, batch_size

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        return run_batched(lambda x, y: self._attack(model, x, y), model, images, labels, self.batch_size)

    def _attack(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> AttackResult:
        with torch.no_grad():
            logits = logits_of(model, x0)
        adversarial = x0.clone()
        success = logits.argmax(1) != y  # misclassified already: nothing to attack
        for targets in other_classes(logits, self.targets):  # in turn, each on the images no earlier one broke
            todo = (~success).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            found, broken = fab_targeted(
                model, x0[todo], y[todo], targets[todo], eps=self.eps, norm=self.norm, steps=self.steps,
                alpha_max=self.alpha_max, eta=self.eta, beta=self.beta,
            )  # fmt: skip
            adversarial[todo[broken]], success[todo[broken]] = found[broken], True
        return AttackResult(adversarial, success)
