"""Generative Adversarial Perturbations (Poursaeed et al. 2018), universal and non-targeted.

A ResNet generator maps one fixed, saved uniform-noise pattern z to one perturbation U, scaled per channel to
L-inf `eps` in [0,1] pixel space; U is fitted so that f(clip(x + U)) moves toward each image's least-likely class.
Reference: OmidPoursaeed/Generative_Adversarial_Perturbations (METHOD.md 2.1).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm import tqdm

from ..data import to_float
from ..metrics import predict
from ..runtime.distributed import all_sum, block, broadcast_state, data_parallel, global_batch_mean, world_size
from .base import AttackError, AttackResult, Count, Positive, check_inputs, empty_result, frozen, logits_of

log = logging.getLogger(__name__)


def _conv_bn_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels), nn.ReLU(True)]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            *_conv_bn_relu(nn.Conv2d(channels, channels, 3, bias=False), channels),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class ResnetGenerator(nn.Module):
    """GAP's image-to-image generator: 7×7 conv, two stride-2 downs, `blocks` residual blocks, two ups, 7×7, tanh."""

    def __init__(self, ngf: int = 64, blocks: int = 6, init: str = "reference") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), *_conv_bn_relu(nn.Conv2d(3, ngf, 7, bias=False), ngf)]
        layers += _conv_bn_relu(nn.Conv2d(ngf, 2 * ngf, 3, 2, 1, bias=False), 2 * ngf)
        layers += _conv_bn_relu(nn.Conv2d(2 * ngf, 4 * ngf, 3, 2, 1, bias=False), 4 * ngf)
        layers += [ResidualBlock(4 * ngf) for _ in range(blocks)]
        layers += _conv_bn_relu(nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, 2, 1, output_padding=1, bias=False), 2 * ngf)
        layers += _conv_bn_relu(nn.ConvTranspose2d(2 * ngf, ngf, 3, 2, 1, output_padding=1, bias=False), ngf)
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        if init == "reference":
            self.reference_init()

    def reference_init(self) -> None:
        """The reference's DCGAN-style initialisation: conv weights N(0, 0.02), BN scales N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: 1×3×H×W, raw 0-255 noise as the reference feeds it
        out: torch.Tensor = self.net(z)
        return out  # 1×3×H×W in (-1, 1)


def saturation(g: torch.Tensor) -> float:
    """Share of the generator's tanh outputs with |g| > 0.99: near 1, its gradient has vanished and U is frozen."""
    return float((g.abs() > 0.99).float().mean())


def scale_to_budget(g: torch.Tensor, eps: float) -> torch.Tensor:
    """Per channel, U = eps · g / max|g| (METHOD.md 2.1 [REC]): every channel reaches the L-inf bound exactly."""
    return eps * g / g.abs().amax(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)


