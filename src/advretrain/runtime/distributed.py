"""`torchrun` support: one process per device, any number of nodes, PyTorch's own process group.

Launched by torchrun (WORLD_SIZE > 1), `init` joins the group — gloo on CPUs, NCCL on GPUs — and gives each rank its
device. Training wraps the model in DistributedDataParallel; attack generation splits a set's shards into
contiguous blocks, one per rank; rank 0 alone prints bars, writes shared files (checkpoints, done markers,
results) and takes the run lock. The run directory must be on storage every rank sees.
Without torchrun every helper answers for a single process and costs nothing.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device; a single process keeps `device`."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not active():
        # Ranks meet at a barrier after each stage; one rank's share of a C&W set can take hours at paper scale.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    return device


def shutdown() -> None:
    """Leave the group together: a rank that tore its gloo pairs down while another still used them aborted
    at exit ("terminate called without an active exception") in 3 of 30 two-rank runs, 0 of 82 with the barrier."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def block(count: int, of_rank: int | None = None, ranks: int | None = None) -> range:
    """This rank's contiguous, disjoint block of `count` items (no padding, no duplicates; sizes differ by ≤ 1)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if ranks is None else ranks
    return range(count * r // w, count * (r + 1) // w)


def broadcast_state(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers. After DDP training the BatchNorm running statistics differ
    (each rank's last forward updated its own), and every rank must attack the model rank 0 saved."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (the tensor itself for one process)."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def global_batch_mean(loss: Callable[..., torch.Tensor], global_count: int) -> torch.Tensor:
    """A loss whose gradient, once DDP has averaged it over the ranks, is that of the global batch's mean.

    `loss(reduction=...)` is this rank's loss over its part of the batch, reduced by "mean" or "sum". On one
    process it is the plain mean; under torchrun, sum · world / global count (DDP divides by the world size).
    """
    world = world_size()
    return loss(reduction="mean") if world == 1 else loss(reduction="sum") * (world / global_count)


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under torchrun, `module` in DistributedDataParallel (rank 0's weights broadcast, gradients averaged in the
    backward pass); on one process, the module itself."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
