"""``unlearning_loss``: every method of the log-prob unlearning family over packed sequences,
through one fused log-prob kernel.

One log-prob pass over all packed tokens keeps only the log-sum-exp; segment sums give each
sequence's answer log-prob; the method's forget term (its record in :mod:`altpo_kernels.methods`)
and the retain NLL make the loss; in backward, one recompute pass of the selected backend where
every token carries one coefficient ``c_t = dL/d logp_t`` (docs/design.md section 2). The
per-term arithmetic is a few hundred numbers, so it runs in float64 torch: it cannot overflow for
any setting the checks accept.

The two sides of a forget term are named *chosen* (the alternate, "I don't know" answer, ...)
and *forget* (the answer to unlearn) everywhere; :func:`altpo_kernels.altpo_loss` keeps AltPO's
positional names (win = chosen, lose = forget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._validation import check_index_vector, check_linear_inputs, check_range, check_same_device
from .backends import backend_module, resolve_backend
from .linear_logprobs import LinearLogprobsFunction
from .methods import ALTPO, DEFAULT_METHOD, Method, SequenceLogprobs, get_method, method_names

#: the registered methods' names (a user's own method is given as path/to/file.py:NAME)
METHODS = method_names()


class SegmentSumFunction(torch.autograd.Function):
    """Sums per-token values into their sequences; backward hands each token its sequence's grad."""

    @staticmethod
    def forward(ctx, values, seq_ids, num_seqs: int, backend: str):
        ctx.save_for_backward(seq_ids)
        ctx.backend = backend
        return backend_module(backend).segment_sum(values, seq_ids, num_seqs)

    @staticmethod
    def backward(ctx, grad_seq):
        (seq_ids,) = ctx.saved_tensors
        grad = backend_module(ctx.backend).gather_segments(grad_seq.contiguous(), seq_ids)
        return grad, None, None, None


@dataclass
class UnlearningLossOutput:
    """Result of :func:`unlearning_loss` (and :func:`altpo_loss`). ``loss`` is differentiable.

    ``forget_loss``/``retain_loss`` are this call's contributions under the given normalisers (the
    outputs of several calls that share them add up to the step's). ``forget_logps`` and
    ``chosen_logps`` are per forget term (detached fp32; ``chosen_logps`` empty without a chosen
    side). ``score`` is per forget term what the method pushes on (its record's forget term says:
    a preference margin, a log-ratio ``lp - lp_ref``, a length-normalised log-prob). ``hparams`` are the settings used (defaults filled in).
    AltPO's names are kept as aliases: ``win_logps`` = ``chosen_logps``, ``lose_logps`` =
    ``forget_logps``, ``delta`` = ``score``, ``num_pairs`` = ``num_forget``.
    """

    loss: torch.Tensor
    forget_loss: torch.Tensor
    retain_loss: torch.Tensor
    forget_logps: torch.Tensor
    chosen_logps: torch.Tensor
    score: torch.Tensor
    method: str
    hparams: dict
    num_forget: float
    num_forget_tokens: float
    num_retain_tokens: float

    @property
    def win_logps(self) -> torch.Tensor:
        return self.chosen_logps

    @property
    def lose_logps(self) -> torch.Tensor:
        return self.forget_logps

    @property
    def delta(self) -> torch.Tensor:
        return self.score

    @property
    def num_pairs(self) -> float:
        return self.num_forget


def _check_seq_vector(name, t, num_seqs, length=None, allow_empty=True):
    check_index_vector(name, t, length=length, allow_empty=allow_empty)
    check_range(name, t, num_seqs)


def _check_ref(name, ref, like):
    if isinstance(ref, torch.Tensor) and not ref.is_floating_point():
        raise ValueError(f"{name} must hold floating-point log-probs (float32), got {ref.dtype}; "
                         f"convert with {name}.float()")
    if not isinstance(ref, torch.Tensor) or ref.shape != like.shape:
        got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"{name} must be a float tensor with one reference log-prob per forget "
                         f"term (shape {tuple(like.shape)}), got {got}")


def _check_side(method: Method, side: str, seqs, ref, forget_seqs, num_seqs, hidden, wants_ref):
    """The chosen side (seqs + reference) or the forget side's reference, for ``method``."""
    ref_name = f"ref_{side}_logps"
    if side == "chosen":
        if method.pairs and seqs is None:
            raise ValueError(f"method {method.name!r} compares a chosen answer with each forget "
                             "answer: pass chosen_seqs (one chosen sequence per entry of forget_seqs)")
        if not method.pairs and seqs is not None:
            raise ValueError(f"method {method.name!r} has no chosen answers; drop chosen_seqs (or "
                             f"use a method with a chosen side, such as {ALTPO!r})")
        if seqs is not None:
            _check_seq_vector("chosen_seqs", seqs, num_seqs, length=forget_seqs.shape[0])
    if wants_ref:
        if ref is None:
            raise ValueError(f"method {method.name!r} needs the reference model's log-prob of each "
                             f"{side} sequence: pass {ref_name}")
        _check_ref(ref_name, ref, forget_seqs)
        check_same_device(hidden=hidden, **{ref_name: ref})
    elif ref is not None:
        why = "uses no reference model" if not method.uses_reference else "has no chosen answers"
        raise ValueError(f"method {method.name!r} {why}; drop {ref_name}")


