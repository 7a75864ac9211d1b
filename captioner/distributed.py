"""Processes and devices for training: a world of one process, or the process group torchrun
describes in the environment (DistributedDataParallel: NCCL on GPUs, gloo on CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False     # this process created the process group, so it closes it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """The same answer on every rank: is flag true on all of them?"""
        if self.size == 1:
            return flag
        flags = [None] * self.size
        dist.all_gather_object(flags, bool(flag))
        return all(flags)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def init_world(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, ...)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns_group = not dist.is_initialized()
    if owns_group and device.type == "cuda":
        # One GPU per process; NCCL's collectives (barrier, all_gather_object) use the current one.
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    elif owns_group:
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, owns_group)


def rank_device(device: torch.device, world: World) -> torch.device:
    """Under torchrun every process drives the GPU of its local rank."""
    if device.type == "cuda" and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return device
