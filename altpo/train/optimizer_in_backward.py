"""The optimizer step inside backward: each parameter is updated as soon as its gradient is complete.

Why: holding every gradient until the step (bf16: 2 bytes per parameter, 2.3 GiB for
Llama-3.2-1B) is what keeps full-parameter AltPO with fp32 AdamW states out of 16 GiB. Here a
decoder layer's gradients exist only while that layer is being differentiated, plus the tied
embedding's, which the loss starts and the embedding backward completes.

How, for one optimizer step of M micro-batches:

1. Every micro-batch runs forward first. The graph is cut at the input of each decoder layer and
   of the final norm (forward pre-hooks, only while this step's forwards run): a cut is a pair
   of tiny autograd functions, one that receives the gradient of the layer's input and keeps
   it, and one (an empty "anchor" tensor) that sends it on into the previous layer. The cuts
   save no tensor, so checkpointed or offloaded activations stay where the checkpointing mode
   put them.
2. Backward runs stage by stage, from the loss down: the loss and final norm of every
   micro-batch, then the last decoder layer of every micro-batch, ..., then the embedding. A
   single ``backward()`` of the summed step loss would not do: autograd finishes one
   micro-batch's graph before it starts the next, so every parameter's gradient would wait for
   the last micro-batch, all at once. Stage by stage, the parameters of a layer are complete
   when that layer's stage ends; they are then updated (MixedPrecisionAdamW's per-parameter
   AdamW: fp32 master, Kahan or plain) and their gradients freed. Within a stage, micro-batches
   go in order, so each gradient is summed in the same order as the accumulating step sums it.
3. Gradient clipping by global norm needs the norm before the first update. With clipping on
   (``max_grad_norm`` > 0), step 2 runs twice: first with ``retain_graph=True``, only adding up
   the squared norm of each completed gradient (in the same fp32 chunks, combined in the same
   parameter order as :func:`altpo.train.master_weights.global_grad_norm`, so the clip factor is the
   same number) and freeing it; then again, applying the clipped updates. The price is one extra
   backward per step (with checkpointing, one extra recompute of every layer too). A non-finite
   norm is found in the first pass, before anything is updated. Without clipping there is one
   pass, and a non-finite gradient with a finite loss is only seen after the update (the loss is
   checked before any backward).

Data parallel (DDP) is not supported: DDP all-reduces gradients in its own buckets during one
``backward()`` of the whole model, and the stage-by-stage backward would have to all-reduce each
layer's gradients before updating them. The trainer refuses the combination with a clear error.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from altpo.train.master_weights import (
    MixedPrecisionAdamW,
    NonFiniteGradientError,
    clip_coefficient,
    combine_norm_parts,
    grad_norm_parts,
)
from altpo.data.packing import MicroBatch
from altpo.train.step import PackedAltPOLoss, StepStats, StepStatsSum, backbone, output_weight


class _Boundary:
    """The gradient of one stage's input, from the moment backward computes it until the
    previous stage's backward takes it."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


class _Receive(torch.autograd.Function):
    """Start of a stage: forwards ``x`` unchanged (``x`` comes detached); backward keeps the
    gradient in the boundary and sends nothing further (the graph ends here)."""

    @staticmethod
    def forward(ctx, x, graph_leaf, boundary):
        ctx.boundary = boundary
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        b = ctx.boundary
        b.grad = grad if b.grad is None else b.grad + grad
        return None, None, None


class _Send(torch.autograd.Function):
    """End of the previous stage: an empty tensor whose backward hands the boundary's gradient
    to the tensor the previous stage produced."""

    @staticmethod
    def forward(ctx, x, boundary):
        ctx.boundary = boundary
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        grad, ctx.boundary.grad = ctx.boundary.grad, None
        if grad is None:
            raise RuntimeError("a stage's backward ran before the stage above it produced its gradient")
        return grad, None