class GAP:
    """Universal perturbation from a generator. `fit(model, train_images)` first, then call like any attack.

    Args:
        eps: L-inf bound in [0,1] pixels (10/255).
        lr: Adam learning rate (paper: 0.002 CIFAR-10, 0.001 TinyImageNet), betas (0.5, 0.999).
        epochs: passes over the training images (10); `max_iter` caps the steps per epoch (reference: 50; None: full).
        batch_size: images per step (30, the reference's).
        holdout: training images held out to choose the best epoch by fooling ratio (5,000 [REC]).
        loss: "least-likely" (the paper's: log CE toward each clean image's least-likely class) or "untargeted"
            (−log CE of the clean prediction: away from it, in any direction).
        init: "reference" (N(0, 0.02) weights, the reference's) or "pytorch" (PyTorch's default initialisation).

    `history` holds, per epoch, the held-out fooling ratio and the generator's saturation (share of |tanh| > 0.99):
    a generator whose saturation reaches ~1 has frozen, whatever its fooling ratio (METHOD.md 2.1).
    """

    name = "gap"

    def __init__(
        self,
        *,
        eps: Annotated[float, Field(gt=0, le=1)] = 10 / 255,
        lr: Positive = 0.002,
        epochs: Count = 10,
        batch_size: Count = 30,
        max_iter: Count | None = None,
        holdout: Count = 5000,
        loss: Literal["least-likely", "untargeted"] = "least-likely",
        init: Literal["reference", "pytorch"] = "reference",
        ngf: Count = 64,
        seed: int = 0,
        eval_batch_size: Count = 512,
        progress: bool = False,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        if not 0 < eps <= 1 or lr <= 0 or epochs < 1 or batch_size < 1 or holdout < 1:
            raise AttackError("gap: need 0 < eps <= 1, lr > 0 and epochs, batch_size, holdout >= 1")
        if max_iter is not None and max_iter < 1:
            raise AttackError("gap: max_iter must be >= 1, or None for full passes")
        self.eps, self.lr, self.epochs, self.batch_size, self.max_iter = eps, lr, epochs, batch_size, max_iter
        self.loss, self.init = loss, init
        self.holdout, self.ngf, self.seed, self.eval_batch_size, self.progress = (
            holdout,
            ngf,
            seed,
            eval_batch_size,
            progress,
        )
        self.generator: ResnetGenerator | None = None
        self.noise: torch.Tensor | None = None  # z: 1×3×H×W
        self.perturbation: torch.Tensor | None = None  # U: 1×3×H×W, |U| <= eps
        self.history: list[dict[str, float]] = []
        self.on_epoch = on_epoch  # called after each epoch with its record (the pipeline's fault point)

    def fit(self, model: nn.Module, images: torch.Tensor) -> GAP:
        """Fit the generator against `model` on training images (uint8 or [0,1] float N×C×H×W)."""
        x_all = to_float(images)
        check_inputs(x_all, torch.zeros(x_all.shape[0], dtype=torch.long))
        n_hold = min(self.holdout, x_all.shape[0] // 5)  # small sets: hold out a fifth, never everything
        if n_hold < 1:
            raise AttackError(f"gap: {x_all.shape[0]} images are too few to fit and select a perturbation")
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(x_all.shape[0], generator=gen)
        fit_idx, hold = order[n_hold:], x_all[order[:n_hold]]
        self.noise = (torch.rand((1, *x_all.shape[1:]), generator=gen) * 255).to(device)
        torch.manual_seed(self.seed)
        self.generator = ResnetGenerator(self.ngf, init=self.init).to(device)
        optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=(0.5, 0.999))
        # Under torchrun: DDP over the generator, each rank its part of every batch and of the held-out images.
        net = data_parallel(self.generator, device)
        mine = block(hold.shape[0])  # all of them on one process
        hold = hold[mine.start : mine.stop]
        best_fr, best_state = -1.0, None
        with frozen(model):
            clean_hold = self._predict(model, hold)
            for epoch in range(self.epochs):
                self._fit_epoch(model, net, x_all, fit_idx, optimizer, gen, epoch)
                fr = self._holdout_fooling_ratio(model, hold, clean_hold)
                saturated = saturation(self._generate())
                self.history.append({"epoch": epoch + 1, "holdout_fooling_ratio": fr, "saturation": saturated})
                if self.on_epoch is not None:
                    self.on_epoch(self.history[-1])
                log.info(
                    "gap epoch %d/%d: held-out fooling ratio %.4f, saturation %.3f",
                    epoch + 1,
                    self.epochs,
                    fr,
                    saturated,
                )
                if fr > best_fr:
                    best_fr = fr
                    best_state = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}
                    self.perturbation = self._current_perturbation()
        assert best_state is not None
        self.generator.load_state_dict(best_state)
        broadcast_state(self.generator)  # every rank applies exactly the generator rank 0 saves
        return self

    def _fit_epoch(
        self,
        model: nn.Module,
        net: nn.Module,
        x_all: torch.Tensor,
        fit_idx: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        gen: torch.Generator,
        epoch: int,
    ) -> None:
        assert self.generator is not None and self.noise is not None
        device = self.noise.device
        self.generator.train()
        order = fit_idx[torch.randperm(fit_idx.numel(), generator=gen)]
        steps = math.ceil(order.numel() / self.batch_size)
        if self.max_iter is not None:
            steps = min(steps, self.max_iter)
        bar = tqdm(range(steps), desc=f"gap epoch {epoch + 1}/{self.epochs}", leave=False, disable=not self.progress)
        world = world_size()
        for step in bar:
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            part = block(batch.numel())  # all of it on one process
            x = x_all[batch[part.start : part.stop]].to(device)
            with torch.no_grad():
                clean = logits_of(model, x)
            # least-likely: toward each clean image's least likely class; untargeted: away from its prediction
            target, sign = (clean.argmin(1), 1.0) if self.loss == "least-likely" else (clean.argmax(1), -1.0)
            # z is one fixed pattern: G(z) once equals the reference's z tiled over the batch (BN sees the same stats).
            u = scale_to_budget(net(self.noise), self.eps)
            logits = logits_of(model, (x + u).clamp(0, 1))
            mean = global_batch_mean(partial(F.cross_entropy, logits, target), batch.numel())
            # ∇ log(mean CE of the global batch) = ∇ mean / mean: each rank divides by the global mean's value
            loss = sign * (torch.log(mean) if world == 1 else mean / (all_sum(mean.detach()) / world))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()

    @torch.no_grad()
    def _generate(self) -> torch.Tensor:
        """G(z) with the generator in eval mode (1×3×H×W in (-1, 1)), as the perturbation is made from it."""
        assert self.generator is not None and self.noise is not None
        self.generator.eval()
        g: torch.Tensor = self.generator(self.noise)
        self.generator.train()
        return g

    def _current_perturbation(self) -> torch.Tensor:
        return scale_to_budget(self._generate(), self.eps)

    def _predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes (N, on x's device), batched on the model's device."""
        return predict(model, x, self.eval_batch_size).argmax(1)

    def _holdout_fooling_ratio(self, model: nn.Module, hold: torch.Tensor, clean: torch.Tensor) -> float:
        """Over all held-out images (each rank counts its part)."""
        u = self._current_perturbation().cpu()
        changed = (self._predict(model, (hold + u).clamp(0, 1)) != clean).sum()
        counts = all_sum(torch.stack([changed, torch.tensor(clean.numel())]).to(u.device))
        return float(counts[0]) / max(1, int(counts[1]))

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        """Apply the fitted universal perturbation; success = the prediction changed from the clean one."""
        if self.perturbation is None:
            raise AttackError("gap: not fitted; call GAP(...).fit(model, train_images) or load() a fitted one")
        check_inputs(images, labels)
        if images.shape[0] == 0:
            return empty_result(images)
        if images.shape[1:] != self.perturbation.shape[1:]:
            raise AttackError(
                f"gap: perturbation is {tuple(self.perturbation.shape[1:])}, images are "
                f"{tuple(images.shape[1:])}; fit GAP on images of this size"
            )
        adversarial = (images + self.perturbation.to(images.device)).clamp(0, 1)
        with frozen(model):
            success = self._predict(model, adversarial) != self._predict(model, images)
        return AttackResult(adversarial, success.to(images.device))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The fitted state as tensors (U, z, the generator's weights) and metadata; the pipeline saves it."""
        if self.perturbation is None or self.generator is None or self.noise is None:
            raise AttackError("gap: nothing to save; fit first")
        tensors = {
            "perturbation": self.perturbation,
            "noise": self.noise,
            **{f"generator.{k}": v for k, v in self.generator.state_dict().items()},
        }
        return tensors, {"eps": repr(self.eps), "ngf": str(self.ngf), "history": json.dumps(self.history)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> GAP:
        try:
            # the generator's width from its first conv's weights (ngf×3×7×7), never from a number in the metadata:
            # what is allocated is then bounded by what the file holds
            self.ngf = int(tensors["generator.net.1.weight"].shape[0])
            self.eps = float(metadata.get("eps", self.eps))
            if not 0 < self.eps <= 1:
                raise ValueError(f"eps {self.eps!r} outside (0, 1]")
            self.perturbation, self.noise = tensors["perturbation"], tensors["noise"]
            self.history = list(json.loads(metadata.get("history", "[]")))  # none in states saved before it
            self.generator = ResnetGenerator(self.ngf)
            prefix = "generator."
            self.generator.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise AttackError(f"gap: not a fitted GAP state ({exc}); fit GAP again") from exc
        return self
