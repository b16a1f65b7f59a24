"""The run's length and learning rate: steps per epoch, total and warm-up steps, and HF's linear
schedule with warm-up."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def for_run(cls, config, steps_per_epoch: int) -> "Schedule":
        """``--max-steps`` or ``--epochs`` of ``steps_per_epoch``; ``--warmup-epochs`` of warm-up."""
        total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        return cls(config.lr, steps_per_epoch, total, int(round(config.warmup_epochs * steps_per_epoch)))

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based): step 0 of a warm-up has learning rate 0."""
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr * max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))
