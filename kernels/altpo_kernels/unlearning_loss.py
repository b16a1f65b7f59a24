"""``unlearning_loss``: the log-prob unlearning family (AltPO, DPO/IdkDPO, NPO, SimNPO, GradDiff,
GradAscent) over packed sequences through one fused log-prob kernel.

Every member is a function of per-sequence answer log-probs (summed, or divided by the answer
length), with or without reference log-probs, plus the retain NLL with weight ``alpha``. So each
token carries one coefficient ``c_t = dL/d logp_t`` and the gradient of its logits row is
``c_t * (onehot - softmax)`` (docs/methods.md gives ``c_t`` per method). The same pieces as
:func:`altpo_kernels.altpo_loss` do the work: one log-prob pass that keeps only the log-sum-exp,
segment sums per sequence, the per-sequence arithmetic in float32 torch, and in backward a single
recompute pass of the selected backend.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_index_vector, check_linear_inputs, check_range, check_same_device
from .altpo_loss import SegmentSumFunction
from .backends import resolve_backend
from .linear_logprobs import LinearLogprobsFunction
from .methods_reference import unlearning_loss_reference

#: Methods with a chosen sequence per forget sequence (preference pairs) and reference log-probs.
PREFERENCE_METHODS = ("altpo", "dpo", "idkdpo")
METHODS = PREFERENCE_METHODS + ("npo", "simnpo", "graddiff", "gradascent")

#: Each method's hyper-parameters and their defaults: open-unlearning's configs/trainer/<Method>.yaml
#: (DPO, NPO, SimNPO, GradDiff; GradAscent has no retain term there, so alpha 0), and the AltPO
#: run of docs/design.md section 2 (beta 0.5, alpha 2).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "altpo": dict(beta=0.5, alpha=2.0, gamma=1.0),
    "dpo": dict(beta=0.1, alpha=1.0, gamma=1.0),
    "idkdpo": dict(beta=0.1, alpha=1.0, gamma=1.0),
    "npo": dict(beta=0.1, alpha=1.0, gamma=1.0),
    "simnpo": dict(beta=4.5, delta=0.0, alpha=1.0, gamma=0.125),
    "graddiff": dict(alpha=1.0, gamma=1.0),
    "gradascent": dict(alpha=0.0, gamma=1.0),
}
_USES_REFERENCE = PREFERENCE_METHODS + ("npo",)


@dataclass
class UnlearningLossOutput:
    """Result of :func:`unlearning_loss`. ``loss`` is differentiable; the rest are for logging.

    ``forget_loss``/``retain_loss`` are this call's contributions under the given normalisers (the
    outputs of several calls that share them add up to the step's). ``forget_logps`` and
    ``chosen_logps`` are per forget term (detached fp32; ``chosen_logps`` empty without pairs).
    ``score`` is per forget term what the method pushes on: the preference margin D for
    altpo/dpo/idkdpo, the log-ratio ``lp - lp_ref`` for npo, the length-normalised log-prob for
    simnpo, graddiff and gradascent. ``hparams`` are the values used (defaults filled in).
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


