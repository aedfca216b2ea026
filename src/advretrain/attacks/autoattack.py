"""AutoAttack, the field's standard robustness evaluation (Croce & Hein, ICML 2020; RobustBench ranks by it):
attacks run in turn, each on the images every earlier one failed on; an image counts as robust only if all fail.

The standard version: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5,000 queries), all at one ε.
Where measured (benchmarks/autoattack_vs_peers.py, docs/results.md: an undefended CNN at 2/255, an FGSM-RS-trained
one at 8/255, 200 images each), FAB-T broke no image APGD-CE and APGD-T had left, in the reference implementation
and here, yet took about 40% of the ensemble's time: `members` without "fab-t" is the cheaper choice it leaves open.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from .apgd import APGD, APGDT, Norm
from .base import AttackError, AttackResult, Count, check_inputs, empty_result, frozen, logits_of
from .fab import FABT
from .registry import Attack
from .square import Square

Member = Literal["apgd-ce", "apgd-t", "fab-t", "square"]
STANDARD: tuple[Member, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")  # the order of the reference's standard version


class AutoAttack:
    """AutoAttack, standard version: APGD-CE → APGD-T → FAB-T → Square, each on the images still robust.

    Args:
        eps: the budget in [0,1] pixels (L-inf 8/255; L2 0.5).
        norm: "linf" or "l2".
        steps: APGD's and FAB-T's iterations (100).
        targets: APGD-T's and FAB-T's target classes (9).
        queries: Square's queries per image (5,000).
        members: the attacks run, in this order (the standard four; a subset is the reference's "custom" version).
        seed: seeds every member.
        batch_size: images per chunk of each member.

    `success` marks the images the ensemble broke (misclassified, or misclassified already); `member` holds the index
    in `members` of the attack that broke each one (-1: robust or misclassified before any attack).
    """

    name = "autoattack"

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0)] = 8 / 255,
        norm: Norm = "linf",
        steps: Count = 100,
        targets: Count = 9,
        queries: Count = 5000,
        members: tuple[Member, ...] = STANDARD,
        seed: int = 0,
        batch_size: Count = 512,
    ) -> None:
        if not members or len(set(members)) != len(members) or not set(members) <= set(STANDARD):
            raise AttackError(f"autoattack: members must be distinct names among {', '.join(STANDARD)} (got {members})")
        self.eps, self.norm, self.steps, self.targets = eps, norm, steps, targets
        self.queries, self.members, self.seed, self.batch_size = queries, tuple(members), seed, batch_size
        try:
            self.attacks: list[Attack] = [self._member(name) for name in members]
        except AttackError as exc:  # a member's words, under the name the user gave
            raise AttackError(f"autoattack:{str(exc).partition(':')[2]}") from exc

    def _member(self, name: Member) -> Attack:
        """One member at the ensemble's budget; APGD-T and FAB-T share the targets, APGD and FAB the steps."""
        eps, norm, batch = self.eps, self.norm, self.batch_size
        if name == "apgd-ce":
            return APGD(eps=eps, norm=norm, steps=self.steps, seed=self.seed, batch_size=batch)
        if name == "apgd-t":
            return APGDT(eps=eps, norm=norm, steps=self.steps, targets=self.targets, seed=self.seed, batch_size=batch)
        if name == "fab-t":
            return FABT(eps=eps, norm=norm, steps=self.steps, targets=self.targets, batch_size=batch)
        return Square(eps=eps, norm=norm, max_queries=self.queries, seed=self.seed, batch_size=batch)

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
        for index, attack in enumerate(self.attacks):
            todo = robust.nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            result = attack(model, images[todo], labels[todo])
            broken = todo[result.success.to(images.device)]
            adversarial[broken] = result.adversarial[result.success].to(images.device, images.dtype)
            robust[broken], member[broken] = False, index
        return AttackResult(adversarial, ~robust, member=member)
