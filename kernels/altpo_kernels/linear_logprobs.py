"""``linear_logprobs``: per-token log-probs of a linear head without the [tokens, vocab] logits."""

from __future__ import annotations

import torch

from ._validation import check_linear_inputs
from .backends import backend_module, resolve_backend
from .reference import linear_logprobs_reference


def _take_rows(t, rows):
    return t if rows is None else t.index_select(0, rows)


class LinearLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the [N] log-sum-exp; backward recomputes the logits tile by tile.

    Rows whose label is ``ignore_index`` are dropped before any kernel runs (their log-prob is 0
    and their gradient is 0), and backward again drops rows whose incoming gradient is 0, such as
    tokens of sequences that no loss term uses.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, backend: str):
        impl = backend_module(backend)
        valid = labels != ignore_index
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        h = _take_rows(hidden, rows).contiguous()
        lab = _take_rows(labels, rows).long().contiguous()
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(0, dtype=torch.float32, device=hidden.device)
        if h.shape[0]:
            logp, lse = impl.logprobs_forward(h, weight.contiguous(), lab)
            if rows is None:
                out = logp
            else:
                out[rows] = logp
        ctx.save_for_backward(hidden, weight, labels, lse, rows if rows is not None else torch.empty(0))
        ctx.all_valid = rows is None
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse, rows = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = None if ctx.all_valid else rows
        g = _take_rows(grad_out, rows).float()
        keep = (g != 0).nonzero().squeeze(1)
        if keep.numel() < g.numel():
            rows = keep if rows is None else rows.index_select(0, keep)
            g, lse = g.index_select(0, keep), lse.index_select(0, keep)
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None
        if g.numel() == 0:
            return dh, dw, None, None, None
        h = _take_rows(hidden, rows).contiguous()
        lab = _take_rows(labels, rows).long().contiguous()
        dh_rows, dw_full = backend_module(ctx.backend).logprobs_backward(
            h, weight.contiguous(), lab, lse.contiguous(), g.contiguous(), need_dh, need_dw
        )
        if need_dh:
            if rows is None:
                dh = dh_rows
            else:
                dh.index_copy_(0, rows, dh_rows)
        return dh, dw_full, None, None, None


def linear_logprobs(hidden, weight, labels, *, ignore_index: int = -100, backend: str = "auto"):
    """Per-token log-probabilities ``log_softmax(hidden @ weight.T)[label]`` as fp32 [N].

    Args:
        hidden: [N, H] float32, bfloat16 or float16; ``hidden[t]`` predicts ``labels[t]`` (no shift).
        weight: [V, H], the lm_head weight, same dtype and device as ``hidden``.
        labels: [N] int64 token ids; ``ignore_index`` marks tokens to skip (their log-prob is 0).
        backend: ``"auto"`` (triton on CUDA, torch on CPU), ``"triton"``, ``"torch"`` or
            ``"reference"`` (materialised float64, for tests).

    Differentiable with respect to ``hidden`` and ``weight``; never holds the [N, V] logits
    (except with ``backend="reference"``).
    """
    check_linear_inputs(hidden, weight, labels, ignore_index)
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        return linear_logprobs_reference(hidden, weight, labels, ignore_index).float()
    return LinearLogprobsFunction.apply(hidden, weight, labels, ignore_index, name)
