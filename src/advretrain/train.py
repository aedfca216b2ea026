"""The training loop on whole-dataset tensors held on the device: tensors in, weights and metrics out.

Each epoch draws its order and augmentation from a generator seeded by (seed, epoch), so an interrupted run that
resumes from the checkpoint of epoch k ends with exactly the weights of an uninterrupted run (on the CPU).

Under torchrun the model is wrapped in DistributedDataParallel: every rank draws the same global batch and
augmentation and trains on its contiguous part of it; the summed loss is scaled so that the averaged gradient is the
global batch's mean. BatchNorm statistics stay per rank (DDP's default; SyncBatchNorm would need GPUs).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import AdversarialTraining, TrainConfig
from .data import ImageDataset, to_float
from .errors import AdvretrainError
from .metrics import autocast, evaluate
from .models import Classifier, require_image_size
from .optim import MuonSGD
from .runtime.distributed import all_sum, block, broadcast_state, data_parallel, global_batch_mean, is_main, world_size

log = logging.getLogger(__name__)


def augment(images: torch.Tensor, padding: int, mirror: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) of a whole batch at once, and a horizontal flip of the images `mirror` marks.

    images: B×C×H×W, any dtype; mirror: B bools or None.
    """
    b, _, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(images.device)
    padded = F.pad(images, (padding,) * 4) if padding else images
    rows = dy[:, None] + torch.arange(h, device=images.device)  # B×H source rows
    cols = dx[:, None] + torch.arange(w, device=images.device)  # B×W source columns
    if mirror is not None:
        cols = torch.where(mirror.to(images.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: B×H×W×C
    return out.permute(0, 3, 1, 2)  # B×C×H×W (channels-last in memory)


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Float B×C×H×W [0,1] images resized to size×size (antialiased bilinear: a convex mix, still in [0,1])."""
    if size is None or size == images.shape[-1] == images.shape[-2]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def epoch_size(cfg: TrainConfig, epoch: int) -> int | None:
    """The image size of this epoch under progressive resizing; None: the data's own."""
    return cfg.progressive_sizes[epoch] if epoch < len(cfg.progressive_sizes) else None


def mirrors(cfg: TrainConfig, n: int, epoch: int, gen: torch.Generator) -> torch.Tensor | None:
    """Which of the n training images to flip this epoch (N bools), or None without flips.

    Alternating (airbench): each image flips in every other epoch from a seeded random start, so two epochs show
    both versions of every image where random flips repeat a quarter of them.
    """
    if not cfg.flip:
        return None
    if cfg.alternate_flip:
        start = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(cfg.seed)).bool()
        return start ^ bool(epoch % 2)
    return torch.rand(n, generator=gen) < 0.5


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)  # onecycle: linear decay to zero after the warm-up

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the trainable parameters in three groups: weights (decayed), BatchNorm's (lr × cfg.bn_lr_scale)
    and the other biases. No weight decay on 1-D parameters: decaying them only hurts (Goyal et al. 2017).
    With `optimizer: muon` the conv filters form a fourth group that Muon updates (optim.MuonSGD)."""
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.ndim == 4] if cfg.optimizer == "muon" else []
    muon_ids = {id(p) for p in filters}
    weights = [p for p in trainable if p.ndim > 1 and id(p) not in muon_ids]
    groups: list[dict[str, Any]] = [
        {"params": weights, "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if id(p) in norm], "weight_decay": 0.0, "lr": cfg.lr * cfg.bn_lr_scale},
        {"params": [p for p in trainable if p.ndim <= 1 and id(p) not in norm], "weight_decay": 0.0},
    ]
    nesterov = cfg.nesterov and cfg.momentum > 0
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)
    muon = {"params": filters, "muon": True, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "nesterov": True}
    return MuonSGD([*groups, muon], lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)


@dataclass
class TrainResult:
    model: Classifier
    history: list[dict[str, float]] = field(default_factory=list)
    test_accuracy: float | None = None
    resumed_from_epoch: int = 0


# What resumes a training after an epoch: {"epoch", "model", "optimizer", "scheduler", "history"} (state dicts).
TrainState = dict[str, Any]


def train(
    model: Classifier,
    data: ImageDataset,
    cfg: TrainConfig,
    device: torch.device,
    test: ImageDataset | None = None,
    progress: bool = True,
    compile: bool = False,
    init: bool = True,
    start: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Train `model` on `data` (tensors in, weights and per-epoch metrics out); no file is read or written.

    `start` resumes from the state `on_epoch` was given after an epoch (`checkpoint.train_resumable` keeps it on
    disk). `compile` runs the training forward through torch.compile (the weights stay the model's own). `init`
    gives a freshly built model its data-dependent initialisation (input statistics, whitening stem); turn it off
    to fine-tune trained weights.
    """
    check_recipe(model, cfg)
    if start is None and init:
        model.init_from_data(data.images)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, len(data))
    history: list[dict[str, float]] = []
    start_epoch = 0
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        history, start_epoch = start["history"], int(start["epoch"])
        log.info("resuming training from the checkpoint of epoch %d/%d", start_epoch, cfg.epochs)
    images, labels = data.images.to(device), data.labels.to(device)
    net = _parallel(model, device, compile)
    for epoch in range(start_epoch, cfg.epochs):
        history.append(_train_epoch(net, images, labels, cfg, epoch, optimizer, scheduler, progress and is_main()))
        if on_epoch is not None:
            on_epoch(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                }
            )
    broadcast_state(model)  # every rank with rank 0's weights
    # Back to the default layout: a reloaded checkpoint has it, and conv results differ in the last bits between
    # layouts, so the model in memory and the one on disk must compute the same attacks and metrics.
    model.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    result = TrainResult(model, history, resumed_from_epoch=start_epoch)
    if test is not None:
        result.test_accuracy = evaluate(model, test.images, test.labels, cfg.eval_batch_size)
    return result


