"""TRL on this kernel: ``add_fused_lm_head`` with TRL's contract, and a drop-in ``DPOTrainer``.

    from altpo_kernels.trl import DPOTrainer          # instead of: from trl import DPOTrainer

TRL (1.16) patches a causal LM so that ``model(..., labels=labels, fused_lm_head=True)`` returns a
``trl.trainer.utils.FusedCausalLMOutput`` with per-token ``log_probs`` instead of logits. The
function here patches the same keyword and returns the same class, with ``log_probs`` from
``linear_logprobs`` (no [tokens, vocab] logits, in forward or backward). Needs ``trl``
(``pip install altpo-fast[trl]``); nothing else in ``altpo_kernels`` imports it.

What runs where:

- ``log_probs`` (and ``loss``) always run on the kernel, with gradient. Temperature and the
  config's logit scale are folded into the hidden states (``(s/T) * h @ W.T``), so they run on
  the kernel too.
- ``entropy``, ``mean_logits``, ``is_top1`` and ``log_sum_sq_probs``, when requested, come from
  a second pass over the LM head in token chunks. ``entropy`` has a gradient, as in TRL (its
  backward recomputes the chunks, and runs only when a loss uses it); the others have none, as
  in TRL.
- A config with ``final_logit_softcapping``, an LM head with a bias, or a MoE config that asks
  for router logits is handed to TRL's own ``add_fused_lm_head``, with a warning saying so.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
from contextlib import nullcontext

import torch
import transformers
from packaging.version import Version

from .hf import logit_scale as _logit_scale  # the scale every caller reads, as TRL reads it
from .linear_logprobs import linear_logprobs

try:
    import trl as _trl
    from trl.trainer import dpo_trainer
    from trl.trainer.utils import FusedCausalLMOutput
    from trl.trainer.utils import add_fused_lm_head as _trl_add_fused_lm_head
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "altpo_kernels.trl needs TRL: install it with `pip install 'altpo-fast[trl]'` "
        "(or `pip install trl`)"
    ) from exc

__all__ = ["add_fused_lm_head", "DPOTrainer", "OPTIONAL_OUTPUTS"]

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Elements of one [tokens, vocab] fp32 tile in the metrics pass (64 MiB).
_METRICS_TILE_ELEMENTS = 1 << 24


def _unsupported(model, text_config) -> str | None:
    """Why the kernel cannot serve ``model``'s head (TRL's path is used then), or None."""
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        return "final_logit_softcapping is set in the config"
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return "the model has no output embeddings with a weight"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias"
    if getattr(text_config, "output_router_logits", False):
        return "the config asks for MoE router logits (load-balancing loss)"
    return None


@torch.no_grad()
def _metrics(hidden, weight, labels, outputs):
    """The requested optional fields for valid rows, from logits formed one token chunk at a time."""
    n, vocab = hidden.shape[0], weight.shape[0]
    fields = {name: torch.empty(n, dtype=torch.bool if name == "is_top1" else torch.float32,
                                device=hidden.device) for name in outputs}
    step = max(1, _METRICS_TILE_ELEMENTS // max(vocab, 1))
    w = weight.float()
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        z = hidden[rows].float() @ w.T
        logp = torch.log_softmax(z, dim=-1)
        if "entropy" in fields:
            fields["entropy"][rows] = -(logp.exp() * logp).sum(-1)
        if "log_sum_sq_probs" in fields:
            fields["log_sum_sq_probs"][rows] = torch.logsumexp(2 * logp, dim=-1)
        if "mean_logits" in fields:
            fields["mean_logits"][rows] = z.mean(-1)
        if "is_top1" in fields:
            # argmax returns the first maximum, so a tie with an earlier token is not a top-1 hit
            fields["is_top1"][rows] = z.argmax(-1) == labels[rows]
    return fields


class _EntropyGrad(torch.autograd.Function):
    """Attaches the gradient of the per-row entropy to values computed in the no-gradient pass.

    Backward recomputes the logits one token chunk at a time: dH/dz_j = -p_j (log p_j + H), then
    dh = dz W and dW = dz^T h, with fp32 accumulation. It runs only when a loss uses the entropy.
    """

    @staticmethod
    def forward(ctx, rows, weight, entropy):
        ctx.save_for_backward(rows, weight, entropy)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad):
        rows, weight, entropy = ctx.saved_tensors
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.float()
        d_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) if need_rows else None
        d_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_weight else None
        step = max(1, _METRICS_TILE_ELEMENTS // max(weight.shape[0], 1))
        for start in range(0, rows.shape[0], step):
            sl = slice(start, min(rows.shape[0], start + step))
            h = rows[sl].float()
            logp = torch.log_softmax(h @ w.T, dim=-1)
            dz = -grad[sl].float()[:, None] * logp.exp() * (logp + entropy[sl][:, None])
            if need_rows:
                d_rows[sl] = dz @ w
            if need_weight:
                d_weight.addmm_(dz.T, h)
        return (None if d_rows is None else d_rows.to(rows.dtype),
                None if d_weight is None else d_weight.to(weight.dtype), None)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, backend: str = "auto") -> None:
    """Patch ``model`` so ``model(..., labels=labels, fused_lm_head=True)`` scores on this kernel.

    The same arguments as ``trl.trainer.utils.add_fused_lm_head`` (TRL 1.16) and the same result:
    a ``FusedCausalLMOutput`` with ``log_probs`` [batch, seq - 1] (or [batch, seq] for pre-shifted
    ``shift_labels``), zero where the label is -100; the ``outputs`` fields besides ``log_probs``
    (see ``OPTIONAL_OUTPUTS``), ``label_mask`` and ``loss`` (summed NLL over valid tokens divided
    by ``num_items_in_batch`` or their count). Without ``fused_lm_head=True`` the model's own
    forward runs, so generation is unchanged. ``backend`` is ``linear_logprobs``' backend.
    Patch before wrapping the model with PEFT, as with TRL.
    """
    unknown = [o for o in outputs if o != "log_probs" and o not in OPTIONAL_OUTPUTS]
    if unknown:
        raise ValueError(f"add_fused_lm_head: unknown outputs {unknown}; choose among "
                         f"{('log_probs',) + OPTIONAL_OUTPUTS}")
    if not temperature > 0:
        raise ValueError(f"add_fused_lm_head: temperature must be positive, got {temperature}")
    text_config = model.config.get_text_config()
    reason = _unsupported(model, text_config)
    if reason is not None:
        warnings.warn(f"altpo_kernels.trl.add_fused_lm_head: {reason}, which the kernel does not "
                      "support yet; using TRL's own fused LM head for this model", stacklevel=2)
        _trl_add_fused_lm_head(model, temperature=temperature,
                               cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
        return
    scale = _logit_scale(text_config) / temperature
    extras = tuple(o for o in OPTIONAL_OUTPUTS if o in outputs)
    original_forward = model.forward
    backbone_attr = "base_model"
    if text_config is not model.config:
        if Version(transformers.__version__) < Version("5.0.0"):
            backbone_attr = "model"

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                      num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the head scores "
                             "each next-token label, -100 where none")
        kwargs["use_cache"] = False
        # looked up on each call: PEFT and FSDP replace modules after patching
        states = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            states, targets = states[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        weight = self.get_output_embeddings().weight
        states, targets = states.to(weight.device), targets.to(weight.device)
        mask = targets != -100
        context = nullcontext()
        if cast_lm_head_to_fp32:
            context = torch.autocast(weight.device.type, enabled=False)
            weight = weight.float()
        with context:
            rows = states[mask]
            if rows.dtype != weight.dtype:
                rows = rows.to(weight.dtype)
            if scale != 1.0:
                rows = rows * scale
            picked = targets[mask]
            if rows.shape[0]:
                token_logp = linear_logprobs(rows, weight, picked, backend=backend)
            else:  # a differentiable zero keeps an all-masked micro-batch in the graph
                token_logp = rows.float().sum(-1)
            fields = _metrics(rows, weight, picked, extras) if extras and rows.shape[0] else {}
            if "entropy" in fields and torch.is_grad_enabled() and (rows.requires_grad
                                                                    or weight.requires_grad):
                fields["entropy"] = _EntropyGrad.apply(rows, weight, fields["entropy"])
        log_probs = token_logp.new_zeros(mask.shape).masked_scatter(mask, token_logp)
        per_token = {}
        for name in extras:
            value = fields.get(name)
            empty = torch.zeros(mask.shape, dtype=torch.bool if name == "is_top1" else torch.float32,
                                device=mask.device)
            per_token[name] = empty if value is None else empty.masked_scatter(mask, value)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs,
                                   entropy=per_token.get("entropy"),
                                   log_sum_sq_probs=per_token.get("log_sum_sq_probs"),
                                   mean_logits=per_token.get("mean_logits"),
                                   is_top1=per_token.get("is_top1"), label_mask=mask)

    model.forward = types.MethodType(fused_forward, model)


_PATCH_LOCK = threading.Lock()


class DPOTrainer(_trl.DPOTrainer):
    """``trl.DPOTrainer`` with the same constructor, whose policy and reference score on this kernel.

    TRL's constructor patches the policy and the reference with its fused LM head, asking for the
    fields its metrics need; while it runs, that call is routed to :func:`add_fused_lm_head` here,
    so the same models get the same fields at the same point of construction (before Accelerate
    wraps the reference's forward, so its mixed-precision wrapper stays on top). Set the class
    attribute ``lm_head_backend`` (default ``"auto"``) to pick the ``linear_logprobs`` backend.
    """

    lm_head_backend = "auto"

    def __init__(self, *args, **kwargs):
        backend = self.lm_head_backend

        def on_kernel(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
            add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs, backend=backend)

        with _PATCH_LOCK:  # one constructor at a time sees the routed name
            if getattr(dpo_trainer, "add_fused_lm_head", None) is not _trl_add_fused_lm_head:
                raise RuntimeError("altpo_kernels.trl.DPOTrainer: this TRL release's DPO trainer does "
                                   "not patch models through trl.trainer.utils.add_fused_lm_head; "
                                   f"it is written for TRL 1.16 (installed: {_trl.__version__})")
            dpo_trainer.add_fused_lm_head = on_kernel
            try:
                super().__init__(*args, **kwargs)
            finally:
                dpo_trainer.add_fused_lm_head = _trl_add_fused_lm_head
