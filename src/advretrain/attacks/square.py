"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf, untargeted: a score-based black-box attack.

It only queries the model's logits (no gradient anywhere): random square windows of ±2ε per channel are accepted when
they lower the margin m(x) = Z_y(x) − max_{i≠y} Z_i(x); an image is fooled, and leaves the batch, once m ≤ 0
(METHOD.md 2.6; reference: fra31/auto-attack, autoattack/square.py).

Randomness is a counter-based hash of (seed, the image's pixels, query, slot): every image draws the same windows
and signs whatever batch, shard or process it is attacked in, and whatever other images have already left.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from .base import AttackError, AttackResult, Count, logits_of, run_batched

_MASK32 = 0xFFFFFFFF
# p_init is halved at these shares of the query budget (in 1/10,000; the reference's schedule).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_REDRAWS = 4  # new signs for a window the first draw left unchanged (each C signs: 2^-C odds of another miss)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32  # int64 products wrap; their low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def image_keys(images: torch.Tensor, seed: int) -> torch.Tensor:
    """One 32-bit key per image (N,) from its 8-bit pixels and the seed: its own random stream."""
    pixels = (images.flatten(1) * 255).round().long()  # N×D in 0..255
    weights = _mix32(torch.arange(pixels.shape[1], device=images.device) + 1)  # D position weights
    return _mix32(((pixels * weights).sum(1) + seed * 0x9E3779B9) & _MASK32)


def draws(keys: torch.Tensor, query: int, slots: int) -> torch.Tensor:
    """N×slots independent 32-bit draws for query number `query` of each image."""
    counter = (query * 0x85EBCA6B + torch.arange(slots, device=keys.device) * 0xC2B2AE35) & _MASK32
    return _mix32(_mix32(keys[:, None] ^ counter[None, :]) ^ keys[:, None])


def signs(bits: torch.Tensor) -> torch.Tensor:
    return (bits & 1).float() * 2 - 1  # ±1


class Square:
    """Square Attack, L-inf (Andriushchenko et al. 2020), untargeted, margin loss; only forward passes.

    Args:
        eps: L-inf bound in [0,1] pixels (8/255, the field's CIFAR-10 budget).
        max_queries: model queries per image at most, the first (the initial stripes) included (5,000).
        p_init: share of the image the first windows cover, halved on the reference's schedule (0.8).
        seed: seeds every image's stream of windows and signs.
        batch_size: images per chunk; fooled images leave their chunk at once.

    `AttackResult.iterations` holds each image's queries; `success` marks images the model misclassifies (m ≤ 0).
    """

    name = "square"

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0, le=1)] = 8 / 255,
        max_queries: Count = 5000,
        p_init: Annotated[float, Field(gt=0, le=1)] = 0.8,
        seed: int = 0,
        batch_size: Count = 512,
    ) -> None:
        if not (0 < eps <= 1) or max_queries < 1 or not (0 < p_init <= 1) or batch_size < 1:
            raise AttackError(
                f"square: need 0 < eps <= 1, max_queries >= 1, 0 < p_init <= 1, batch_size >= 1 (got {eps}, "
                f"{max_queries}, {p_init}, {batch_size})"
            )
        self.eps, self.max_queries, self.p_init, self.seed, self.batch_size = eps, max_queries, p_init, seed, batch_size

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        return run_batched(lambda x, y: self._attack(model, x, y), model, images, labels, self.batch_size)

    def side(self, query: int, height: int, width: int) -> int:
        """The window's side at `query`: a square covering a share p of the image, p on the halving schedule."""
        progress = int(query / self.max_queries * 10000)
        p = self.p_init / 2 ** sum(progress > h for h in _HALVINGS)
        return min(max(1, round(math.sqrt(p * height * width))), height - 1, width - 1) if min(height, width) > 1 else 1

    @torch.no_grad()
    def _attack(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> AttackResult:
        n, c, h, w = x0.shape
        keys = image_keys(x0, self.seed)
        stripes = signs(draws(keys, 0, c * w)).view(n, c, 1, w)  # vertical stripes: one sign per channel and column
        best = (x0 + self.eps * stripes).clamp(0, 1)
        margin = self._margin(model, best, y)  # N
        queries = torch.ones(n, dtype=torch.long, device=x0.device)
        for query in range(1, self.max_queries):
            active = (margin > 0).nonzero().squeeze(1)  # the images not fooled yet: the only ones queried
            if active.numel() == 0:
                break
            s = self.side(query, h, w)
            candidate = self._step(x0[active], best[active], keys[active], query, s)
            new_margin = self._margin(model, candidate, y[active])
            # accept where the margin fell, or where the image is now misclassified
            better = (new_margin < margin[active]) | (new_margin <= 0)
            best[active[better]] = candidate[better]
            margin[active[better]] = new_margin[better]
            queries[active] += 1
        return AttackResult(best, margin <= 0, iterations=queries)

    def _step(self, x0: torch.Tensor, best: torch.Tensor, keys: torch.Tensor, query: int, s: int) -> torch.Tensor:
        """best with one s×s window per image set to ±2ε per channel, projected onto the ε-ball and [0,1].

        As in the reference (and ART), a draw that leaves an image's window as it was is drawn again (new signs,
        same window, at most `_REDRAWS` times), so that a query is not spent on the image the attacker already has.
        """
        _, c, h, w = x0.shape
        bits = draws(keys, query, 2 + c * (1 + _REDRAWS))  # N×(2 + C·k): the window's corner, then C signs a draw
        top, left = bits[:, 0] % (h - s + 1), bits[:, 1] % (w - s + 1)  # N, N
        rows = torch.arange(h, device=x0.device)[None, :]
        cols = torch.arange(w, device=x0.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)  # N×H
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)  # N×W
        window = (in_rows[:, None, :, None] & in_cols[:, None, None, :]).to(x0.dtype)  # N×1×H×W
        candidate = self._set_window(x0, best, window, bits[:, 2 : 2 + c])
        for redraw in range(1, _REDRAWS + 1):
            same = (candidate == best).flatten(1).all(1).nonzero().squeeze(1)  # images the draw left unchanged
            if same.numel() == 0:
                break
            fresh = bits[same, 2 + c * redraw : 2 + c * (redraw + 1)]
            candidate[same] = self._set_window(x0[same], best[same], window[same], fresh)
        return candidate

    def _set_window(
        self, x0: torch.Tensor, best: torch.Tensor, window: torch.Tensor, bits: torch.Tensor
    ) -> torch.Tensor:
        """best + window · (±2ε per channel from `bits`, N×C), projected onto the ε-ball around x0 and [0,1]."""
        n, c = bits.shape
        delta = window * signs(bits).to(x0.dtype).view(n, c, 1, 1) * (2 * self.eps)  # N×C×H×W
        candidate = torch.min(torch.max(best + delta, x0 - self.eps), x0 + self.eps)
        return candidate.clamp(0, 1)

    @staticmethod
    def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """m = Z_y − max_{i≠y} Z_i (N): positive while the model still predicts the label."""
        logits = logits_of(model, x).float()
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return true - others
