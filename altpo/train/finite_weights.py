"""Never write non-finite weights: the check that runs before every checkpoint and the final model.

A step whose loss and gradient norm were finite can still throw the weights to inf or NaN (an
absurd learning rate, an overflow in bf16). Saving them would make a checkpoint that looks good
and resumes into NaN, so the run stops instead and names the last checkpoint that was finite.
"""

from __future__ import annotations

import torch

from altpo.train.report import NonFiniteLossError


def non_finite_tensors(model) -> list[str]:
    """Names of the parameters and buffers of ``model`` that hold a NaN or an infinity."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
    return bad


def check_finite_weights(model, step: int, what: str, last_checkpoint) -> None:
    """Raise :class:`NonFiniteLossError` before ``what`` is written when a weight is not finite."""
    bad = non_finite_tensors(model)
    if not bad:
        return
    where = (f"the last finite checkpoint is {last_checkpoint} (continue with --resume after "
             "changing what caused it)" if last_checkpoint else
             "no checkpoint was written before it")
    raise NonFiniteLossError(
        f"the weights became non-finite after step {step} ({len(bad)} tensor(s), e.g. "
        f"{', '.join(bad[:3])}) although the loss and gradient norm were finite; {what} was not "
        f"written; {where}. Lower --lr, or train in fp32 weights (--dtype fp32)")
