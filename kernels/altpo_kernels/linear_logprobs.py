"""``linear_logprobs``: per-token log-probs of a linear head without the [tokens, vocab] logits."""

from __future__ import annotations

import torch

from ._validation import check_linear_inputs
from .backends import backend_module, resolve_backend
from .reference import linear_logprobs_entropy_reference, linear_logprobs_reference


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


class TransformedLogprobsFunction(torch.autograd.Function):
    """``(logp, entropy)`` of a head with bias / logit scale / soft-capping / temperature, by the
    backend's ``transformed_forward`` / ``transformed_backward`` (torch: the tiled plain-torch path
    of ``torch_chunked``; triton: the fused kernels with the transform compiled in; cuda: cuBLAS
    logits tiles and the transformed C++ epilogues); ignored rows give 0. With ``entropy`` False the triton and cuda kernels skip the entropy state (entropy is
    then 0)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, tf, backend: str, entropy: bool):
        impl = backend_module(backend)
        valid = labels != ignore_index
        rows = valid.nonzero().squeeze(1)
        h = hidden.index_select(0, rows).contiguous()
        lab = labels.index_select(0, rows).long().contiguous()
        logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        ent_out = torch.zeros_like(logp)
        lse = mu = torch.empty(0, dtype=torch.float32, device=hidden.device)
        if h.shape[0]:
            if backend == "torch":
                lp, ent, lse, mu = impl.transformed_forward(h, weight.contiguous(), lab, bias, tf)
            else:
                lp, ent, lse, mu = impl.transformed_forward(h, weight.contiguous(), lab, bias, tf,
                                                            entropy=entropy)
            logp[rows] = lp
            if ent is not None:
                ent_out[rows] = ent
            if mu is None:
                mu = torch.empty(0, dtype=torch.float32, device=hidden.device)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), labels,
                              rows, lse, mu)
        ctx.has_bias, ctx.tf, ctx.backend, ctx.entropy = bias is not None, tf, backend, entropy
        return logp, ent_out

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, rows, lse, mu = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            ctx.has_bias and ctx.needs_input_grad[2]
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None
        db = torch.zeros_like(bias) if need_db else None
        if not ctx.entropy:
            grad_entropy = None  # the entropy output was not asked for: its gradient is unused
        if rows.numel() == 0 or (grad_logp is None and grad_entropy is None):
            return dh, dw, db, None, None, None, None, None
        g_lp = (grad_logp.index_select(0, rows).float() if grad_logp is not None
                else torch.zeros(rows.numel(), device=hidden.device))
        g_ent = grad_entropy.index_select(0, rows).float() if grad_entropy is not None else None
        h = hidden.index_select(0, rows).contiguous()
        lab = labels.index_select(0, rows).long().contiguous()
        gh, gw, gb = backend_module(ctx.backend).transformed_backward(
            h, weight.contiguous(), lab, bias, ctx.tf, lse, mu, g_lp, g_ent, need_dh, need_dw,
            need_db)
        if need_dh:
            dh.index_copy_(0, rows, gh.to(hidden.dtype))
        if need_dw:
            dw = gw.to(weight.dtype)
        if need_db:
            db = gb.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None


def linear_logprobs(hidden, weight, labels, *, ignore_index: int = -100, backend: str = "auto",
                    bias=None, temperature: float = 1.0, logit_scale: float = 1.0,
                    softcap: float | None = None, return_entropy: bool = False):
    """Per-token log-probabilities ``log_softmax(hidden @ weight.T)[label]`` as fp32 [N].

    Args:
        hidden: [N, H] float32, bfloat16 or float16; ``hidden[t]`` predicts ``labels[t]`` (no shift).
        weight: [V, H], the lm_head weight, same dtype and device as ``hidden``.
        labels: [N] int64 token ids; ``ignore_index`` marks tokens to skip (their log-prob is 0).
        backend: ``"auto"`` (triton on CUDA, torch on CPU), ``"triton"``, ``"torch"``, ``"cuda"``
            (cuBLAS tiles + the C++ epilogues of ``scripts/build_csrc.sh``; CUDA tensors) or
            ``"reference"`` (materialised float64, for tests).
        bias: [V] LM-head bias (same dtype and device), added to the logits.
        logit_scale: multiplies the logits (after the bias; Granite-style models pass 1 /
            their ``logits_scaling``).
        softcap: final-logit soft-capping, ``softcap * tanh(z / softcap)`` (Gemma-2: 30.0).
        temperature: divides the logits last.
        return_entropy: also return the per-token entropy of the (transformed) distribution, fp32
            [N], 0 for ignored tokens; then the result is ``(logp, entropy)``, both differentiable.

    With any of bias / logit_scale / softcap / temperature / return_entropy the triton backend
    (``"auto"`` on CUDA) runs its kernels with the transform compiled into each logits tile, the
    cuda backend its transformed epilogues on cuBLAS logits tiles, and the torch backend
    (``"auto"`` on the CPU) its tiled path.
    Differentiable with respect to ``hidden``, ``weight`` (and ``bias``); never holds the [N, V]
    logits (except with ``backend="reference"``).
    """
    check_linear_inputs(hidden, weight, labels, ignore_index)
    from .torch_chunked import HeadTransform

    tf = HeadTransform(temperature, logit_scale, softcap)
    extended = bias is not None or not tf.is_identity or return_entropy
    if not extended:
        name = resolve_backend(backend, hidden.device)
        if name == "reference":
            return linear_logprobs_reference(hidden, weight, labels, ignore_index).float()
        return LinearLogprobsFunction.apply(hidden, weight, labels, ignore_index, name)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape [V] = [{weight.shape[0]}] (one entry per "
                             f"weight row), got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.device != weight.device or bias.dtype != weight.dtype:
            raise ValueError(f"bias must have the weight's dtype and device ({weight.dtype}, "
                             f"{weight.device}), got {bias.dtype}, {bias.device}; convert it with "
                             f"bias.to(weight)")
    if backend == "reference":
        logp, entropy = linear_logprobs_entropy_reference(
            hidden, weight, labels, bias=bias, temperature=tf.temperature,
            logit_scale=tf.logit_scale, softcap=tf.softcap, ignore_index=ignore_index)
        logp, entropy = logp.float(), entropy.float()
    else:
        name = resolve_backend(backend, hidden.device)  # raises its own error for unknown names
        logp, entropy = TransformedLogprobsFunction.apply(hidden, weight, bias, labels, ignore_index,
                                                          tf, name, bool(return_entropy))
    return (logp, entropy) if return_entropy else logp
