"""Several processes under ``torchrun``: the process group, this rank's device, and the few
collectives the loop needs (barrier, rank 0's decision, the step's summed statistics)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from altpo.errors import UserError
from altpo.train.step import StepStats


@dataclass
class Distributed:
    rank: int
    world: int
    device: torch.device
    created_group: bool = False

    @classmethod
    def setup(cls, device_setting: str) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_setting == "auto":
            device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(device_setting)
            except RuntimeError:
                raise UserError(f"--device {device_setting}: not a device name (cpu, cuda, cuda:N)") from None
            if device.type == "cuda":
                if not torch.cuda.is_available():
                    raise UserError(f"--device {device_setting}: no CUDA device is available; use --device cpu")
                if device.index is None:
                    device = torch.device(f"cuda:{local}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        created = False
        if world > 1:
            import torch.distributed as tdist

            if not tdist.is_initialized():
                tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         rank=rank, world_size=world)
                created = True
        return cls(rank, world, device, created)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if self.world == 1:
            return flag
        import torch.distributed as tdist

        t = torch.tensor([float(flag) if self.rank == 0 else 0.0], device=self.device)
        tdist.all_reduce(t)
        return bool(t.item() > 0)

    def sum_stats(self, stats: StepStats, stop: bool) -> tuple[StepStats, bool]:
        """The step's totals over all ranks, and whether any rank was asked to stop."""
        if self.world == 1:
            return stats, stop
        import torch.distributed as tdist

        t = torch.cat([stats.as_tensor(self.device),
                       torch.tensor([float(stop)], dtype=torch.float64, device=self.device)])
        tdist.all_reduce(t)
        return StepStats.from_tensor(t[:-1].cpu()), bool(t[-1].item() > 0)

    def cleanup(self) -> None:
        if self.created_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()
