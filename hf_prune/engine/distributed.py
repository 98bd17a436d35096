"""Data-parallel calibration on ``torch.distributed``: each process takes every world-th calibration batch,
and the statistics (sums) are combined with an all-reduce. Launch with ``torchrun --nproc-per-node N`` or
``accelerate launch``; gloo on CPU, nccl on CUDA. Without a launcher everything here is a no-op."""

from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1 in the environment); False alone."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shard(items: list[T]) -> list[T]:
    """This process's share: items rank, rank + world, … (all of them without a process group)."""
    rank, world = rank_and_world()
    return items[rank::world]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (float64 sums stay float64); returned for chaining."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_int(value: int) -> int:
    return int(all_reduce_sum(torch.tensor([value], dtype=torch.float64)).item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()
