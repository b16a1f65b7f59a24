"""The unlearning methods in the trainer: their data, packing units and packed loss module.

Every method reuses the AltPO data layout (:class:`altpo.data.tofu.AltPOData`), the step sampler
and the packing; what differs is where each forget row's chosen answers come from, which the
method's record says (:attr:`altpo_kernels.Method.chosen`):

- ``"alternates"``: the ``--alternates`` file (K chosen answers per forget question);
- ``"idk"``: one "I don't know" answer per forget row (:mod:`altpo.data.idk`);
- ``None``: no chosen answer. Each forget row is one "pair" whose placeholder alternate is the
  forget answer itself, so the sampler draws forget rows exactly as it draws pairs (one epoch =
  forget rows // batch size steps, as open-unlearning counts), and :func:`method_units` packs only
  the forget answer: a unit of one sequence whose pair is ``(0, 0)``. The loss reads the forget
  side only.
"""

from __future__ import annotations

from typing import Sequence

from altpo_kernels.methods import get_method

from altpo.data.idk import default_idk_path, read_idk_answers, sample_idk_answers
from altpo.data.packing import ROLE_FORGET, PackUnit, forget_units, num_loss_tokens
from altpo.data.tofu import load_alternates
from altpo.errors import UserError
from altpo.train.method_settings import loss_hparams
from altpo.train.step import PackedLoss


def needs_reference(method: str) -> bool:
    """Does the method's loss use the starting model's log-probs?"""
    return get_method(method).uses_reference


def method_alternates(config, forget_rows: Sequence[dict]) -> list[list[str]]:
    """Per forget row, the texts that play the alternates' part for ``config.method``."""
    chosen = get_method(config.method).chosen
    if chosen == "alternates":
        return load_alternates(config.alternates, forget_rows)
    if chosen == "idk":
        path = config.idk_answers or default_idk_path(config.data)
        if path is None:
            raise UserError(f"--method {config.method} needs \"I don't know\" answers: pass "
                            f"--idk-answers FILE (one per line; --data {config.data} has no "
                            "idontknow.jsonl)")
        return sample_idk_answers(read_idk_answers(path), len(forget_rows), config.seed)
    return [[row["answer"]] for row in forget_rows]


def method_units(data, method: str, pair_ids: Sequence[int], ref_chosen=None, ref_forget=None
                 ) -> list[PackUnit]:
    """The packing units of a step's forget side (retain units are the same for every method).

    ``ref_chosen`` [P] per pair and ``ref_forget`` [Q] per forget question are the cached
    reference log-probs (None gives zeros: no reference, or a resident one fills them later)."""
    if get_method(method).pairs:
        return forget_units(data, pair_ids, ref_chosen, ref_forget)
    units = []
    for p in pair_ids:
        q = data.pair_question[p]
        answer = data.forget[q]
        r = 0.0 if ref_forget is None else float(ref_forget[q])
        units.append(PackUnit([(answer.input_ids, answer.labels)], [ROLE_FORGET], [(0, 0)],
                              [(r, r)], key=(q, [p])))
    return units


def step_forget_tokens(data, step_pairs: Sequence[int]) -> int:
    """Forget answer tokens of a whole step: the normaliser of methods normalised by tokens."""
    return sum(num_loss_tokens(data.forget[data.pair_question[p]].labels) for p in step_pairs)


def packed_loss_module(model, config) -> PackedLoss:
    """The model plus ``config.method``'s loss, with the run's settings."""
    return PackedLoss(model, config.method, hparams=loss_hparams(config),
                      loss_backend=config.loss_backend)


def set_step_normaliser(loss_module, data, method: str, rows) -> None:
    """Methods normalised by forget tokens: the step's forget-token count, set on the loss module."""
    if get_method(method).normaliser == "forget_tokens":
        loss_module.num_forget_tokens = step_forget_tokens(data, rows.step_pairs)


def prepare_step(loss_module, data, method: str, rows, ref) -> list[PackUnit]:
    """The step's forget units (this process's share of ``rows``), and (methods normalised by
    forget tokens) the step's forget-token count. ``ref`` is the cached
    :class:`~altpo.train.reference_cache.ReferenceLogprobs` or None."""
    set_step_normaliser(loss_module, data, method, rows)
    refs = (ref.alternates, ref.forget) if ref is not None else ()
    return method_units(data, method, rows.pairs, *refs)