def check_inputs(method: Method, hidden, weight, labels, seq_ids, forget_seqs, chosen_seqs,
                 retain_seqs, ref_forget_logps, ref_chosen_logps, normalisers, ignore_index) -> int:
    """Every input of :func:`unlearning_loss` against ``method``; returns the sequence count."""
    check_linear_inputs(hidden, weight, labels, ignore_index)
    check_index_vector("seq_ids", seq_ids, length=hidden.shape[0])
    if seq_ids.numel() and int(seq_ids.min()) < 0:
        raise ValueError("seq_ids must be >= 0: each token's index of its packed sequence")
    num_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    if not isinstance(forget_seqs, torch.Tensor):
        raise ValueError(f"forget_seqs must be a torch.Tensor of sequence indices, got "
                         f"{type(forget_seqs).__name__}")
    _check_seq_vector("forget_seqs", forget_seqs, num_seqs)
    if retain_seqs is not None:
        _check_seq_vector("retain_seqs", retain_seqs, num_seqs)
    _check_side(method, "chosen", chosen_seqs, ref_chosen_logps, forget_seqs, num_seqs, hidden,
                method.uses_reference and method.pairs)
    _check_side(method, "forget", None, ref_forget_logps, forget_seqs, num_seqs, hidden,
                method.uses_reference)
    extra = {} if retain_seqs is None else {"retain_seqs": retain_seqs}
    check_same_device(hidden=hidden, seq_ids=seq_ids, forget_seqs=forget_seqs, **extra)
    for name, value in normalisers.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0 or value != value or value == float("inf")):
            raise ValueError(f"{name} must be a positive number (the whole step's count), got {value!r}")
    wrong = "num_forget" if method.normaliser == "forget_tokens" else "num_forget_tokens"
    if normalisers[wrong] is not None:
        right = "num_forget_tokens" if wrong == "num_forget" else "num_forget"
        unit = "forget answer tokens" if method.normaliser == "forget_tokens" else "forget terms"
        raise ValueError(f"method {method.name!r} averages over {unit}: pass {right}, not {wrong}")
    return num_seqs


def _forget_inputs(seq_logp, seq_len, method: Method, forget_seqs, chosen_seqs, ref_forget_logps,
                   ref_chosen_logps, dtype) -> SequenceLogprobs:
    f = forget_seqs.long()
    return SequenceLogprobs(
        forget=seq_logp[f].to(dtype),
        lengths=seq_len[f].clamp(min=1.0).to(dtype),
        chosen=seq_logp[chosen_seqs.long()].to(dtype) if method.pairs else None,
        ref_forget=ref_forget_logps.to(dtype) if method.uses_reference else None,
        ref_chosen=ref_chosen_logps.to(dtype) if method.uses_reference and method.pairs else None)


