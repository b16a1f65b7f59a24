"""Bad AltPO hyper-parameters and integer reference log-probs are refused with a message that
names the argument (not its shape), before any work, by the function and the nn.Module form."""

import math

import pytest
import torch

from altpo_kernels import AltPOLoss, altpo_loss
from kernel_cases import random_packed_batch

FIELDS = ("hidden", "weight", "labels", "seq_ids", "win_seqs", "lose_seqs", "retain_seqs",
          "ref_win_logps", "ref_lose_logps")


@pytest.fixture
def batch():
    return random_packed_batch([5, 7, 6, 8], 3, 12, 30, torch.float32, "cpu", 3)


NOT_FINITE = "must be a finite number"
BETA_RANGE = r"must lie in \(0, 1e\+06\]"
WEIGHT_RANGE = r"must lie in \[0, 1e\+06\]"


@pytest.mark.parametrize("name, value, message", [
    ("beta", math.nan, NOT_FINITE), ("beta", math.inf, NOT_FINITE), ("beta", 0.0, BETA_RANGE),
    ("beta", -0.5, BETA_RANGE), ("beta", 1e38, BETA_RANGE),
    ("alpha", math.nan, NOT_FINITE), ("alpha", math.inf, NOT_FINITE), ("alpha", -1.0, WEIGHT_RANGE),
    ("gamma", math.nan, NOT_FINITE), ("gamma", -0.5, WEIGHT_RANGE), ("gamma", 1e300, WEIGHT_RANGE),
])
def test_bad_hyperparameters_are_named(batch, name, value, message):
    """Each value is refused by the check named in ``message`` (a NaN is not blamed on a range)."""
    with pytest.raises(ValueError, match=f"^{name} {message}"):
        altpo_loss(*[batch[k] for k in FIELDS], backend="torch", **{name: value})
    with pytest.raises(ValueError, match=f"^{name} {message}"):
        AltPOLoss(backend="torch", **{name: value})


@pytest.mark.parametrize("which", ["ref_win_logps", "ref_lose_logps"])
def test_integer_reference_logprobs_blame_the_dtype(batch, which):
    bad = {**batch, which: batch[which].round().long()}
    with pytest.raises(ValueError, match=f"{which} must hold floating-point log-probs.*int64"):
        altpo_loss(*[bad[k] for k in FIELDS], backend="torch")


def _grads(batch, alpha):
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    out = altpo_loss(hidden, *[batch[k] for k in FIELDS[1:]], backend="torch", alpha=alpha)
    out.loss.backward()
    retain = torch.isin(batch["seq_ids"], batch["retain_seqs"]) & (batch["labels"] != -100)
    return out, hidden.grad, retain


def test_zero_alpha_is_allowed_and_gives_retain_tokens_no_gradient(batch):
    """Not "loss == forget_loss" (that holds by the loss's definition whatever alpha does): with
    alpha 0 no retain token may get a gradient, while forget tokens do; with alpha > 0 they do."""
    out, grad, retain = _grads(batch, 0.0)
    assert torch.isfinite(out.loss) and bool(retain.any())
    assert bool((grad[retain] == 0).all())
    assert float(grad[~retain].abs().max()) > 0
    _, grad_half, _ = _grads(batch, 0.5)
    assert float(grad_half[retain].abs().max()) > 0  # the check above can fail
