"""``altpo_loss``: the fused AltPO (and DPO) loss over packed sequences.

One log-prob pass over all packed tokens, segment sums per sequence, the pair and retain terms in
float32, and in backward a single recompute pass where every token carries one coefficient
``c_t = dL/d logp_t`` (docs/design.md section 2). The per-pair arithmetic is a few hundred numbers, so it
stays in torch; the per-token work (log-probs, segment sums, coefficient gather, dH/dW) runs in the
selected backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import (
    check_index_vector,
    check_linear_inputs,
    check_positive,
    check_weight,
    check_range,
    check_same_device,
)
from .backends import backend_module, resolve_backend
from .linear_logprobs import LinearLogprobsFunction
from .reference import altpo_loss_reference


@dataclass
class AltPOLossOutput:
    """Result of :func:`altpo_loss`. ``loss`` is differentiable; the rest are for logging.

    ``forget_loss`` and ``retain_loss`` are this call's contributions under the given normalisers,
    so summing the outputs of several calls that share ``num_pairs``/``num_retain_tokens`` gives the
    step's loss. ``win_logps``/``lose_logps``/``delta`` are per pair (detached, fp32).
    """

    loss: torch.Tensor
    forget_loss: torch.Tensor
    retain_loss: torch.Tensor
    win_logps: torch.Tensor
    lose_logps: torch.Tensor
    delta: torch.Tensor
    num_pairs: float
    num_retain_tokens: float


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


def _check_altpo_inputs(hidden, weight, labels, seq_ids, win_seqs, lose_seqs, retain_seqs,
                        ref_win_logps, ref_lose_logps, beta, num_pairs, num_retain_tokens,
                        ignore_index, alpha=0.0, gamma=0.0) -> int:
    check_linear_inputs(hidden, weight, labels, ignore_index)
    check_index_vector("seq_ids", seq_ids, length=hidden.shape[0])
    check_index_vector("win_seqs", win_seqs, allow_empty=False)
    check_index_vector("lose_seqs", lose_seqs, length=win_seqs.shape[0])
    check_index_vector("retain_seqs", retain_seqs)
    for name, ref in (("ref_win_logps", ref_win_logps), ("ref_lose_logps", ref_lose_logps)):
        if isinstance(ref, torch.Tensor) and not ref.is_floating_point():
            raise ValueError(f"{name} must hold floating-point log-probs (float32), got {ref.dtype}; "
                             f"convert with {name}.float()")
        if not isinstance(ref, torch.Tensor) or ref.shape != win_seqs.shape:
            raise ValueError(
                f"{name} must be a float tensor with one reference log-prob per pair "
                f"(shape {tuple(win_seqs.shape)}), got "
                f"{tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__}"
            )
    check_same_device(hidden=hidden, seq_ids=seq_ids, win_seqs=win_seqs, lose_seqs=lose_seqs,
                      retain_seqs=retain_seqs, ref_win_logps=ref_win_logps,
                      ref_lose_logps=ref_lose_logps)
    if seq_ids.numel() and int(seq_ids.min()) < 0:
        raise ValueError("seq_ids must be >= 0: each token's index of its packed sequence")
    num_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    check_range("win_seqs", win_seqs, num_seqs)
    check_range("lose_seqs", lose_seqs, num_seqs)
    check_range("retain_seqs", retain_seqs, num_seqs)
    check_positive("beta", beta, allow_none=False)
    check_weight("alpha", alpha)
    check_weight("gamma", gamma)
    check_positive("num_pairs", num_pairs)
    check_positive("num_retain_tokens", num_retain_tokens)
    return num_seqs


def altpo_loss(
    hidden,
    weight,
    labels,
    seq_ids,
    win_seqs,
    lose_seqs,
    retain_seqs,
    ref_win_logps,
    ref_lose_logps,
    *,
    beta: float = 0.5,
    alpha: float = 2.0,
    gamma: float = 1.0,
    num_pairs: float | None = None,
    num_retain_tokens: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> AltPOLossOutput:
    """AltPO loss ``gamma * L_forget + alpha * L_retain`` from last hidden states of packed sequences.

    Args:
        hidden: [N, H] last hidden states of all packed tokens (fp32, bf16 or fp16).
        weight: [V, H] lm_head weight. labels: [N] int64, already shifted (``hidden[t]`` predicts
            ``labels[t]``), ``ignore_index`` on prompt and padding tokens.
        seq_ids: [N] index of the packed sequence each token belongs to.
        win_seqs, lose_seqs: [B] per pair, the alternate (chosen) and forget-answer (rejected)
            sequence. A lose sequence may serve several pairs; its gradient adds up.
        retain_seqs: [R] sequences whose answer tokens get the NLL term (may be empty).
        ref_win_logps, ref_lose_logps: [B] reference-model sequence log-probs per pair.
        beta, alpha, gamma: AltPO's hyper-parameters. ``alpha=0, gamma=beta/2`` gives plain DPO.
        num_pairs, num_retain_tokens: normalisers of the whole optimizer step when it spans several
            calls (micro-batches, ranks). Default: this call's pair count and retain-token count.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.
    """
    num_seqs = _check_altpo_inputs(hidden, weight, labels, seq_ids, win_seqs, lose_seqs,
                                   retain_seqs, ref_win_logps, ref_lose_logps, beta, num_pairs,
                                   num_retain_tokens, ignore_index, alpha, gamma)
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        out = altpo_loss_reference(
            hidden, weight, labels, seq_ids, win_seqs, lose_seqs, retain_seqs, ref_win_logps,
            ref_lose_logps, beta=beta, alpha=alpha, gamma=gamma, num_pairs=num_pairs,
            num_retain_tokens=num_retain_tokens, ignore_index=ignore_index)
        win, lose = out["win_logps"].float().detach(), out["lose_logps"].float().detach()
        delta = (win - ref_win_logps.float()) - (lose - ref_lose_logps.float())
        retain_count = num_retain_tokens
        if retain_count is None:
            retain_count = float(_retain_token_count(labels, seq_ids, retain_seqs, num_seqs, ignore_index))
        return AltPOLossOutput(out["loss"].float(), out["forget_loss"].float(),
                               out["retain_loss"].float(), win, lose, delta,
                               float(num_pairs or win_seqs.numel()), float(retain_count))

    token_logp = LinearLogprobsFunction.apply(hidden, weight, labels, ignore_index, name)
    seq_logp = SegmentSumFunction.apply(token_logp, seq_ids, num_seqs, name)

    win = seq_logp[win_seqs.long()]
    lose = seq_logp[lose_seqs.long()]
    delta = (win - ref_win_logps.float()) - (lose - ref_lose_logps.float())
    pairs = float(num_pairs) if num_pairs is not None else float(win_seqs.numel())
    forget_loss = -(2.0 / beta) * F.logsigmoid(beta * delta).sum() / pairs

    if num_retain_tokens is None:
        num_retain_tokens = float(_retain_token_count(labels, seq_ids, retain_seqs, num_seqs, ignore_index))
    if retain_seqs.numel() and num_retain_tokens > 0:
        retain_loss = -seq_logp[retain_seqs.long()].sum() / float(num_retain_tokens)
    else:
        retain_loss = seq_logp.new_zeros(())
    loss = gamma * forget_loss + alpha * retain_loss
    return AltPOLossOutput(loss, forget_loss, retain_loss, win.detach(), lose.detach(),
                           delta.detach(), pairs, float(num_retain_tokens))


def _retain_token_count(labels, seq_ids, retain_seqs, num_seqs: int, ignore_index: int) -> int:
    """Answer tokens of the retain sequences (a sequence listed twice counts twice)."""
    if retain_seqs.numel() == 0:
        return 0
    valid = (labels != ignore_index).float()
    per_seq = torch.zeros(num_seqs, device=labels.device).index_add_(0, seq_ids.long(), valid)
    return int(per_seq[retain_seqs.long()].sum().item())


class AltPOLoss(nn.Module):
    """``nn.Module`` form of :func:`altpo_loss` with the hyper-parameters fixed at construction."""

    def __init__(self, beta: float = 0.5, alpha: float = 2.0, gamma: float = 1.0,
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        check_positive("beta", beta, allow_none=False)
        check_weight("alpha", alpha)
        check_weight("gamma", gamma)
        self.beta, self.alpha, self.gamma = beta, alpha, gamma
        self.ignore_index, self.backend = ignore_index, backend

    def forward(self, hidden, weight, labels, seq_ids, win_seqs, lose_seqs, retain_seqs,
                ref_win_logps, ref_lose_logps, *, num_pairs=None, num_retain_tokens=None):
        return altpo_loss(hidden, weight, labels, seq_ids, win_seqs, lose_seqs, retain_seqs,
                          ref_win_logps, ref_lose_logps, beta=self.beta, alpha=self.alpha,
                          gamma=self.gamma, num_pairs=num_pairs,
                          num_retain_tokens=num_retain_tokens, ignore_index=self.ignore_index,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, alpha={self.alpha}, gamma={self.gamma}, backend={self.backend!r}"
