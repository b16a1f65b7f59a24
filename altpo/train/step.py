"""One optimizer step over packed micro-batches: backbone, fused loss, backward, update.

The model's backbone runs each packed row to its last hidden states;
:func:`altpo_kernels.unlearning_loss` turns them and the lm_head weight into the method's loss
without materialising logits. Normalisers are
those of the whole step (``num_pairs`` forget pairs and ``num_retain_tokens`` retain answer tokens
over all micro-batches and all ranks), so summing micro-batch gradients gives the step's gradient
exactly, whatever the packing.

Public pieces (the trainer, the reference cache, evaluation and the step benchmark use them):
:func:`last_hidden_states`, :class:`PackedLoss`, :func:`forward_backward`,
:func:`sequence_logprobs` and :func:`altpo_step`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from altpo_kernels import linear_logprobs, unlearning_loss
# backbone and output_weight are re-exported: the trainer finds the head where every caller does
from altpo_kernels.hf import backbone, lm_head, output_weight  # noqa: F401
from altpo_kernels.methods import DEFAULT_METHOD, get_method
from altpo_kernels.unlearning_loss import UnlearningLossOutput

from altpo.model.packed_attention import packed_attention_kwargs
from altpo.train.sequence_sums import sequence_sums
from altpo.data.packing import (
    MicroBatch,
    PackUnit,
    num_loss_tokens,
    pack_micro_batches,
    sequence_units,
    with_key_mask,
)


def last_hidden_states(model, mb: MicroBatch) -> torch.Tensor:
    """[T, H] last hidden states of a packed micro-batch (packed attention must be enabled),
    ready for :func:`output_weight`: times the model's logit scale, if its config has one."""
    head = lm_head(model)
    kwargs = packed_attention_kwargs(mb.seq_lens, mb.input_ids.device)
    if mb.key_mask is not None:
        kwargs["packed_key_mask"] = mb.key_mask
    out = head.backbone(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], **kwargs)
    return head.scale_hidden(out.last_hidden_state[0])


class PackedLoss(nn.Module):
    """The model plus its method's loss: ``forward(micro_batch, num_forget, num_retain_tokens)``.

    One module for the whole computation so that torch's DistributedDataParallel (and FSDP) can
    wrap it: its forward runs the backbone and the fused loss (which uses the lm_head weight), and
    every parameter gets its gradient in the backward of that output. ``method`` is a registered
    name, a ``file.py:NAME`` spec or an :class:`altpo_kernels.Method`; its record says which
    micro-batch fields the loss reads. ``num_forget`` is the step's forget terms (pairs or forget
    rows); a method normalised by forget tokens reads :attr:`num_forget_tokens`, set before each
    step. The output speaks both vocabularies (``chosen_logps`` = ``win_logps``, ...).
    """

    def __init__(self, model, method=DEFAULT_METHOD, *, hparams: dict | None = None, beta=None,
                 alpha=None, gamma=None, loss_backend: str = "auto"):
        super().__init__()
        self.model = model
        self.spec = get_method(method)
        self.method = self.spec.name
        named = {k: v for k, v in dict(beta=beta, alpha=alpha, gamma=gamma).items() if v is not None}
        self.hparams = self.spec.hparams(**{**(hparams or {}), **named})
        self.loss_backend = loss_backend
        self.num_forget_tokens = 1.0

    def forward(self, mb: MicroBatch, num_pairs: float, num_retain_tokens: float) -> UnlearningLossOutput:
        spec = self.spec
        hidden = last_hidden_states(self.model, mb)
        kw = dict(forget_seqs=mb.forget_seqs, retain_seqs=mb.retain_seqs,
                  num_retain_tokens=max(float(num_retain_tokens), 1.0))
        if spec.pairs:
            kw["chosen_seqs"] = mb.chosen_seqs
        if spec.uses_reference:
            kw["ref_forget_logps"] = mb.ref_forget_logps
            if spec.pairs:
                kw["ref_chosen_logps"] = mb.ref_chosen_logps
        if spec.normaliser == "forget_tokens":
            kw["num_forget_tokens"] = max(float(self.num_forget_tokens), 1.0)
        else:
            kw["num_forget"] = max(float(num_pairs), 1.0)
        return unlearning_loss(hidden, output_weight(self.model), mb.labels, mb.seq_ids, method=spec,
                               settings=self.hparams, backend=self.loss_backend, **kw)


#: the name AltPO-only callers used (the same class; ``method`` defaults to altpo)
PackedAltPOLoss = PackedLoss


@dataclass
class StepStats:
    """What one rank's share of a step computed (loss parts under the step's normalisers)."""

    loss: float
    forget_loss: float
    retain_loss: float
    delta_sum: float
    chosen_logp_sum: float
    forget_logp_sum: float
    num_pairs: int
    num_tokens: int
    num_sequences: int
    num_micro_batches: int
    grad_norm: float | None = None
    stop_requested: bool = False  # (set by the step runner) any process was asked to stop

    def as_tensor(self, device) -> torch.Tensor:
        """The summable fields as one float64 vector (for one all-reduce across ranks)."""
        return torch.tensor([self.loss, self.forget_loss, self.retain_loss, self.delta_sum,
                             self.chosen_logp_sum, self.forget_logp_sum, self.num_pairs,
                             self.num_tokens, self.num_sequences, self.num_micro_batches],
                            dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, grad_norm=None) -> "StepStats":
        v = t.tolist()
        return cls(*v[:6], *(int(x) for x in v[6:]), grad_norm=grad_norm)


