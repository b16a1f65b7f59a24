"""``--numerics open-unlearning``: the step normalisation of open-unlearning's HF-Trainer AltPO.

open-unlearning's data loader hands out micro-batches of ``per_device_batch_size`` (default 8)
items, each a forget pair with one randomly drawn retain row; each micro-batch's loss is

    L_g = gamma * -(2/beta) * mean_{pairs in g} log sigmoid(beta * Delta)
        + alpha * (mean NLL over the answer tokens of the retain rows in g)

and the trainer sums ``L_g / G`` over the G micro-batches of a step (gradient accumulation
steps x processes). The forget term equals this project's step mean whenever every micro-batch
holds the same number of pairs (required below); the retain term differs, because each
micro-batch's token mean weighs its own token count.

Here the same grouping is rebuilt from the step's rows: pairs in the loader's order (not sorted
by question), slot j of the step pairing forget pair j with retain draw j, and slots cut into
groups of ``per_device_batch_size``. Each group is packed on its own (packing, the cached
reference and exact updates stay on) and its micro-batches get the group's normalisers,
``(G * pairs in g, G * retain tokens in g)``, so the summed gradient is open-unlearning's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from altpo_kernels.methods import DEFAULT_METHOD

from altpo.data.packing import MicroBatch, num_loss_tokens, pack_micro_batches, retain_units, with_key_mask
from altpo.errors import UserError
from altpo.train.methods import method_units
from altpo.train.step import StepStats, forward_backward_each

NUMERICS = ("altpo-fast", "open-unlearning")


def check_grouping(batch_size: int, per_device_batch_size: int, world: int) -> None:
    """open-unlearning's effective batch is per-device batch x accumulation steps x processes."""
    if per_device_batch_size < 1:
        raise UserError(f"--per-device-batch-size must be at least 1, got {per_device_batch_size}")
    if batch_size % (per_device_batch_size * world):
        raise UserError(
            f"--numerics open-unlearning: --batch-size {batch_size} must be a multiple of "
            f"--per-device-batch-size {per_device_batch_size} x {world} process(es), as open-unlearning's "
            f"effective batch (per-device batch x accumulation steps x processes) is; e.g. --batch-size "
            f"{per_device_batch_size * world * max(1, round(batch_size / (per_device_batch_size * world)))}")


def open_unlearning_masked_id(tokenizer) -> int | None:
    """The token open-unlearning's training collator hides from attention inside sequences.

    Its collator pads with the tokenizer's pad token and sets ``attention_mask = input_ids !=
    pad_token_id``; for a tokenizer without a pad token (Llama-3) it sets pad = eos, so every
    in-sequence eos (``<|eot_id|>`` closing each turn and the answer) is masked as a key. With a
    pad token of its own (not the eos) no in-sequence token is masked: None."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None or (pad is not None and pad != eos):
        return None
    return int(eos)


def attention_for_masked_keys(attention: str) -> str:
    """The packed-attention backend when keys are hidden: only the segment SDPA path can."""
    if attention in ("auto", "sdpa"):
        return "sdpa"
    raise UserError(f"--attention {attention} cannot hide single keys, which --numerics open-unlearning "
                    "needs with pad = eos (open-unlearning masks every in-sequence eos token in "
                    "attention); use --attention sdpa or auto")


def check_memory(optimizer_in_backward: bool) -> None:
    """The update in backward takes one normaliser for the whole step; the groups have their own."""
    if optimizer_in_backward:
        raise UserError("--numerics open-unlearning needs --optimizer-in-backward off (the update in "
                        "backward takes one normaliser for the whole step)")


@dataclass
class GroupedMicroBatch:
    """A packed micro-batch and the normalisers of the loader group it belongs to."""

    micro_batch: MicroBatch
    num_pairs: float
    num_retain_tokens: float


def loader_groups(pairs: Sequence[int], retain: Sequence[int], per_device_batch_size: int
                  ) -> list[tuple[list[int], list[int]]]:
    """``(pair ids, retain ids)`` per loader micro-batch: consecutive slots of this rank's share."""
    if retain and len(retain) != len(pairs):
        raise ValueError(f"{len(pairs)} forget pairs but {len(retain)} retain rows; each slot pairs one of each")
    n = per_device_batch_size
    return [(list(pairs[s:s + n]), list(retain[s:s + n]) if retain else [])
            for s in range(0, len(pairs), n)]


def grouped_micro_batches(data, pairs: Sequence[int], retain: Sequence[int], *, per_device_batch_size: int,
                          num_groups: int, tokens_per_microbatch: int, alpha: float,
                          ref_alternates=None, ref_forget=None, method: str = DEFAULT_METHOD,
                          ) -> list[GroupedMicroBatch]:
    """This rank's micro-batches, each loader group packed on its own, with its normalisers.

    ``num_groups`` is G, the step's loader micro-batches over all processes; ``ref_alternates``
    [P] and ``ref_forget`` [Q] are the cached reference log-probs (per pair, per forget question).
    """
    out = []
    for group_pairs, group_retain in loader_groups(pairs, retain, per_device_batch_size):
        units = method_units(data, method, group_pairs, ref_alternates, ref_forget)
        retain_tokens = 0
        if alpha > 0 and group_retain:
            units += retain_units(data, group_retain)
            retain_tokens = sum(num_loss_tokens(data.retain[r].labels) for r in group_retain)
        for mb in pack_micro_batches(units, tokens_per_microbatch):
            mb = with_key_mask(mb, getattr(data, "masked_key_id", None))
            out.append(GroupedMicroBatch(mb, float(num_groups * len(group_pairs)),
                                         float(num_groups * max(retain_tokens, 1))))
    return out


def grouped_forward_backward(loss_module: nn.Module, items: Sequence[GroupedMicroBatch], *,
                             loss_scale: float = 1.0,
                             no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                             device=None, before_forward: Callable[[MicroBatch], MicroBatch] | None = None,
                             forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                             ) -> StepStats:
    """:func:`altpo.train.step.forward_backward` with per-micro-batch normalisers."""
    return forward_backward_each(
        loss_module, [(i.micro_batch, i.num_pairs, i.num_retain_tokens) for i in items],
        loss_scale=loss_scale, no_sync=no_sync, device=device, before_forward=before_forward,
        forward_context=forward_context)
