"""AutoAttack, the field's standard robustness evaluation (Croce & Hein, ICML 2020; RobustBench ranks by it):
attacks run in turn, each on the images every earlier one failed on; an image counts as robust only if all fail.

The standard version runs APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5,000 queries), all at one
ε. FAB-T is not implemented here, so the ensemble is the other three: an image only FAB-T breaks counts as
robust. Measured with the reference implementation member by member (benchmarks/autoattack_vs_peers.py, the
default run's undefended CNN at 2/255, 200 images): FAB-T broke no image APGD-CE and APGD-T had left.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from .apgd import APGD, APGDT, Norm
from .base import AttackError, AttackResult, Count, check_inputs, empty_result, frozen, logits_of
from .registry import Attack
from .square import Square


class AutoAttack:
    """AutoAttack, standard version without FAB-T: APGD-CE → APGD-T → Square, each on the images still robust.

    Args:
        eps: the budget in [0,1] pixels (L-inf 8/255; L2 0.5).
        norm: "linf" or "l2".
        steps: APGD iterations (100).
        targets: APGD-T's target classes (9).
        queries: Square's queries per image (5,000).
        seed: seeds every member.
        batch_size: images per chunk of each member.

    `success` marks the images the ensemble broke (misclassified, or misclassified already); `member` holds the index
    in `MEMBERS` of the attack that broke each one (-1: robust or misclassified before any attack).
    """

    name = "autoattack"
    MEMBERS = ("apgd-ce", "apgd-t", "square")

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0)] = 8 / 255,
        norm: Norm = "linf",
        steps: Count = 100,
        targets: Count = 9,
        queries: Count = 5000,
        seed: int = 0,
        batch_size: Count = 512,
    ) -> None:
        try:
            self.members: list[Attack] = [
                APGD(eps=eps, norm=norm, steps=steps, seed=seed, batch_size=batch_size),
                APGDT(eps=eps, norm=norm, steps=steps, targets=targets, seed=seed, batch_size=batch_size),
                Square(eps=eps, norm=norm, max_queries=queries, seed=seed, batch_size=batch_size),
            ]
        except AttackError as exc:
            raise AttackError(str(exc).replace("apgd-ce", "autoattack")) from exc
        self.eps, self.norm, self.steps, self.targets = eps, norm, steps, targets
        self.queries, self.seed, self.batch_size = queries, seed, batch_size

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        check_inputs(images, labels)
        if images.shape[0] == 0:
            return empty_result(images)
        with torch.no_grad(), frozen(model):
            param = next(model.parameters())
            clean = torch.cat(
                [
                    logits_of(model, x.to(param.device, param.dtype)).argmax(1).to(images.device)
                    for x in torch.split(images, 512)
                ]
            )
        adversarial = images.detach().clone()
        robust = clean == labels.to(images.device)  # N: misclassified clean images are not robust, and not attacked
        member = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        for index, attack in enumerate(self.members):
            todo = robust.nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            result = attack(model, images[todo], labels[todo])
            broken = todo[result.success.to(images.device)]
            adversarial[broken] = result.adversarial[result.success].to(images.device, images.dtype)
            robust[broken], member[broken] = False, index
        return AttackResult(adversarial, ~robust, member=member)
