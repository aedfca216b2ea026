"""Run by `torchrun --nproc-per-node 2` in test_distributed: one DDP training step and one sharded attack, written
to the folder given as the first argument. Not a test module itself."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from advretrain.advset import craft_adversarial_set
from advretrain.attacks import GAP, DeepFool
from advretrain.checkpoint import train_resumable
from advretrain.config import TrainConfig
from advretrain.data import ImageDataset
from advretrain.models import build_model
from advretrain.runtime.distributed import init, rank, shutdown
from advretrain.runtime.io import save_state

ONE_STEP = TrainConfig(epochs=1, batch_size=16, lr=0.1, crop_padding=0, flip=False, channels_last=False)


def data() -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=gen, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(16) % 4, ["a", "b", "c", "d"])


def main(out: Path) -> None:
    device = init(torch.device("cpu"))
    torch.manual_seed(0)
    train_resumable(build_model("small", 4, 16), data(), ONE_STEP, device, out / "step", progress=False)
    torch.manual_seed(1)
    victim = build_model("small", 4, 16).eval()
    images = torch.rand(37, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(37) % 4
    craft_adversarial_set(DeepFool(steps=10), victim, images, labels, out / "set", {}, shard_size=5)
    gap = fit_gap(victim)
    if rank() == 0:
        save_state(out / "gap.safetensors", gap)
    shutdown()


def fit_gap(victim: torch.nn.Module) -> GAP:
    images = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return GAP(epochs=2, batch_size=8, holdout=8, ngf=8).fit(victim, images)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
