"""One optimizer step of a run, start to end: the step runner, chosen once per run.

A runner turns a step's rows into an update: it packs this process's rows into micro-batches,
runs forward and backward (the reference filling each micro-batch where it is resident), sums the
step's statistics over the processes, refuses a non-finite loss or gradient norm, and updates.
There are three:

- :class:`PlainSteps`: forward/backward of every micro-batch, then ``optimizer.step``;
- :class:`InBackwardSteps`: ``--optimizer-in-backward``, the update inside backward (one process);
- :class:`OpenUnlearningSteps`: ``--numerics open-unlearning``, the step's loader groups packed
  each on its own with their own normalisers (:mod:`altpo.train.numerics`).
"""

from __future__ import annotations

import math

from altpo.data.packing import num_loss_tokens, pack_micro_batches, retain_units
from altpo.errors import UserError
from altpo.train.master_weights import NonFiniteGradientError
from altpo.train.methods import prepare_step, set_step_normaliser
from altpo.train.numerics import check_memory, grouped_forward_backward, grouped_micro_batches
from altpo.train.optimizer_in_backward import optimizer_step_in_backward
from altpo.train.report import NonFiniteLossError, non_finite_message
from altpo.train.step import StepStats, forward_backward


def choose_step_runner(config, memory, dist) -> type["StepRunner"]:
    """The runner class of this run (refusing settings it cannot run); made once the optimizer is."""
    if config.numerics == "open-unlearning":
        check_memory(memory.optimizer_in_backward)
        return OpenUnlearningSteps
    if memory.optimizer_in_backward:
        if dist.world > 1:
            raise UserError("--optimizer-in-backward on does not work with several processes: DDP "
                            "all-reduces gradients in one backward of the whole model, while the "
                            "update in backward needs each layer's gradient reduced before its "
                            "update; use --optimizer-in-backward off under torchrun")
        return InBackwardSteps
    return PlainSteps


class StepRunner:
    """``run(step, rows, lr, stop) -> StepStats``: one whole optimizer step.

    ``modules`` is the strategy's :class:`~altpo.train.parallel.LossModules`, ``reference`` the
    run's :class:`~altpo.train.reference_cache.StepReference`, ``checkpoints`` the run's
    :class:`~altpo.train.checkpoint.Checkpoints` (a non-finite step's message names the last one).
    ``stop`` is the run's stop flag (:func:`~altpo.train.signals.stop_signals`), read once the
    step's backward is done. The returned statistics are the step's totals over all processes,
    with ``grad_norm`` and ``stop_requested`` (any process was asked to stop) set.
    """

    def __init__(self, config, data, dist, memory, modules, optimizer, reference, checkpoints):
        self.config, self.data, self.dist = config, data, dist
        self.modules, self.optimizer, self.reference = modules, optimizer, reference
        self.checkpoints = checkpoints
        self.budget = memory.tokens_per_microbatch
        self.forward_context = memory.forward_context(dist.device)

    def run(self, step: int, rows, lr: float, stop=None) -> StepStats:
        raise NotImplementedError

    # the pieces every runner shares

    def pass_options(self) -> dict:
        """How each micro-batch's forward runs: on this device, the resident reference filling
        its log-probs first, inside the memory settings' forward context."""
        return dict(device=self.dist.device, before_forward=self.reference.fill,
                    forward_context=self.forward_context)

    def step_micro_batches(self, rows) -> list:
        """This process's rows of the step, packed: forget units (with the cached reference),
        and the retain rows when the retain term counts (with alpha 0 they would cost compute for
        nothing)."""
        units = prepare_step(self.modules.loss, self.data, self.config.method, rows,
                             self.reference.logprobs)
        if self.config.alpha > 0:
            units += retain_units(self.data, rows.retain)
        return pack_micro_batches(units, self.budget)

    def step_retain_tokens(self, rows) -> int:
        """Retain answer tokens of the whole step (all processes): the retain term's normaliser."""
        if self.config.alpha <= 0:
            return 0
        return sum(num_loss_tokens(self.data.retain[r].labels) for r in rows.step_retain)

    def non_finite(self, step: int, stats: StepStats, norm: float) -> NonFiniteLossError:
        return NonFiniteLossError(non_finite_message(step + 1, stats, norm, self.checkpoints.last))

    def reduce_and_update(self, step: int, stats: StepStats, lr: float, stop) -> StepStats:
        """The step's totals over all processes, then (when the loss is finite) the update."""
        stats, stop_requested = self.dist.sum_stats(stats, _requested(stop))
        stats.stop_requested = stop_requested
        try:
            if not math.isfinite(stats.loss):
                self.optimizer.zero_grad()
                raise NonFiniteGradientError(float("nan"))
            stats.grad_norm = self.optimizer.step(lr, self.config.max_grad_norm)
        except NonFiniteGradientError as err:
            raise self.non_finite(step, stats, err.norm) from None
        return stats


class PlainSteps(StepRunner):
    """Forward/backward of every micro-batch under the step's normalisers, then the update."""

    def run(self, step: int, rows, lr: float, stop=None) -> StepStats:
        stats = forward_backward(
            self.modules.step, self.step_micro_batches(rows), num_pairs=len(rows.step_pairs),
            num_retain_tokens=self.step_retain_tokens(rows), loss_scale=float(self.dist.world),
            no_sync=self.modules.no_sync, **self.pass_options())
        return self.reduce_and_update(step, stats, lr, stop)


class InBackwardSteps(StepRunner):
    """The update inside backward, layer by layer (one process: checked when chosen)."""

    def run(self, step: int, rows, lr: float, stop=None) -> StepStats:
        try:
            stats = optimizer_step_in_backward(
                self.modules.loss, self.optimizer, self.step_micro_batches(rows),
                num_pairs=len(rows.step_pairs), num_retain_tokens=self.step_retain_tokens(rows),
                lr=lr, max_grad_norm=self.config.max_grad_norm, **self.pass_options())
        except NonFiniteGradientError as err:
            raise self.non_finite(step, err.stats, err.norm) from None
        stats.stop_requested = _requested(stop)
        return stats


class OpenUnlearningSteps(StepRunner):
    """open-unlearning's step: pairs in the loader's order, each loader group packed on its own
    with the group's normalisers (:func:`~altpo.train.numerics.grouped_micro_batches`)."""

    def run(self, step: int, rows, lr: float, stop=None) -> StepStats:
        config, ref = self.config, self.reference.logprobs
        set_step_normaliser(self.modules.loss, self.data, config.method, rows)
        items = grouped_micro_batches(
            self.data, rows.pairs, rows.retain, per_device_batch_size=config.per_device_batch_size,
            num_groups=config.batch_size // config.per_device_batch_size,
            tokens_per_microbatch=self.budget, alpha=config.alpha, method=config.method,
            ref_alternates=ref.alternates if ref is not None else None,
            ref_forget=ref.forget if ref is not None else None)
        stats = grouped_forward_backward(self.modules.step, items, loss_scale=float(self.dist.world),
                                         no_sync=self.modules.no_sync, **self.pass_options())
        return self.reduce_and_update(step, stats, lr, stop)


def _requested(stop) -> bool:
    return bool(stop is not None and stop.requested)
