"""Evaluation split across the processes of a ``torchrun`` launch.

Work is dealt out in the units a single process would run (whole batches of the single-process
batching, or single rows where each row runs alone), so every unit is computed exactly as one
process computes it, and the gathered result equals the single-process result bit for bit.
Every rank ends with the whole result; only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch.distributed as tdist

T = TypeVar("T")


@dataclass(frozen=True)
class Shards:
    """This process's place among ``world`` evaluating processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_process_group(cls) -> "Shards":
        """The running ``torch.distributed`` group's rank and size (one process when none)."""
        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    def take(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's ``(index, item)`` share: items ``rank, rank + world, ...``."""
        return [(i, items[i]) for i in range(self.rank, len(items), self.world)]

    def gather(self, local: dict) -> dict:
        """The union of every rank's ``local`` dictionary (keys are disjoint across ranks)."""
        if self.world == 1:
            return dict(local)
        parts: list = [None] * self.world
        tdist.all_gather_object(parts, local)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()


def join_process_group(device) -> tuple[Shards, bool]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group when nobody has yet.

    Returns the shards and whether this call created the group (then the caller destroys it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shards(), False
    if tdist.is_initialized():
        return Shards.from_process_group(), False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    tdist.init_process_group(backend, rank=int(os.environ.get("RANK", "0")), world_size=world)
    return Shards.from_process_group(), True
