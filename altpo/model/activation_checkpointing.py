"""The memory planner's checkpointing modes applied to a transformers model.

``none``     every activation stays on the device until backward.
``layers``   each decoder layer is recomputed in backward; only layer inputs are kept.
``offload``  as ``layers``, and the kept layer inputs (and everything else saved outside the
             recomputed layers) wait in pinned CPU memory: run the forward inside
             :func:`offload_saved_tensors`.

Usage::

    enable_activation_checkpointing(model, plan.checkpointing_mode)
    with offload_saved_tensors(plan.offload_checkpoints, device):
        hidden = model.model(...); loss = altpo_loss(...)
    loss.backward()
"""

from __future__ import annotations

import contextlib

import torch

MODES = ("none", "layers", "offload")


def enable_activation_checkpointing(model, mode: str) -> None:
    """Switch decoder-layer checkpointing on (``layers``/``offload``) or off (``none``)."""
    if mode not in MODES:
        raise ValueError(f"checkpointing mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()
        return
    # non-reentrant: works with keyword inputs and with the saved-tensor hooks that offload uses
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def offload_saved_tensors(enabled: bool, device: torch.device | str):
    """A context that parks tensors saved for backward in (pinned) CPU memory when ``enabled``.

    Inside checkpointed layers the checkpoint's own hooks win, so what moves is what checkpointing
    keeps: the layer inputs, plus the final norm's and the loss's saved tensors.
    """
    if not enabled:
        return contextlib.nullcontext()
    pin = torch.device(device).type == "cuda"
    return torch.autograd.graph.save_on_cpu(pin_memory=pin)
