"""The unlearning methods in the trainer: their data, packing units and packed loss module.

Every method reuses the AltPO data layout (:class:`altpo.data.tofu.AltPOData`), the step sampler
and the packing; what differs is the "alternates" each forget row is paired with:

- altpo, dpo: the ``--alternates`` file (K chosen answers per forget question);
- idkdpo: one "I don't know" answer per forget row (:mod:`altpo.data.idk`);
- npo, simnpo, graddiff, gradascent: no chosen answer. Each forget row is one "pair" whose
  placeholder alternate is the forget answer itself, so the sampler draws forget rows exactly as
  it draws pairs (one epoch = forget rows // batch size steps, as open-unlearning counts), and
  :func:`method_units` packs only the forget answer: a unit of one sequence whose pair is
  ``(0, 0)``. The loss reads the forget side (``lose_seqs``, ``ref_lose_logps``) only.
"""

from __future__ import annotations

from typing import Sequence

from altpo_kernels import unlearning_loss
from altpo_kernels.altpo_loss import AltPOLossOutput
from altpo_kernels.unlearning_loss import PREFERENCE_METHODS

from altpo.data.idk import default_idk_path, read_idk_answers, sample_idk_answers
from altpo.data.packing import ROLE_FORGET, PackUnit, forget_units, num_loss_tokens
from altpo.data.tofu import load_alternates
from altpo.errors import UserError
from altpo.train.method_settings import REFERENCE_METHODS, loss_hparams
from altpo.train.step import PackedAltPOLoss, last_hidden_states, output_weight


def needs_reference(method: str) -> bool:
    """Does the method's loss use the starting model's log-probs?"""
    return method in REFERENCE_METHODS


def method_alternates(config, forget_rows: Sequence[dict]) -> list[list[str]]:
    """Per forget row, the texts that play the alternates' part for ``config.method``."""
    if config.method in ("altpo", "dpo"):
        return load_alternates(config.alternates, forget_rows)
    if config.method == "idkdpo":
        path = config.idk_answers or default_idk_path(config.data)
        if path is None:
            raise UserError("--method idkdpo needs \"I don't know\" answers: pass --idk-answers FILE "
                            f"(one per line; --data {config.data} has no idontknow.jsonl)")
        return sample_idk_answers(read_idk_answers(path), len(forget_rows), config.seed)
    return [[row["answer"]] for row in forget_rows]


def method_units(data, method: str, pair_ids: Sequence[int], ref=None) -> list[PackUnit]:
    """The packing units of a step's forget side (retain units are the same for every method)."""
    refs = (ref.alternates, ref.forget) if ref is not None else ()
    if method in PREFERENCE_METHODS:
        return forget_units(data, pair_ids, *refs)
    units = []
    for p in pair_ids:
        q = data.pair_question[p]
        answer = data.forget[q]
        r = 0.0 if ref is None else float(ref.forget[q])
        units.append(PackUnit([(answer.input_ids, answer.labels)], [ROLE_FORGET], [(0, 0)],
                              [(r, r)], key=(q, [p])))
    return units


def step_forget_tokens(data, step_pairs: Sequence[int]) -> int:
    """Forget answer tokens of a whole step: graddiff/gradascent's token-mean normaliser."""
    return sum(num_loss_tokens(data.forget[data.pair_question[p]].labels) for p in step_pairs)


class PackedUnlearningLoss(PackedAltPOLoss):
    """The model plus any method's loss: ``forward(micro_batch, num_forget, num_retain_tokens)``.

    A :class:`PackedAltPOLoss` (DDP wraps it and the update in backward accepts it) whose forward
    runs :func:`altpo_kernels.unlearning_loss`. ``num_forget`` is the step's forget terms (pairs
    or forget rows); graddiff/gradascent normalise by the step's forget answer tokens instead,
    set in :attr:`num_forget_tokens` before each step. The output has AltPO's fields: ``win_logps``
    = chosen log-probs (empty without pairs), ``lose_logps`` = forget log-probs, ``delta`` = the
    method's score (docs/methods.md).
    """

    def __init__(self, model, method: str, hparams: dict, *, loss_backend: str = "auto"):
        super().__init__(model, beta=hparams.get("beta", 0.0), alpha=hparams["alpha"],
                         gamma=hparams["gamma"], loss_backend=loss_backend)
        self.method, self.hparams = method, dict(hparams)
        self.num_forget_tokens = 1.0

    def forward(self, mb, num_pairs: float, num_retain_tokens: float) -> AltPOLossOutput:
        hidden = last_hidden_states(self.model, mb)
        kw = dict(forget_seqs=mb.lose_seqs, retain_seqs=mb.retain_seqs,
                  num_retain_tokens=max(float(num_retain_tokens), 1.0))
        if self.method in PREFERENCE_METHODS:
            kw.update(chosen_seqs=mb.win_seqs, ref_chosen_logps=mb.ref_win_logps)
        if self.method in REFERENCE_METHODS:
            kw["ref_forget_logps"] = mb.ref_lose_logps
        if self.method in ("graddiff", "gradascent"):
            kw["num_forget_tokens"] = max(float(self.num_forget_tokens), 1.0)
        else:
            kw["num_forget"] = max(float(num_pairs), 1.0)
        out = unlearning_loss(hidden, output_weight(self.model), mb.labels, mb.seq_ids,
                              method=self.method, backend=self.loss_backend, **self.hparams, **kw)
        return AltPOLossOutput(out.loss, out.forget_loss, out.retain_loss, out.chosen_logps,
                               out.forget_logps, out.score, out.num_forget, out.num_retain_tokens)


def packed_loss_module(model, config) -> PackedAltPOLoss:
    """The loss module of ``config.method`` (altpo keeps :class:`PackedAltPOLoss` as it was)."""
    if config.method == "altpo":
        return PackedAltPOLoss(model, beta=config.beta, alpha=config.alpha, gamma=config.gamma,
                               loss_backend=config.loss_backend)
    return PackedUnlearningLoss(model, config.method, loss_hparams(config),
                                loss_backend=config.loss_backend)


def prepare_step(loss_module, data, method: str, rows, ref) -> list[PackUnit]:
    """The step's forget units, and (graddiff/gradascent) the step's forget-token count."""
    if isinstance(loss_module, PackedUnlearningLoss):
        loss_module.num_forget_tokens = step_forget_tokens(data, rows.step_pairs)
    return method_units(data, method, rows.pairs, ref)