class StepStatsSum:
    """Adds micro-batch loss outputs up into one :class:`StepStats`, with no host sync per add."""

    def __init__(self, device):
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.tokens = self.sequences = self.pairs = self.micro_batches = 0

    def add(self, out, mb: MicroBatch) -> None:
        parts = [out.loss.detach(), out.forget_loss.detach(), out.retain_loss.detach(),
                 out.score.sum(), out.chosen_logps.sum(), out.forget_logps.sum()]
        self.sums += torch.stack([p.double() for p in parts]).to(self.sums.device)
        self.tokens += mb.num_tokens
        self.sequences += len(mb.seq_lens)
        self.pairs += mb.num_pairs
        self.micro_batches += 1

    def result(self) -> StepStats:
        v = self.sums.tolist()
        return StepStats(v[0], v[1], v[2], v[3], v[4], v[5], self.pairs, self.tokens,
                         self.sequences, self.micro_batches)


def forward_backward(loss_module: nn.Module, micro_batches: Sequence[MicroBatch], *,
                     num_pairs: float, num_retain_tokens: float, loss_scale: float = 1.0,
                     no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                     device=None, before_forward: Callable[[MicroBatch], MicroBatch] | None = None,
                     forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                     ) -> StepStats:
    """Forward and backward of every micro-batch; gradients accumulate in the parameters.

    ``loss_module`` is a :class:`PackedLoss` (or DDP around one). ``loss_scale`` multiplies
    each backward (DDP averages gradients over ranks; the step-level normalisers want their sum,
    so the trainer passes the world size). ``no_sync`` is DDP's ``no_sync``: all but the last
    micro-batch skip the gradient all-reduce. ``before_forward`` may rewrite a micro-batch on
    the device (the resident reference fills in its log-probs there). ``forward_context`` wraps
    each forward (not the backward), e.g. to park saved activations in CPU memory.
    """
    return forward_backward_each(
        loss_module, [(mb, num_pairs, num_retain_tokens) for mb in micro_batches],
        loss_scale=loss_scale, no_sync=no_sync, device=device, before_forward=before_forward,
        forward_context=forward_context)


def forward_backward_each(loss_module: nn.Module,
                          items: Sequence[tuple[MicroBatch, float, float]], *, loss_scale: float = 1.0,
                          no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                          device=None, before_forward: Callable[[MicroBatch], MicroBatch] | None = None,
                          forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                          ) -> StepStats:
    """:func:`forward_backward` with normalisers of its own for each micro-batch:
    ``items`` are ``(micro_batch, num_pairs, num_retain_tokens)``."""
    totals = StepStatsSum(device)
    for i, (mb, num_pairs, num_retain_tokens) in enumerate(items):
        if device is not None:
            mb = mb.to(device)
        if before_forward is not None:
            mb = before_forward(mb)
        last = i == len(items) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with forward_context() if forward_context is not None else contextlib.nullcontext():
                out = loss_module(mb, num_pairs, num_retain_tokens)
            (out.loss * loss_scale).backward()
        totals.add(out, mb)
    return totals.result()


@torch.no_grad()
def sequence_logprobs(model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                      tokens_per_microbatch: int, loss_backend: str = "auto", device=None,
                      progress: Callable[[int], None] | None = None,
                      masked_key_id: int | None = None) -> torch.Tensor:
    """Summed answer-token log-probs of each ``(input_ids, labels)`` sequence, fp32 [S] on the CPU.

    Sequences are packed (packed attention must be enabled on ``model``); log-probs come from
    ``linear_logprobs`` on the last hidden states, so no [tokens, vocab] logits are made.
    ``progress(n)`` is called with the number of sequences done after each micro-batch.
    ``masked_key_id``: a token id hidden as an attention key (:func:`~altpo.data.packing.with_key_mask`).
    """
    if device is None:
        device = output_weight(model).device
    out = torch.zeros(len(sequences), dtype=torch.float32)
    weight = output_weight(model)
    for mb in pack_micro_batches(sequence_units(sequences), tokens_per_microbatch):
        mb = with_key_mask(mb, masked_key_id).to(device)
        hidden = last_hidden_states(model, mb)
        token_logp = linear_logprobs(hidden, weight, mb.labels, backend=loss_backend)
        per_seq = sequence_sums(token_logp, mb.seq_ids, len(mb.seq_lens))  # float64 accumulation
        keys = torch.tensor([u.key for u in mb.units], dtype=torch.long)
        out[keys] = per_seq[torch.tensor(mb.unit_offsets, device=device)].cpu()
        if progress is not None:
            progress(len(mb.units))
    return out


def step_normalisers(units: Sequence[PackUnit]) -> tuple[int, int]:
    """``(num_pairs, num_retain_tokens)`` of the units of a whole step (one process)."""
    pairs = sum(len(u.pairs) for u in units)
    retain = sum(num_loss_tokens(u.sequences[r][1]) for u in units for r in u.retain)
    return pairs, retain


def altpo_step(loss_module: PackedLoss, optimizer, units: Sequence[PackUnit], *,
               tokens_per_microbatch: int, lr: float, max_grad_norm: float | None = 1.0,
               device=None) -> StepStats:
    """One whole single-process optimizer step: pack, forward/backward, clip, update.

    ``optimizer`` is an :class:`altpo.train.master_weights.MixedPrecisionAdamW` over the model's
    parameters. This is what the trainer does per step (minus data-parallel plumbing), in one call
    for benchmarks.
    """
    num_pairs, num_retain_tokens = step_normalisers(units)
    micro_batches = pack_micro_batches(units, tokens_per_microbatch)
    stats = forward_backward(loss_module, micro_batches, num_pairs=num_pairs,
                             num_retain_tokens=num_retain_tokens, device=device)
    stats.grad_norm = optimizer.step(lr, max_grad_norm)
    return stats