def method_hparams(method: str, beta=None, alpha=None, gamma=None, delta=None) -> dict[str, float]:
    """The method's hyper-parameters: defaults filled in, unknown ones and bad values refused."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method).lower(), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}{hint}")
    given = {"beta": beta, "alpha": alpha, "gamma": gamma, "delta": delta}
    values = dict(METHOD_DEFAULTS[method])
    for name, value in given.items():
        if value is None:
            continue
        if name not in values:
            users = [m for m in METHODS if name in METHOD_DEFAULTS[m]]
            raise ValueError(f"method {method!r} has no hyper-parameter {name} (it is used by "
                             f"{', '.join(users)}); leave {name} unset")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        values[name] = float(value)
    if "beta" in values and not values["beta"] > 0:
        raise ValueError(f"beta must be positive for method {method!r}, got {values['beta']}")
    for name in ("alpha", "gamma"):
        if values[name] < 0:
            raise ValueError(f"{name} must not be negative, got {values[name]}")
    return values


def _check_seq_vector(name, t, num_seqs, length=None, allow_empty=True):
    check_index_vector(name, t, length=length, allow_empty=allow_empty)
    check_range(name, t, num_seqs)


def _check_ref(name, ref, like):
    if not isinstance(ref, torch.Tensor) or ref.shape != like.shape or not ref.is_floating_point():
        got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"{name} must be a float tensor with one reference log-prob per forget "
                         f"term (shape {tuple(like.shape)}), got {got}")


def _check_inputs(method, hidden, weight, labels, seq_ids, forget_seqs, chosen_seqs, retain_seqs,
                  ref_forget_logps, ref_chosen_logps, normalisers, ignore_index) -> int:
    check_linear_inputs(hidden, weight, labels, ignore_index)
    check_index_vector("seq_ids", seq_ids, length=hidden.shape[0])
    if seq_ids.numel() and int(seq_ids.min()) < 0:
        raise ValueError("seq_ids must be >= 0: each token's index of its packed sequence")
    num_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    _check_seq_vector("forget_seqs", forget_seqs, num_seqs)
    if retain_seqs is not None:
        _check_seq_vector("retain_seqs", retain_seqs, num_seqs)
    pairs = method in PREFERENCE_METHODS
    if pairs:
        if chosen_seqs is None:
            raise ValueError(f"method {method!r} compares a chosen answer with each forget answer: "
                             "pass chosen_seqs (one chosen sequence per entry of forget_seqs)")
        _check_seq_vector("chosen_seqs", chosen_seqs, num_seqs, length=forget_seqs.shape[0])
    elif chosen_seqs is not None:
        raise ValueError(f"method {method!r} has no chosen answers; drop chosen_seqs (or use "
                         "method 'dpo' / 'altpo' for preference pairs)")
    if method in _USES_REFERENCE:
        if ref_forget_logps is None:
            raise ValueError(f"method {method!r} needs the reference model's log-prob of each forget "
                             "sequence: pass ref_forget_logps")
        _check_ref("ref_forget_logps", ref_forget_logps, forget_seqs)
        check_same_device(hidden=hidden, ref_forget_logps=ref_forget_logps)
    elif ref_forget_logps is not None:
        raise ValueError(f"method {method!r} uses no reference model; drop ref_forget_logps")
    if pairs:
        if ref_chosen_logps is None:
            raise ValueError(f"method {method!r} needs the reference log-prob of each chosen "
                             "sequence: pass ref_chosen_logps")
        _check_ref("ref_chosen_logps", ref_chosen_logps, forget_seqs)
        check_same_device(hidden=hidden, ref_chosen_logps=ref_chosen_logps)
    elif ref_chosen_logps is not None:
        raise ValueError(f"method {method!r} has no chosen answers; drop ref_chosen_logps")
    extra = {} if retain_seqs is None else {"retain_seqs": retain_seqs}
    check_same_device(hidden=hidden, seq_ids=seq_ids, forget_seqs=forget_seqs, **extra)
    for name, value in normalisers.items():
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number (the whole step's count), got {value!r}")
    if normalisers["num_forget_tokens"] is not None and method not in ("graddiff", "gradascent"):
        raise ValueError(f"num_forget_tokens normalises graddiff/gradascent only; method {method!r} "
                         "averages over forget terms (num_forget)")
    return num_seqs


def unlearning_loss(hidden, weight, labels, seq_ids, *, method: str, forget_seqs,
                    chosen_seqs=None, retain_seqs=None, ref_forget_logps=None,
                    ref_chosen_logps=None, beta: float | None = None, alpha: float | None = None,
                    gamma: float | None = None, delta: float | None = None,
                    num_forget: float | None = None, num_forget_tokens: float | None = None,
                    num_retain_tokens: float | None = None, ignore_index: int = -100,
                    backend: str = "auto") -> UnlearningLossOutput:
    """``gamma * L_forget(method) + alpha * L_retain`` from last hidden states of packed sequences.

    Args:
        hidden: [N, H] last hidden states of all packed tokens (fp32, bf16 or fp16).
        weight: [V, H] lm_head weight. labels: [N] int64, already shifted (``hidden[t]`` predicts
            ``labels[t]``), ``ignore_index`` on prompt and padding tokens.
        seq_ids: [N] index of the packed sequence each token belongs to.
        method: ``"altpo"``, ``"dpo"``, ``"idkdpo"`` (DPO whose chosen answers are "I don't know"
            variants: the same loss), ``"npo"``, ``"simnpo"``, ``"graddiff"``, ``"gradascent"``.
        forget_seqs: [B] the forget-answer sequence of each forget term (the rejected side of a
            pair; a sequence may be listed several times and its gradient adds up).
        chosen_seqs: [B] altpo/dpo/idkdpo only: the chosen sequence of each pair (the alternate,
            or the "I don't know" answer).
        retain_seqs: [R] sequences whose answer tokens get the NLL term (None or empty: none).
        ref_forget_logps, ref_chosen_logps: [B] reference-model sequence log-probs (altpo, dpo,
            idkdpo: both; npo: ref_forget_logps only; others: none).
        beta, alpha, gamma, delta: the method's hyper-parameters; None takes the default of
            :data:`METHOD_DEFAULTS` (open-unlearning's); one the method does not have is an error.
        num_forget, num_forget_tokens, num_retain_tokens: the whole optimizer step's normalisers
            when it spans several calls: forget terms (pairs or forget rows; not for
            graddiff/gradascent), forget answer tokens (graddiff/gradascent), retain answer tokens.
            Default: this call's counts.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (float64, tests).
    """
    hp = method_hparams(method, beta, alpha, gamma, delta)
    if not isinstance(forget_seqs, torch.Tensor):
        raise ValueError(f"forget_seqs must be a torch.Tensor of sequence indices, got "
                         f"{type(forget_seqs).__name__}")
    normalisers = {"num_forget": num_forget, "num_forget_tokens": num_forget_tokens,
                   "num_retain_tokens": num_retain_tokens}
    num_seqs = _check_inputs(method, hidden, weight, labels, seq_ids, forget_seqs, chosen_seqs,
                             retain_seqs, ref_forget_logps, ref_chosen_logps, normalisers,
                             ignore_index)
    if num_forget is not None and method in ("graddiff", "gradascent"):
        raise ValueError(f"method {method!r} averages over forget answer tokens: pass "
                         "num_forget_tokens, not num_forget")
    if retain_seqs is None:
        retain_seqs = torch.zeros(0, dtype=torch.long, device=hidden.device)
    name = resolve_backend(backend, hidden.device)

    valid = (labels != ignore_index).float()
    seq_len = torch.zeros(num_seqs, device=hidden.device).index_add_(0, seq_ids.long(), valid)
    forget_tokens = float(seq_len[forget_seqs.long()].sum()) if forget_seqs.numel() else 0.0
    retain_tokens = float(seq_len[retain_seqs.long()].sum()) if retain_seqs.numel() else 0.0
    forget_tokens = float(num_forget_tokens) if num_forget_tokens is not None else forget_tokens
    retain_tokens = float(num_retain_tokens) if num_retain_tokens is not None else retain_tokens
    terms = float(num_forget) if num_forget is not None else float(forget_seqs.numel())

    kw = {k: v for k, v in hp.items()}
    if name == "reference":
        ref = unlearning_loss_reference(
            hidden, weight, labels, seq_ids, method=method, forget_seqs=forget_seqs,
            chosen_seqs=chosen_seqs, retain_seqs=retain_seqs, ref_forget_logps=ref_forget_logps,
            ref_chosen_logps=ref_chosen_logps, num_forget=num_forget,
            num_forget_tokens=num_forget_tokens, num_retain_tokens=num_retain_tokens,
            ignore_index=ignore_index, **kw)
        return UnlearningLossOutput(
            ref["loss"].float(), ref["forget_loss"].float(), ref["retain_loss"].float(),
            ref["forget_logps"].float().detach(), ref["chosen_logps"].float().detach(),
            ref["score"].float().detach(), method, hp, terms, forget_tokens, retain_tokens)

    token_logp = LinearLogprobsFunction.apply(hidden, weight, labels, ignore_index, name)
    seq_logp = SegmentSumFunction.apply(token_logp, seq_ids, num_seqs, name)
    forget = seq_logp[forget_seqs.long()]
    chosen = forget.new_zeros((0,))
    zero = seq_logp.new_zeros(())
    if method in PREFERENCE_METHODS:
        chosen = seq_logp[chosen_seqs.long()]
        score = (chosen - ref_chosen_logps.float()) - (forget - ref_forget_logps.float())
        forget_loss = -(2.0 / hp["beta"]) * F.logsigmoid(hp["beta"] * score).sum() / terms
    elif method == "npo":
        score = forget - ref_forget_logps.float()
        forget_loss = -(2.0 / hp["beta"]) * F.logsigmoid(-hp["beta"] * score).sum() / terms
    elif method == "simnpo":
        score = forget / seq_len[forget_seqs.long()].clamp(min=1.0)
        arg = -hp["beta"] * score - hp["beta"] * hp["delta"]
        forget_loss = -(2.0 / hp["beta"]) * F.logsigmoid(arg).sum() / terms
    else:  # graddiff, gradascent: minus the forget answers' token-mean NLL
        score = forget / seq_len[forget_seqs.long()].clamp(min=1.0)
        forget_loss = forget.sum() / forget_tokens if forget_tokens else zero
    if forget_seqs.numel() == 0:
        forget_loss = zero
    if retain_seqs.numel() and retain_tokens > 0:
        retain_loss = -seq_logp[retain_seqs.long()].sum() / retain_tokens
    else:
        retain_loss = zero
    loss = hp["gamma"] * forget_loss + hp["alpha"] * retain_loss
    return UnlearningLossOutput(loss, forget_loss, retain_loss, forget.detach(), chosen.detach(),
                                score.detach(), method, hp, terms, forget_tokens, retain_tokens)


class UnlearningLoss(nn.Module):
    """``nn.Module`` form of :func:`unlearning_loss` with the method and hyper-parameters fixed."""

    def __init__(self, method: str, *, beta=None, alpha=None, gamma=None, delta=None,
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.method = method
        self.hparams = method_hparams(method, beta, alpha, gamma, delta)
        self.ignore_index, self.backend = ignore_index, backend

    def forward(self, hidden, weight, labels, seq_ids, **tensors) -> UnlearningLossOutput:
        return unlearning_loss(hidden, weight, labels, seq_ids, method=self.method,
                               ignore_index=self.ignore_index, backend=self.backend,
                               **self.hparams, **tensors)

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"method={self.method!r}, {hp}, backend={self.backend!r}"