def unlearning_loss(hidden, weight, labels, seq_ids, *, method=DEFAULT_METHOD, forget_seqs,
                    chosen_seqs=None, retain_seqs=None, ref_forget_logps=None,
                    ref_chosen_logps=None, beta: float | None = None, alpha: float | None = None,
                    gamma: float | None = None, delta: float | None = None,
                    settings: dict | None = None, num_forget: float | None = None,
                    num_forget_tokens: float | None = None, num_retain_tokens: float | None = None,
                    ignore_index: int = -100, backend: str = "auto") -> UnlearningLossOutput:
    """``gamma * L_forget(method) + alpha * L_retain`` from last hidden states of packed sequences.

    Args:
        hidden: [N, H] last hidden states of all packed tokens (fp32, bf16 or fp16).
        weight: [V, H] lm_head weight. labels: [N] int64, already shifted (``hidden[t]`` predicts
            ``labels[t]``), ``ignore_index`` on prompt and padding tokens.
        seq_ids: [N] index of the packed sequence each token belongs to.
        method: a registered name (:data:`altpo_kernels.REGISTRY`), a :class:`altpo_kernels.Method`, or
            ``"path/to/file.py:NAME"`` / ``"package.module:NAME"`` naming one.
        forget_seqs: [B] the forget-answer sequence of each forget term (a sequence may be listed
            several times; its gradient adds up). May be empty: then only the retain term.
        chosen_seqs: [B] methods with a chosen side only: each term's chosen sequence.
        retain_seqs: [R] sequences whose answer tokens get the NLL term (None or empty: none).
        ref_forget_logps, ref_chosen_logps: [B] reference-model sequence log-probs (methods that
            use a reference; ``ref_chosen_logps`` only with a chosen side).
        beta, alpha, gamma, delta, settings: the method's settings (``settings`` for names of a
            user's method); None takes the method's default; one it does not take is an error.
        num_forget, num_forget_tokens, num_retain_tokens: the whole optimizer step's normalisers
            when it spans several calls: forget terms (methods normalised by terms), forget answer
            tokens (methods normalised by tokens), retain answer tokens. Default: this call's.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, ``"cuda"`` or ``"reference"`` (float64).
    """
    spec = get_method(method)
    named = {"beta": beta, "alpha": alpha, "gamma": gamma, "delta": delta}
    hp = spec.hparams(**{**(settings or {}), **{k: v for k, v in named.items() if v is not None}})
    normalisers = {"num_forget": num_forget, "num_forget_tokens": num_forget_tokens,
                   "num_retain_tokens": num_retain_tokens}
    num_seqs = check_inputs(spec, hidden, weight, labels, seq_ids, forget_seqs, chosen_seqs,
                            retain_seqs, ref_forget_logps, ref_chosen_logps, normalisers,
                            ignore_index)
    if retain_seqs is None:
        retain_seqs = torch.zeros(0, dtype=torch.long, device=hidden.device)
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        from .reference import unlearning_loss_reference

        ref = unlearning_loss_reference(
            hidden, weight, labels, seq_ids, method=spec, hparams=hp, forget_seqs=forget_seqs,
            chosen_seqs=chosen_seqs, retain_seqs=retain_seqs, ref_forget_logps=ref_forget_logps,
            ref_chosen_logps=ref_chosen_logps, ignore_index=ignore_index, **normalisers)
        return UnlearningLossOutput(
            ref["loss"].float(), ref["forget_loss"].float(), ref["retain_loss"].float(),
            ref["forget_logps"].float().detach(), ref["chosen_logps"].float().detach(),
            ref["score"].float().detach(), spec.name, hp, ref["num_forget"],
            ref["num_forget_tokens"], ref["num_retain_tokens"])

    valid = (labels != ignore_index).float()
    seq_len = torch.zeros(num_seqs, device=hidden.device).index_add_(0, seq_ids.long(), valid)
    forget_tokens = float(seq_len[forget_seqs.long()].sum()) if forget_seqs.numel() else 0.0
    retain_tokens = float(seq_len[retain_seqs.long()].sum()) if retain_seqs.numel() else 0.0
    forget_tokens = float(num_forget_tokens) if num_forget_tokens is not None else forget_tokens
    retain_tokens = float(num_retain_tokens) if num_retain_tokens is not None else retain_tokens
    terms = float(num_forget) if num_forget is not None else float(forget_seqs.numel())

    token_logp = LinearLogprobsFunction.apply(hidden, weight, labels, ignore_index, name)
    seq_logp = SegmentSumFunction.apply(token_logp, seq_ids, num_seqs, name)
    zero = seq_logp.new_zeros(())
    x = _forget_inputs(seq_logp, seq_len, spec, forget_seqs, chosen_seqs, ref_forget_logps,
                       ref_chosen_logps, torch.float64)
    per_term, score = spec.forget_term(x, hp)
    count = forget_tokens if spec.normaliser == "forget_tokens" else terms
    if forget_seqs.numel() and count > 0:
        forget_loss = (per_term.sum() / count).float()
    else:
        forget_loss = zero
    if retain_seqs.numel() and retain_tokens > 0:
        retain_loss = -seq_logp[retain_seqs.long()].sum() / retain_tokens
    else:
        retain_loss = zero
    loss = hp["gamma"] * forget_loss + hp["alpha"] * retain_loss
    chosen = x.chosen if x.chosen is not None else seq_logp.new_zeros((0,))
    return UnlearningLossOutput(loss, forget_loss, retain_loss, x.forget.detach().float(),
                                chosen.detach().float(), score.detach().float(), spec.name, hp,
                                terms, forget_tokens, retain_tokens)


class UnlearningLoss(nn.Module):
    """``nn.Module`` form of :func:`unlearning_loss` with the method and its settings fixed."""

    def __init__(self, method=DEFAULT_METHOD, *, beta=None, alpha=None, gamma=None, delta=None,
                 settings: dict | None = None, ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.spec = get_method(method)
        self.method = self.spec.name
        named = {"beta": beta, "alpha": alpha, "gamma": gamma, "delta": delta}
        self.hparams = self.spec.hparams(**{**(settings or {}),
                                            **{k: v for k, v in named.items() if v is not None}})
        self.ignore_index, self.backend = ignore_index, backend

    def forward(self, hidden, weight, labels, seq_ids, **tensors) -> UnlearningLossOutput:
        return unlearning_loss(hidden, weight, labels, seq_ids, method=self.spec,
                               settings=self.hparams, ignore_index=self.ignore_index,
                               backend=self.backend, **tensors)

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"method={self.method!r}, {hp}, backend={self.backend!r}"