def check_recipe(model: Classifier, cfg: TrainConfig) -> None:
    """Refuse a recipe the model cannot train with (images shrunk below what its poolings need)."""
    for size in cfg.progressive_sizes:
        require_image_size(model.spec.name, size, "raise train.progressive_sizes")


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX), as oneDNN sees it; said once when not."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    if not native:
        log.warning("train.amp_cpu: this CPU has no native bf16 (it would be emulated, slower); training in float32")
    return native


def training_autocast(device: torch.device, cfg: TrainConfig) -> Any:
    """The training step's precision: bf16 autocast on CUDA (`amp`), and on a CPU with native bf16 (`amp_cpu`)."""
    if device.type == "cpu" and cfg.amp_cpu and native_cpu_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return autocast(device, cfg.amp)


def _optimizer_and_schedule(
    model: nn.Module, cfg: TrainConfig, n: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    optimizer = make_optimizer(model, cfg)
    factor = lr_factor(cfg.schedule, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _parallel(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """The module the steps run: DDP under torchrun (rank 0's weights broadcast first), compiled if asked."""
    net = data_parallel(model, device)
    if compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return net


def _batch_starts(n: int, cfg: TrainConfig) -> range:
    """Where each batch starts. A trailing batch too small to give each rank two images is left out (a different
    one each epoch): BatchNorm cannot train on one image."""
    trailing = n % cfg.batch_size
    batches = range(0, n - (trailing if 0 < trailing < 2 * world_size() else 0), cfg.batch_size)
    if not batches:
        raise AdvretrainError(f"{n} training images cannot make a batch of two per process; add images")
    return batches


def _train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: bool,
) -> dict[str, float]:
    device = images.device
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # per-epoch: resumable mid-run
    order = torch.randperm(images.shape[0], generator=gen).to(device)
    flips = mirrors(cfg, images.shape[0], epoch, gen)  # N, indexed by image
    flips = flips.to(device) if flips is not None else None  # indexed by `idx` on the device: no per-step copy
    size = epoch_size(cfg, epoch)
    model.train()
    totals = torch.zeros(2, device=device)  # loss sum and correct predictions of the global batches so far
    seen = 0
    started = time.perf_counter()
    batches = _batch_starts(images.shape[0], cfg)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress, unit="batch")
    for i, start in enumerate(bar):
        idx = order[start : start + cfg.batch_size]
        mirror = flips[idx] if flips is not None else None
        x = to_float(augment(images[idx], cfg.crop_padding, mirror, gen))  # the global batch, as on one process
        x = resize(x, size)
        part = block(idx.numel())  # this rank's contiguous part of it (all of it on one process)
        x, y = x[part.start : part.stop], labels[idx][part.start : part.stop]
        if cfg.adversarial is not None:  # the reference defence: train on the batch's adversarials instead
            with training_autocast(device, cfg):
                x = adversarial_batch(unwrapped(model), x, y, cfg.adversarial, gen)
        totals += _step(model, x, y, idx.numel(), cfg, optimizer, scheduler)
        seen += idx.numel()
        if i % 25 == 0 or i == len(batches) - 1:  # sync with the device (and the other ranks) only now and then
            summed = all_sum(totals)
            mean_loss, accuracy = float(summed[0]) / seen, float(summed[1]) / seen
            if not math.isfinite(mean_loss):
                raise AdvretrainError(f"training diverged (loss {mean_loss}) in epoch {epoch + 1}; lower train.lr")
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{accuracy:.3f}")
    seconds = time.perf_counter() - started
    log.info(
        "epoch %d/%d: loss %.4f, train accuracy %.4f, %.0f images/s",
        epoch + 1,
        cfg.epochs,
        mean_loss,
        accuracy,
        seen / seconds,
    )
    # lr: the peak group's (SGD's; Muon's filters follow their own lr on the same schedule) at the epoch's end
    stats = {"epoch": epoch + 1, "loss": mean_loss, "train_accuracy": accuracy, "lr": optimizer.param_groups[0]["lr"]}
    return {**stats, "seconds": seconds, "images_per_second": seen / seconds}


def unwrapped(net: nn.Module) -> nn.Module:
    """The model inside torch.compile and DDP: an attack's extra passes must not enter DDP's gradient sync."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(net, attr, net)
        net = inner if isinstance(inner, nn.Module) else net
    return net


def adversarial_batch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: AdversarialTraining, gen: torch.Generator
) -> torch.Tensor:
    """x (N×C×H×W in [0,1]) replaced by adversarials of the model being trained: a uniform start in the eps-ball, then
    one signed step of 1.25 eps (FGSM-RS, Wong et al. 2020) or `steps` of eps/4 (PGD-AT, Madry et al. 2018), each
    projected onto the ball and [0,1]. The model stays in train mode, as both references do; `gen` seeds the start."""
    delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * adv.eps).to(x.device)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(1 if adv.method == "fgsm-rs" else adv.steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + adv.alpha * grad.sign()).clamp(-adv.eps, adv.eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    global_batch: int,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> torch.Tensor:
    """One SGD step on this rank's part of a global batch; returns (loss · images / world, correct) of the part."""
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with training_autocast(x.device, cfg):
        logits = model(x)
        cross_entropy = partial(F.cross_entropy, logits.float(), y, label_smoothing=cfg.label_smoothing)
        loss = global_batch_mean(cross_entropy, global_batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    scheduler.step()
    # summed over ranks: the global batch's loss sum
    loss_sum = loss.detach() * (global_batch / world_size())
    return torch.stack([loss_sum, (logits.argmax(1) == y).sum().to(loss_sum.dtype)])
