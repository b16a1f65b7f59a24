"""altpo_loss: every backend against the float64 reference (values, both gradients, normalisers)."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from altpo_kernels import AltPOLoss, altpo_loss
from altpo_kernels.reference import altpo_loss_reference, linear_logprobs_reference
from conftest import kernel_device
from kernel_cases import random_packed_batch

BACKENDS = ["torch", "triton"]
FIELDS = ("hidden", "weight", "labels", "seq_ids", "win_seqs", "lose_seqs", "retain_seqs",
          "ref_win_logps", "ref_lose_logps")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _args(batch, **overrides):
    b = {**batch, **overrides}
    return [b[k] for k in FIELDS]


def _reference(batch, **kw):
    b = dict(batch)
    h = b["hidden"].detach().double().requires_grad_()
    w = b["weight"].detach().double().requires_grad_()
    out = altpo_loss_reference(*_args(b, hidden=h, weight=w), **kw)
    out["loss"].backward()
    return out, h.grad, w.grad


def _fused(batch, backend, **kw):
    h = batch["hidden"].detach().clone().requires_grad_()
    w = batch["weight"].detach().clone().requires_grad_()
    out = altpo_loss(*_args(batch, hidden=h, weight=w), backend=backend, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def _check(out, dh, dw, ref, ref_dh, ref_dw, dtype):
    tol = TOL[dtype]
    value_tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for name in ("loss", "forget_loss", "retain_loss", "win_logps", "lose_logps"):
        torch.testing.assert_close(getattr(out, name).double().cpu(), ref[name].detach().cpu(),
                                   **value_tol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(dh.double().cpu(), ref_dh.cpu(), **tol, msg=lambda m: f"d hidden: {m}")
    torch.testing.assert_close(dw.double().cpu(), ref_dw.cpu(), **tol, msg=lambda m: f"d weight: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(seq_lens=[5, 9, 3, 12, 7, 6], pairs=4, h=24, v=67),
    dict(seq_lens=[11, 1, 8, 2, 13, 4, 9], pairs=5, h=17, v=130),
])
def test_matches_reference(backend, dtype, case):
    seed = zlib.crc32(repr((backend, dtype, case)).encode()) % 10_000
    batch = random_packed_batch(case["seq_lens"], case["pairs"], case["h"], case["v"], dtype,
                                kernel_device(), seed)
    kw = dict(beta=0.5, alpha=2.0, gamma=1.0)
    ref, ref_dh, ref_dw = _reference(batch, **kw)
    out, dh, dw = _fused(batch, backend, **kw)
    assert dh.dtype == dtype and dw.dtype == dtype
    _check(out, dh, dw, ref, ref_dh, ref_dw, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_retain_gives_zero_retain_loss(backend):
    batch = random_packed_batch([6, 8, 5, 9], 3, 16, 45, torch.float32, kernel_device(), 21, retain=0)
    assert batch["retain_seqs"].numel() == 0
    ref, ref_dh, ref_dw = _reference(batch)
    out, dh, dw = _fused(batch, backend)
    assert float(out.retain_loss) == 0.0
    _check(out, dh, dw, ref, ref_dh, ref_dw, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_two_calls_with_step_normalisers_equal_one_call(backend):
    """An optimizer step split over two micro-batches gives the one-call loss and gradients."""
    device = kernel_device()
    a = random_packed_batch([7, 5, 9, 4], 2, 16, 50, torch.float32, device, 31, retain=1)
    b = random_packed_batch([6, 8, 3, 10, 5], 3, 16, 50, torch.float32, device, 32, retain=2)
    b["weight"] = a["weight"]
    offset = int(a["seq_ids"].max()) + 1
    joined = {
        "hidden": torch.cat([a["hidden"], b["hidden"]]),
        "weight": a["weight"],
        "labels": torch.cat([a["labels"], b["labels"]]),
        "seq_ids": torch.cat([a["seq_ids"], b["seq_ids"] + offset]),
        "win_seqs": torch.cat([a["win_seqs"], b["win_seqs"] + offset]),
        "lose_seqs": torch.cat([a["lose_seqs"], b["lose_seqs"] + offset]),
        "retain_seqs": torch.cat([a["retain_seqs"], b["retain_seqs"] + offset]),
        "ref_win_logps": torch.cat([a["ref_win_logps"], b["ref_win_logps"]]),
        "ref_lose_logps": torch.cat([a["ref_lose_logps"], b["ref_lose_logps"]]),
    }
    one, one_dh, one_dw = _fused(joined, backend)
    pairs, retain_tokens = one.num_pairs, one.num_retain_tokens
    assert pairs == 5 and retain_tokens > 0

    w = a["weight"].detach().clone().requires_grad_()
    grads_h, total = [], 0.0
    for part in (a, b):
        h = part["hidden"].detach().clone().requires_grad_()
        out = altpo_loss(*_args(part, hidden=h, weight=w), num_pairs=pairs,
                         num_retain_tokens=retain_tokens, backend=backend)
        out.loss.backward()
        total = total + out.loss.detach()
        grads_h.append(h.grad)
    torch.testing.assert_close(total, one.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads_h), one_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, one_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_alpha_zero_is_plain_dpo(backend):
    """With alpha=0 and gamma=beta/2 the loss is DPO's -mean log sigmoid(beta * delta)."""
    batch = random_packed_batch([8, 6, 9, 7, 5], 4, 20, 60, torch.float32, kernel_device(), 41)
    beta = 0.3
    out = altpo_loss(*_args(batch), beta=beta, alpha=0.0, gamma=beta / 2, backend=backend)
    token = linear_logprobs_reference(batch["hidden"], batch["weight"], batch["labels"])
    seq = torch.zeros(int(batch["seq_ids"].max()) + 1, dtype=torch.float64,
                      device=token.device).index_add_(0, batch["seq_ids"], token)
    chosen = seq[batch["win_seqs"]] - batch["ref_win_logps"].double()
    rejected = seq[batch["lose_seqs"]] - batch["ref_lose_logps"].double()
    dpo = -F.logsigmoid(beta * (chosen - rejected)).mean()
    torch.testing.assert_close(out.loss.double(), dpo, rtol=1e-5, atol=1e-5)


