"""Packing: a step's sequences into micro-batches of at most N tokens, without padding.

A micro-batch is one row of concatenated sequences: position ids restart at 0 for each sequence,
``seq_ids`` name each token's sequence, labels are shifted inside each sequence (the last token of
a sequence predicts nothing), and the pair / retain index vectors are local to the micro-batch, in
the form :func:`altpo_kernels.altpo_loss` takes them.

The unit of packing is a :class:`PackUnit`: sequences that must share a micro-batch. A forget
question's unit holds its forget answer once and every alternate of that question in the step, so
the forget answer is computed once per step however many of its alternates the step has, and each
pair's two log-probs meet in one loss call (the pair loss is not linear in them). A retain row is a
unit of its own. Units are placed first-fit by decreasing size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch

IGNORE_INDEX = -100
ROLE_FORGET, ROLE_ALTERNATE, ROLE_RETAIN, ROLE_OTHER = 0, 1, 2, 3
ROLE_NAMES = ("forget", "alternate", "retain", "other")


@dataclass
class PackUnit:
    """Sequences that must share one micro-batch.

    ``sequences`` are ``(input_ids, labels)`` with unshifted labels (-100 on the prompt), as
    :func:`altpo.data.tofu.encode_qa` makes them. ``pairs`` are ``(chosen, forget)`` indexes into
    ``sequences`` with their reference log-probs in ``ref_logps``; ``retain`` lists the sequences
    that get the NLL term (an index may repeat: a row drawn twice counts twice). ``key`` is free
    for the caller (e.g. the row ids) and is carried into the micro-batch.
    """

    sequences: list[tuple[Sequence[int], Sequence[int]]]
    roles: list[int]
    pairs: list[tuple[int, int]] = field(default_factory=list)
    ref_logps: list[tuple[float, float]] = field(default_factory=list)
    retain: list[int] = field(default_factory=list)
    key: object = None

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.sequences)


@dataclass
class MicroBatch:
    """One packed row and the index vectors of its loss terms (all tensors on one device)."""

    input_ids: torch.Tensor       # [T] long
    position_ids: torch.Tensor    # [T] long, restarting at 0 per sequence
    labels: torch.Tensor          # [T] long, shifted: token t predicts labels[t]
    seq_ids: torch.Tensor         # [T] long
    seq_lens: tuple[int, ...]     # per sequence, in row order
    roles: torch.Tensor           # [S] long, ROLE_* per sequence
    chosen_seqs: torch.Tensor        # [P] long
    forget_seqs: torch.Tensor       # [P] long
    retain_seqs: torch.Tensor     # [R] long
    ref_chosen_logps: torch.Tensor   # [P] fp32
    ref_forget_logps: torch.Tensor  # [P] fp32
    units: list = field(default_factory=list)            # the PackUnits, in row order
    unit_offsets: list[int] = field(default_factory=list)  # first sequence index of each unit
    # [T] bool or None: False hides that token as a key from every query of its sequence
    # (``--numerics open-unlearning`` with pad = eos: see :func:`with_key_mask`)
    key_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_seqs.shape[0])

    def to(self, device) -> "MicroBatch":
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def with_key_mask(mb: MicroBatch, masked_id: int | None) -> MicroBatch:
    """``mb`` with every token equal to ``masked_id`` hidden as an attention key (None: unchanged).

    This is what a padded batch with ``attention_mask = input_ids != pad_id`` does when pad = eos:
    the in-sequence eos tokens stay as queries and inputs but no token attends to them."""
    if masked_id is None:
        return mb
    return replace(mb, key_mask=mb.input_ids != int(masked_id))


def shifted_labels(labels: Sequence[int]) -> list[int]:
    """Labels for next-token prediction inside one sequence: position t predicts token t+1."""
    return list(labels[1:]) + [IGNORE_INDEX]


def num_loss_tokens(labels: Sequence[int]) -> int:
    """How many tokens of a sequence carry a loss once labels are shifted."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


class UnitTooLongError(ValueError):
    """A unit that must stay in one micro-batch is longer than the token budget."""

    def __init__(self, tokens: int, max_tokens: int):
        self.tokens, self.max_tokens = tokens, max_tokens
        super().__init__(
            f"a group of sequences that must share one micro-batch (a forget answer with its "
            f"alternates) has {tokens} tokens, more than the micro-batch budget of {max_tokens}"
        )


