"""Several processes under ``torchrun``: the process group, this rank's device, and the few
collectives the loop needs (barrier, rank 0's decision, the step's summed statistics).

Every collective waits at most ``--dist-timeout`` seconds. When one times out, the ranks meet once
more at a gloo ``monitored_barrier``, which tells rank 0 which ranks never arrived, and the run
stops with that rank named instead of hanging for torch's default half hour.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch

from altpo.errors import UserError
from altpo.train.step import StepStats


@dataclass
class Distributed:
    rank: int
    world: int
    device: torch.device
    created_group: bool = False
    timeout_s: float = 600.0
    monitor: object = None  # a gloo group for monitored_barrier (finds the stalled rank)

    @classmethod
    def setup(cls, device_setting: str, timeout_s: float = 600.0) -> "Distributed":
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
        created, monitor = False, None
        if world > 1:
            import torch.distributed as tdist

            if not tdist.is_initialized():
                tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         rank=rank, world_size=world,
                                         timeout=timedelta(seconds=timeout_s))
                created = True
            monitor = tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, device, created, timeout_s, monitor)

    def _guarded(self, what: str, fn):
        """Run collective ``fn``; on a timeout, find and name the rank that stalled."""
        try:
            return fn()
        except RuntimeError as err:
            raise UserError(self._stall_message(what, err)) from None

    def _stall_message(self, what: str, err: BaseException) -> str:
        import torch.distributed as tdist

        head = (f"rank {self.rank} of {self.world}: {what} did not complete within --dist-timeout "
                f"{self.timeout_s:g} s")
        try:  # the ranks that are alive meet here; rank 0 learns which ones never come
            tdist.monitored_barrier(group=self.monitor, timeout=timedelta(seconds=min(self.timeout_s, 30)),
                                    wait_all_ranks=True)
        except RuntimeError as probe:
            text = str(probe).splitlines()[0] if str(probe) else ""
            found = re.search(r"Ranks? ([\d, ]+) failed", text)
            if self.rank == 0 and found:
                ranks = found.group(1).strip().rstrip(",")
                return (f"{head}: rank {ranks} stalled or died (it did not answer a check within "
                        f"{min(self.timeout_s, 30):g} s more; see its log); raise --dist-timeout if it "
                        "was only slow")
            if self.rank == 0:
                return f"{head}: {text}; a process stalled or died (see the logs of the others)"
            return f"{head}; rank 0 names the stalled rank(s) in its message"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{head} ({first}); every rank answered the check afterwards, so one was only slow"

    def stall_error(self, err: BaseException) -> UserError | None:
        """For a collective that timed out elsewhere (DDP's gradient all-reduce): the error that
        names the stalled rank; None for any other error."""
        text = str(err).lower()
        if self.world == 1 or not isinstance(err, RuntimeError) or "time" not in text:
            return None
        return UserError(self._stall_message("a collective (gradient all-reduce)", err))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            self._guarded("a barrier", lambda: tdist.barrier())

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if self.world == 1:
            return flag
        import torch.distributed as tdist

        t = torch.tensor([float(flag) if self.rank == 0 else 0.0], device=self.device)
        self._guarded("sharing rank 0's decision", lambda: tdist.all_reduce(t))
        return bool(t.item() > 0)

    def sum_stats(self, stats: StepStats, stop: bool) -> tuple[StepStats, bool]:
        """The step's totals over all ranks, and whether any rank was asked to stop."""
        if self.world == 1:
            return stats, stop
        import torch.distributed as tdist

        t = torch.cat([stats.as_tensor(self.device),
                       torch.tensor([float(stop)], dtype=torch.float64, device=self.device)])
        self._guarded("the step's statistics all-reduce", lambda: tdist.all_reduce(t))
        return StepStats.from_tensor(t[:-1].cpu()), bool(t[-1].item() > 0)

    def cleanup(self) -> None:
        if self.created_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()