def test_shared_lose_sequence_gradient_adds_up():
    """A lose sequence used by two pairs gets the sum of both pairs' gradients."""
    batch = random_packed_batch([6, 7, 8, 5], 2, 12, 40, torch.float32, "cpu", 51, retain=0)
    batch["win_seqs"] = torch.tensor([1, 2])
    batch["lose_seqs"] = torch.tensor([3, 3])
    ref, ref_dh, _ = _reference(batch)
    out, dh, _ = _fused(batch, "torch")
    lose_rows = batch["seq_ids"] == 3
    torch.testing.assert_close(dh[lose_rows].double(), ref_dh[lose_rows], rtol=1e-5, atol=1e-6)
    # each pair alone gives half of the shared gradient's parts; together they add
    parts = []
    for i in range(2):
        single = dict(batch, win_seqs=batch["win_seqs"][i:i + 1], lose_seqs=batch["lose_seqs"][i:i + 1],
                      ref_win_logps=batch["ref_win_logps"][i:i + 1],
                      ref_lose_logps=batch["ref_lose_logps"][i:i + 1])
        _, dh_i, _ = _fused(single, "torch", num_pairs=2)
        parts.append(dh_i[lose_rows])
    torch.testing.assert_close(parts[0] + parts[1], dh[lose_rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, value", [("beta", 0.7), ("alpha", 1.5), ("gamma", 0.8)])
def test_module_form_uses_each_of_its_settings(name, value):
    """The module forwards to the function, so comparing the two at one setting proves little: a
    module that dropped a setting would still agree at the defaults. Each setting alone must move
    the loss away from the defaults' and the module must follow."""
    batch = random_packed_batch([5, 9, 6, 4], 3, 16, 48, torch.float32, "cpu", 61)
    default = altpo_loss(*_args(batch), backend="torch").loss
    changed = altpo_loss(*_args(batch), backend="torch", **{name: value}).loss
    assert not torch.allclose(changed, default)  # this setting matters on this batch
    module = AltPOLoss(backend="torch", **{name: value})
    torch.testing.assert_close(module(*_args(batch)).loss, changed)
    assert f"{name}={value}" in repr(module)