def pack_units(units: Sequence[PackUnit], max_tokens: int) -> list[list[int]]:
    """Indexes of ``units`` per micro-batch: first fit by decreasing size, deterministic."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(units)), key=lambda i: (-units[i].num_tokens, i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = units[i].num_tokens
        if n > max_tokens:
            raise UnitTooLongError(n, max_tokens)
        for b, left in enumerate(room):
            if n <= left:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


def build_micro_batch(units: Sequence[PackUnit]) -> MicroBatch:
    """Concatenate ``units`` into one packed row (on the CPU; move with ``.to(device)``)."""
    ids, pos, labels, seq_ids, lens, roles = [], [], [], [], [], []
    chosen, forget, retain, ref_chosen, ref_forget, offsets = [], [], [], [], [], []
    for unit in units:
        base = len(lens)
        offsets.append(base)
        for (seq_ids_in, seq_labels), role in zip(unit.sequences, unit.roles):
            n = len(seq_ids_in)
            if n == 0:
                raise ValueError("a packed sequence is empty")
            if len(seq_labels) != n:
                raise ValueError(f"a sequence has {n} tokens but {len(seq_labels)} labels")
            seq_ids += [len(lens)] * n
            ids += list(seq_ids_in)
            pos += range(n)
            labels += shifted_labels(seq_labels)
            lens.append(n)
            roles.append(role)
        for (c, f), (rc, rf) in zip(unit.pairs, unit.ref_logps):
            chosen.append(base + c)
            forget.append(base + f)
            ref_chosen.append(rc)
            ref_forget.append(rf)
        retain += [base + r for r in unit.retain]

    def long(x):
        return torch.tensor(x, dtype=torch.long)

    return MicroBatch(
        input_ids=long(ids), position_ids=long(pos), labels=long(labels), seq_ids=long(seq_ids),
        seq_lens=tuple(lens), roles=long(roles), chosen_seqs=long(chosen), forget_seqs=long(forget),
        retain_seqs=long(retain), ref_chosen_logps=torch.tensor(ref_chosen, dtype=torch.float32),
        ref_forget_logps=torch.tensor(ref_forget, dtype=torch.float32), units=list(units),
        unit_offsets=offsets,
    )


def pack_micro_batches(units: Sequence[PackUnit], max_tokens: int) -> list[MicroBatch]:
    """Pack ``units`` into micro-batches of at most ``max_tokens`` tokens each."""
    return [build_micro_batch([units[i] for i in b]) for b in pack_units(units, max_tokens)]


# ------------------------------------------------------------------------------------------------
# units from AltPO data


def forget_units(data, pair_ids: Sequence[int], ref_chosen_logps=None, ref_forget_logps=None
                 ) -> list[PackUnit]:
    """One unit per forget question among ``pair_ids``: its answer once, then its alternates.

    ``data`` is an :class:`altpo.data.tofu.AltPOData`; ``ref_*_logps`` are the reference log-probs
    per pair and per forget question (tensors or lists; None gives zeros, for log-prob passes).
    The unit's ``key`` is ``(question, [pair ids])``.
    """
    groups: dict[int, list[int]] = {}
    for p in pair_ids:
        groups.setdefault(data.pair_question[p], []).append(p)
    units = []
    for q, pairs in groups.items():
        answer = data.forget[q]
        seqs = [(answer.input_ids, answer.labels)]
        roles = [ROLE_FORGET]
        unit_pairs, refs = [], []
        ref_forget = 0.0 if ref_forget_logps is None else float(ref_forget_logps[q])
        for k, p in enumerate(pairs, 1):
            alt = data.alternates[p]
            seqs.append((alt.input_ids, alt.labels))
            roles.append(ROLE_ALTERNATE)
            unit_pairs.append((k, 0))
            refs.append((0.0 if ref_chosen_logps is None else float(ref_chosen_logps[p]), ref_forget))
        units.append(PackUnit(seqs, roles, unit_pairs, refs, key=(q, list(pairs))))
    return units


def retain_units(data, retain_ids: Sequence[int]) -> list[PackUnit]:
    """One unit per distinct retain row; a row drawn n times is listed n times in ``retain``."""
    counts: dict[int, int] = {}
    for r in retain_ids:
        counts[r] = counts.get(r, 0) + 1
    units = []
    for r, n in counts.items():
        row = data.retain[r]
        units.append(PackUnit([(row.input_ids, row.labels)], [ROLE_RETAIN], retain=[0] * n, key=r))
    return units


def sequence_units(sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                   role: int = ROLE_OTHER) -> list[PackUnit]:
    """One unit per sequence (no pairs, no retain term): for plain log-prob passes."""
    return [PackUnit([s], [role], key=i) for i, s in enumerate(sequences)]
