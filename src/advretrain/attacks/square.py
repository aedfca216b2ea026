"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf or L2, untargeted: a score-based black-box attack.

It only queries the model's logits (no gradient anywhere): a random square window of the perturbation is redrawn and
kept when it lowers the margin m(x) = Z_y(x) − max_{i≠y} Z_i(x); an image is fooled, and leaves the batch, once
m ≤ 0 (METHOD.md 2.6; reference: fra31/auto-attack, autoattack/square.py). L-inf sets the window to ±2ε per channel;
L2 moves the perturbation's mass from a second window into the first as the reference's centred "pseudo-Gaussian"
pattern, so that the whole perturbation keeps L2 norm ε.

Randomness is a counter-based hash of (seed, the image's pixels, query, slot): every image draws the same windows
and signs whatever batch, shard or process it is attacked in, and whatever other images have already left.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from .base import AttackError, AttackResult, Count, check_budget, logits_of, margin, run_batched

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


def corner(bits: torch.Tensor, s: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An s×s window's top-left corner (N, N) anywhere inside an H×W image, from two draws per image (N×2)."""
    return bits[:, 0] % (h - s + 1), bits[:, 1] % (w - s + 1)


def windows(top: torch.Tensor, left: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """N×1×H×W masks, 1 on each image's s×s window whose corner is (top, left) (N each), 0 elsewhere."""
    rows = torch.arange(h, device=top.device)[None, :]
    cols = torch.arange(w, device=top.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)  # N×H
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)  # N×W
    return (in_rows[:, None, :, None] & in_cols[:, None, None, :]).float()


def centred_rectangle(height: int, width: int) -> torch.Tensor:
    """The reference's `eta_rectangles`: height×width, Σ_{k ≥ d} 1/(k+1)² at Chebyshev distance d from the centre,
    unit L2 norm: nested squares, heaviest in the middle."""
    rows = (torch.arange(height) - height // 2).abs()
    cols = (torch.arange(width) - width // 2).abs()
    distance = torch.maximum(rows[:, None], cols[None, :])  # height×width
    rings = max(height, width) // 2 + 1
    tail = (1 / (torch.arange(rings) + 1.0) ** 2).flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{k' ≥ k} 1/(k'+1)²
    pattern = tail[distance]
    return pattern / pattern.square().sum().sqrt().clamp_min(1e-12)


@functools.lru_cache(maxsize=64)  # one s per halving of the schedule: built once, not at every query
def l2_pattern(s: int) -> torch.Tensor:
    """The reference's `eta` without its random transpose (drawn per image by the caller): s×s, unit L2 norm, a
    centred rectangle on the top half and its negative on the bottom half."""
    pattern = torch.cat([centred_rectangle(s // 2, s), -centred_rectangle(s - s // 2, s)])
    return pattern / pattern.square().sum().sqrt().clamp_min(1e-12)


def per_channel_norm(delta: torch.Tensor) -> torch.Tensor:
    """N×C×1×1: each image's and channel's L2 norm (at least 1e-12, to divide by)."""
    return delta.flatten(2).square().sum(2).sqrt().clamp_min(1e-12)[:, :, None, None]


def image_norm(delta: torch.Tensor) -> torch.Tensor:
    """N×1×1×1: each image's L2 norm over all its channels and pixels."""
    return delta.flatten(1).square().sum(1).sqrt().view(-1, 1, 1, 1)


def unit_l2(delta: torch.Tensor) -> torch.Tensor:
    """Each image's perturbation (N×C×H×W) scaled to L2 norm 1 (a zero one stays zero)."""
    return delta / image_norm(delta).clamp_min(1e-12)


class Square:
    """Square Attack, L-inf or L2 (Andriushchenko et al. 2020), untargeted, margin loss; only forward passes.

    Args:
        eps: the bound in [0,1] pixels (L-inf 8/255, the field's CIFAR-10 budget; for L2 the field uses 0.5).
        max_queries: model queries per image at most, the first (the initial stripes) included (5,000).
        p_init: share of the image the first windows cover, halved on the reference's schedule (0.8).
        norm: "linf" or "l2".
        seed: seeds every image's stream of windows and signs.
        batch_size: images per chunk; fooled images leave their chunk at once.

    `AttackResult.iterations` holds each image's queries; `success` marks images the model misclassifies (m ≤ 0).
    """

    name = "square"

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0)] = 8 / 255,
        max_queries: Count = 5000,
        p_init: Annotated[float, Field(gt=0, le=1)] = 0.8,
        norm: Literal["linf", "l2"] = "linf",
        seed: int = 0,
        batch_size: Count = 512,
    ) -> None:
        check_budget("square", norm, eps)
        if max_queries < 1 or not (0 < p_init <= 1):
            raise AttackError(f"square: need max_queries >= 1, 0 < p_init <= 1 (got {max_queries}, {p_init})")
        if batch_size < 1:
            raise AttackError(f"square: batch_size must be >= 1 (got {batch_size})")
        self.eps, self.max_queries, self.p_init, self.norm = eps, max_queries, p_init, norm
        self.seed, self.batch_size = seed, batch_size

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        return run_batched(lambda x, y: self._attack(model, x, y), model, images, labels, self.batch_size)

    def side(self, query: int, height: int, width: int) -> int:
        """The window's side at `query`: a square covering a share p of the image, p on the halving schedule.

        L2 windows are odd and at least 3 (the reference's): the pattern needs a centre and two halves."""
        progress = int(query / self.max_queries * 10000)
        p = self.p_init / 2 ** sum(progress > h for h in _HALVINGS)
        s = max(1, round(math.sqrt(p * height * width)))
        if self.norm == "l2":
            s = max(s, 3) | 1
        return min(s, height - 1, width - 1) if min(height, width) > 1 else 1

    @torch.no_grad()
    def _attack(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> AttackResult:
        n, _, h, w = x0.shape
        keys = image_keys(x0, self.seed)
        start, step = (self._start_l2, self._step_l2) if self.norm == "l2" else (self._start_linf, self._step_linf)
        best = start(x0, keys)
        margins = self._margin(model, best, y)  # N
        queries = torch.ones(n, dtype=torch.long, device=x0.device)
        for query in range(1, self.max_queries):
            active = (margins > 0).nonzero().squeeze(1)  # the images not fooled yet: the only ones queried
            if active.numel() == 0:
                break
            candidate = step(x0[active], best[active], keys[active], query, self.side(query, h, w))
            new_margin = self._margin(model, candidate, y[active])
            # accept where the margin fell, or where the image is now misclassified
            better = (new_margin < margins[active]) | (new_margin <= 0)
            best[active[better]] = candidate[better]
            margins[active[better]] = new_margin[better]
            queries[active] += 1
        return AttackResult(best, margins <= 0, iterations=queries)

    def _start_linf(self, x0: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The reference's start: vertical stripes, ±ε per channel and column."""
        n, c, _, w = x0.shape
        stripes = signs(draws(keys, 0, c * w)).view(n, c, 1, w)
        return (x0 + self.eps * stripes).clamp(0, 1)

    def _start_l2(self, x0: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The reference's start: a grid of about 5×5 tiles, each the L2 pattern (or its transpose) with a sign per
        channel, the whole scaled to L2 norm ε."""
        n, c, h, w = x0.shape
        s = max(1, min(h, w) // 5)
        rows, cols = h // s, w // s
        top, left = (h - rows * s) // 2, (w - cols * s) // 2
        bits = draws(keys, 0, (c + 1) * rows * cols)  # N×(C+1)·tiles: C signs and an orientation a tile
        tile_signs = signs(bits[:, : c * rows * cols]).view(n, c, rows, cols)
        transposed = (bits[:, c * rows * cols :] & 1).bool().view(n, 1, rows, cols)
        pattern = l2_pattern(s).to(x0)

        def per_pixel(t: torch.Tensor) -> torch.Tensor:  # N×·×rows×cols → N×·×(rows·s)×(cols·s)
            return t.repeat_interleave(s, 2).repeat_interleave(s, 3)

        tiles = torch.where(per_pixel(transposed), pattern.T.repeat(rows, cols), pattern.repeat(rows, cols))
        delta = torch.zeros_like(x0)
        delta[:, :, top : top + rows * s, left : left + cols * s] = tiles * per_pixel(tile_signs)
        return (x0 + self.eps * unit_l2(delta)).clamp(0, 1)

    def _step_l2(self, x0: torch.Tensor, best: torch.Tensor, keys: torch.Tensor, query: int, s: int) -> torch.Tensor:
        """The reference's L2 step: window 2's mass and the budget left over go into window 1, which becomes its old
        content (unit norm per channel) plus the L2 pattern with a sign per channel; window 2 is emptied; the whole
        perturbation is scaled back to L2 norm ε and the image clipped to [0,1]."""
        _, c, h, w = x0.shape
        bits = draws(keys, query, 5 + c)  # N×(5+C): two windows' corners, an orientation, C signs
        top, left = corner(bits[:, 0:2], s, h, w)  # N, N: the first window's corner
        first = windows(top, left, s, h, w).to(x0.dtype)  # N×1×H×W
        both = torch.maximum(first, windows(*corner(bits[:, 2:4], s, h, w), s, h, w))
        placed = self._placed(l2_pattern(s).to(x0), bits[:, 4] & 1, top, left, h, w) * first  # N×1×H×W
        delta = best - x0  # N×C×H×W, L2 norm ≤ ε
        old = delta * first
        new = placed * signs(bits[:, 5 : 5 + c]).to(x0.dtype).view(-1, c, 1, 1) + old / per_channel_norm(old)
        moved = image_norm(delta * both)  # N×1×1×1: the two windows' mass
        mass = ((self.eps**2 - image_norm(delta) ** 2).clamp_min(0) / c + moved**2).sqrt()  # each channel's window norm
        delta = delta * (1 - both) + new / per_channel_norm(new) * mass
        return (x0 + self.eps * unit_l2(delta)).clamp(0, 1)

    @staticmethod
    def _placed(
        pattern: torch.Tensor, transposed: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        """N×1×H×W: the s×s `pattern` (its transpose where `transposed`, N) with its corner at (top, left), each
        pixel reading the pattern at its offset inside the window (clamped: mask the result with the window)."""
        s = pattern.shape[0]
        rows = (torch.arange(h, device=top.device)[None, :] - top[:, None]).clamp(0, s - 1)  # N×H
        cols = (torch.arange(w, device=top.device)[None, :] - left[:, None]).clamp(0, s - 1)  # N×W
        both = torch.stack([pattern, pattern.T])  # 2×s×s
        return both[transposed[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]

    def _step_linf(self, x0: torch.Tensor, best: torch.Tensor, keys: torch.Tensor, query: int, s: int) -> torch.Tensor:
        """best with one s×s window per image set to ±2ε per channel, projected onto the ε-ball and [0,1].

        As in the reference (and ART), a draw that leaves an image's window as it was is drawn again (new signs,
        same window, at most `_REDRAWS` times), so that a query is not spent on the image the attacker already has.
        """
        _, c, h, w = x0.shape
        bits = draws(keys, query, 2 + c * (1 + _REDRAWS))  # N×(2 + C·k): the window's corner, then C signs a draw
        window = windows(*corner(bits[:, 0:2], s, h, w), s, h, w).to(x0.dtype)  # N×1×H×W
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
        return margin(logits_of(model, x).float(), y)