class _StageCuts:
    """Forward pre-hooks on each decoder layer and the final norm that cut the graph there."""

    def __init__(self, model):
        body = backbone(model)
        self.modules = list(body.layers) + [body.norm]
        self.recording: list | None = None
        self.handles = []
        # _Receive needs an input that requires grad, or its output would not be part of a graph
        self.graph_leaf = torch.zeros((), requires_grad=True)

    def _hook(self, module, args, kwargs):
        if self.recording is None or not torch.is_grad_enabled():
            return None  # e.g. the recompute of a checkpointed layer during backward
        if args:
            x = args[0]
        else:
            x = kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or not x.requires_grad:
            return None
        boundary = _Boundary()
        anchor = _Send.apply(x, boundary)
        y = _Receive.apply(x.detach(), self.graph_leaf, boundary)
        self.recording.append(anchor)
        if args:
            return (y,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": y}

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.recording = None

    @contextlib.contextmanager
    def record(self, anchors: list):
        self.recording = anchors
        try:
            yield
        finally:
            self.recording = None


def _parameter_stages(model, optimizer: MixedPrecisionAdamW) -> list[list[int]]:
    """Optimizer parameter indices complete after each backward stage, in backward order:
    [head (final norm, untied lm_head), layer L-1, ..., layer 0, embedding and the rest]."""
    body = backbone(model)
    index = {id(p): i for i, p in enumerate(optimizer.params)}
    layers = list(body.layers)
    stage_of: dict[int, int] = {}
    for p in body.norm.parameters():
        stage_of[id(p)] = 0
    embedding = model.get_input_embeddings().weight
    head = output_weight(model)
    if head is not embedding:
        stage_of[id(head)] = 0
    for k, layer in enumerate(layers):
        for p in layer.parameters():
            stage_of[id(p)] = len(layers) - k
    last = len(layers) + 1
    stages: list[list[int]] = [[] for _ in range(last + 1)]
    for p in optimizer.params:
        stages[stage_of.get(id(p), last)].append(index[id(p)])
    return stages


def _forwards(loss_module, micro_batches, num_pairs, num_retain_tokens, device, before_forward,
              forward_context, expected_cuts: int) -> tuple[list, list, StepStats]:
    """Every micro-batch's forward, its graph cut at each stage: ``(losses, anchors, stats)``."""
    losses, anchors = [], []
    totals = StepStatsSum(device)
    with _StageCuts(loss_module.model) as cuts:
        for mb in micro_batches:
            if device is not None:
                mb = mb.to(device)
            if before_forward is not None:
                mb = before_forward(mb)
            mb_anchors: list = []
            ctx = forward_context() if forward_context is not None else contextlib.nullcontext()
            with cuts.record(mb_anchors), ctx:
                out = loss_module(mb, num_pairs, num_retain_tokens)
            losses.append(out.loss)
            anchors.append(mb_anchors)
            totals.add(out, mb)
    if any(len(a) != expected_cuts for a in anchors):
        raise RuntimeError(f"expected {expected_cuts} stage cuts per micro-batch, got "
                           f"{[len(a) for a in anchors]}; is the backbone a Llama-style decoder?")
    return losses, anchors, totals.result()


def optimizer_step_in_backward(
    loss_module: PackedAltPOLoss, optimizer: MixedPrecisionAdamW, micro_batches: Sequence[MicroBatch], *,
    num_pairs: float, num_retain_tokens: float, lr: float, max_grad_norm: float | None = 1.0,
    device=None, before_forward: Callable[[MicroBatch], MicroBatch] | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> StepStats:
    """One whole optimizer step with the update inside backward (see the module docstring).

    Reaches the weights :func:`altpo.train.step.forward_backward` followed by
    ``optimizer.step(lr, max_grad_norm)`` reaches, to rounding (the tied embedding's gradient is
    summed in another order). Returns the step's statistics with ``grad_norm`` set (before
    clipping). Raises :class:`NonFiniteGradientError` (with a ``stats`` attribute) when the loss,
    or with clipping the gradient norm, is not finite; nothing is updated then.
    """
    if not isinstance(loss_module, PackedAltPOLoss):
        raise TypeError("the optimizer step in backward needs the PackedAltPOLoss itself (DDP is "
                        "not supported with it)")
    model = loss_module.model
    stages = _parameter_stages(model, optimizer)
    expected = len(stages) - 1  # cuts per micro-batch: one per decoder layer and the final norm
    losses, anchors, stats = _forwards(loss_module, micro_batches, num_pairs, num_retain_tokens,
                                       device, before_forward, forward_context, expected)
    if not math.isfinite(stats.loss):
        err = NonFiniteGradientError(float("nan"))
        err.stats = stats
        raise err

    clip = bool(max_grad_norm) and max_grad_norm > 0
    norm_parts: dict[int, list[torch.Tensor]] = {}

    def complete(indices, apply: bool, coef):
        missing = [optimizer.names[i] for i in indices if optimizer.params[i].grad is None]
        if missing:
            raise RuntimeError(f"parameters without a gradient: {', '.join(missing[:3])}")
        for i in indices:
            norm_parts[i] = grad_norm_parts(optimizer.params[i].grad, optimizer.chunk_numel)
        if apply:
            optimizer.update_parameters(indices, lr, coef)
        else:
            for i in indices:
                optimizer.params[i].grad = None

    def backward_pass(apply: bool, coef, retain: bool):
        norm_parts.clear()
        for loss in losses:
            loss.backward(retain_graph=retain)
        complete(stages[0], apply, coef)
        for s in range(1, len(stages)):
            cut = expected - s  # the anchor at the input of the stage above this one
            for mb_anchors in anchors:
                torch.autograd.backward(mb_anchors[cut], mb_anchors[cut].new_empty(0),
                                        retain_graph=retain)
            complete(stages[s], apply, coef)

    def total_norm():
        return combine_norm_parts([p for i in range(len(optimizer.params)) for p in norm_parts[i]])

    try:
        coef = None
        if clip:
            backward_pass(apply=False, coef=None, retain=True)
            norm = total_norm()
            if not math.isfinite(float(norm)):
                err = NonFiniteGradientError(float(norm))
                err.stats = stats
                raise err
            coef = clip_coefficient(norm, max_grad_norm)
            if coef is not None:
                coef = coef.to(optimizer.params[0].device)
        optimizer.begin_update()
        backward_pass(apply=True, coef=coef, retain=False)
        if not clip:
            norm = total_norm()
    except BaseException:
        optimizer.zero_grad()
        raise
    stats.grad_norm = float(norm)
    return stats
