"""Which forget pairs and retain rows make up optimizer step ``s``, and which rank computes which.

Every choice is a pure function of ``(seed, step)``: there is no sampler state to save, a resumed
run picks up exactly where the interrupted one stopped, and the global batch is the same for any
number of data-parallel processes (so 2 processes reach what 1 process reaches).

- Forget pairs: each epoch is a fresh permutation of all (alternate, forget answer) pairs, keyed by
  ``(seed, epoch)``; step ``s`` of the epoch takes the next ``batch_size`` of them. The tail that
  does not fill a step is dropped for that epoch (the next permutation covers it), so an epoch is
  ``num_pairs // batch_size`` steps: forget10 x 5 alternates with batch 32 gives 62 steps.
- Retain rows: ``batch_size`` rows drawn uniformly with replacement, keyed by ``(seed, step)``,
  one per forget pair as open-unlearning pairs them. Rank ``r`` of ``W`` takes its own slots of
  that draw, so no two ranks repeat each other's draw (the defect of seeding every rank alike).
- Ranks: the step's pairs are ordered by forget question before being cut into ``W`` contiguous
  shares, so the alternates of one question usually meet their forget answer on one rank and the
  answer is computed once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import torch


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for one named random stream, e.g. ``derive_seed(0, "retain", 17)``."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rank_share(total: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``total`` items (shares differ by at most one)."""
    return slice(rank * total // world, (rank + 1) * total // world)


@dataclass
class StepRows:
    """The rows of one step: this rank's share, plus what the step's normalisers need."""

    step: int
    epoch: int
    pairs: list[int]
    retain: list[int]
    step_pairs: list[int]
    step_retain: list[int]


class StepSampler:
    """Deterministic step contents for ``num_pairs`` forget pairs and ``num_retain`` retain rows."""

    def __init__(self, num_pairs: int, num_retain: int, batch_size: int, seed: int,
                 pair_question: list[int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_pairs < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_pairs} forget pairs")
        self.num_pairs, self.num_retain = num_pairs, num_retain
        self.batch_size, self.seed = batch_size, seed
        self.pair_question = pair_question
        self.steps_per_epoch = num_pairs // batch_size
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "forget", epoch))
        return torch.randperm(self.num_pairs, generator=g).tolist()

    def rows(self, step: int, rank: int = 0, world: int = 1) -> StepRows:
        """Step ``step``'s rows (0-based optimizer step) for ``rank`` of ``world`` processes."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        step_pairs = self._permutation(epoch)[start:start + self.batch_size]
        if self.pair_question is not None:
            step_pairs = sorted(step_pairs, key=lambda p: (self.pair_question[p], p))
        if self.num_retain:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "retain", step))
            step_retain = torch.randint(self.num_retain, (self.batch_size,), generator=g).tolist()
        else:
            step_retain = []
        share = rank_share(self.batch_size, rank, world)
        return StepRows(step, epoch, step_pairs[share], step_retain[share], step_pairs, step_retain)
