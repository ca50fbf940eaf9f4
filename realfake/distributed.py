"""Where this process stands in a distributed run (torchrun), and joining its process group.

One rule for the whole library: the process group while one is initialised, else torchrun's environment, else a
single process. torchrun sets ``RANK`` and ``WORLD_SIZE`` for every process it starts; DataLoader workers inherit
that environment, but not an initialised group when they are spawned, and the environment outlives the group a
training call ends. Both variables are required: one without the other is not a torchrun launch and reads as a
single process, never as rank 0 of a world whose other ranks nobody started.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "join_process_group", "process_rank"]

log = logging.getLogger(__name__)


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the process group's while one is initialised, else torchrun's ``RANK``
    and ``WORLD_SIZE`` (both set, world above 1), else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a distributed run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this call started the process group, so it ends it


def join_process_group(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the run torchrun started (env ``WORLD_SIZE`` > 1), or one a caller already initialised.

    Each process trains on its own GPU (``cuda:LOCAL_RANK``) with NCCL, or on the CPU with gloo. A group this call
    initialised is marked ``owned``: the caller ends it (``dist.destroy_process_group()``).
    """
    if not dist.is_available():
        return Ranks(), device
    owned = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks(), device
        owned = True  # init_process_group (env://) reads RANK and the rendezvous, and names what is missing
    if device.type == "cuda":  # one GPU per process, whatever index the config named
        rank = process_rank()[0]
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(device)
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), owned)
    if ranks.world > 1:
        log.info("training as rank %d of %d on %s (%s)", ranks.rank, ranks.world, device, dist.get_backend())
    return ranks, device
