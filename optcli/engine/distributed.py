"""Data-parallel training under torchrun: the process group from torchrun's environment, each rank's shard
of a batch, and the reductions that make metrics global. Outside torchrun everything here is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from optcli.errors import UserError

COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a rank stuck this long in a collective ends the job instead of hanging


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        return torch.tensor_split(t, self.world)[self.rank] if self.enabled else t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t


SINGLE = Dist()


def from_env() -> Dist:
    """The rank and world size torchrun sets; one process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("torchrun: RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    return Dist(rank, world, local)


def init(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU); on CUDA each rank takes the GPU of its local rank."""
    if not d.enabled:
        return device
    if device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun: local rank {d.local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return device


def shutdown(d: Dist) -> None:
    if d.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
