"""Muon for convolution filters beside SGD for everything else, in one optimizer (one state dict, one schedule).

Muon (Jordan 2024, used by airbench94_muon) is SGD-momentum whose update for a weight matrix is replaced by the
nearest semi-orthogonal matrix, found by a few Newton-Schulz iterations: every direction of the filter bank moves at
the same rate, which on CIFAR-10 reaches an accuracy in fewer epochs than SGD. torch.optim.Muon takes 2-D parameters
only; a conv filter bank here is its out × (in·k·k) matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Quintic Newton-Schulz coefficients (Jordan 2024), tuned to push singular values toward 1 in few steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with g's singular vectors. g: R×C → R×C."""
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm() + 1e-7)  # singular values ≤ 1, where the iteration converges
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    out: torch.Tensor = x if wide else x.T
    return out


class MuonSGD(torch.optim.Optimizer):
    """Muon for the parameter groups marked `muon`, SGD with (Nesterov) momentum and weight decay for the others.

    A Muon group's tensors are rescaled to norm √(out channels) before each update, as in airbench94_muon: every
    filter bank is followed by BatchNorm, so its scale is free, and fixing it keeps the angle each step turns it by
    (the lr) constant; that replaces weight decay for those groups.
    """

    def __init__(
        self, params: Iterable[dict[str, Any]], lr: float, momentum: float, nesterov: bool, ns_steps: int = 3
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "muon": False}
        super().__init__(params, defaults)
        self.ns_steps = ns_steps

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            momentum, nesterov = group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if group["muon"] else p.grad.add(p, alpha=group["weight_decay"])
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(momentum).add_(grad)
                update = grad.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    update = orthogonalize(update.reshape(len(p), -1), self.ns_steps).view_as(p)
                p.add_(update, alpha=-group["lr"])
