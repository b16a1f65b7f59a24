"""linear_logprobs: every backend against the float64 reference, values and both gradients."""

import zlib

import pytest
import torch

from altpo_kernels import linear_logprobs
from altpo_kernels.reference import linear_logprobs_reference
from conftest import kernel_device
from kernel_cases import random_linear_inputs

BACKENDS = ["torch", "triton"]
# fp32: accumulation-order differences only. bf16: inputs are exact in float64, so the only error
# is the kernel's own (fp32 accumulate, bf16 gradient output).
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}
# (N, H, V): none a multiple of any tile; one token; more vocab than one tile.
SHAPES = [(37, 19, 101), (1, 5, 7), (66, 33, 150)]


def _reference_and_grads(hidden, weight, labels, upstream):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    out = linear_logprobs_reference(h, w, labels)
    (out * upstream.double()).sum().backward()
    return out, h.grad, w.grad


def _run(backend, hidden, weight, labels, upstream):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = linear_logprobs(h, w, labels, backend=backend)
    (out * upstream).sum().backward()
    return out, h.grad, w.grad


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, shape):
    n, h, v = shape
    seed = zlib.crc32(repr((backend, dtype, shape)).encode()) % 10_000
    hidden, weight, labels = random_linear_inputs(n, h, v, dtype, kernel_device(), seed)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(hidden.device)
    ref, ref_dh, ref_dw = _reference_and_grads(hidden, weight, labels, upstream)
    out, dh, dw = _run(backend, hidden, weight, labels, upstream)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert dh.dtype == dtype and dw.dtype == dtype
    tol = TOL[dtype]
    _close(out, ref, TOL[torch.float32] if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4), "log-probs")
    _close(dh, ref_dh, tol, "d hidden")
    _close(dw, ref_dw, tol, "d weight")


@pytest.mark.parametrize("backend", ["torch"])
def test_fp16_matches_reference(backend):
    hidden, weight, labels = random_linear_inputs(29, 24, 90, torch.float16, kernel_device(), 7)
    upstream = torch.randn(29, generator=torch.Generator().manual_seed(8)).to(hidden.device)
    ref, ref_dh, ref_dw = _reference_and_grads(hidden, weight, labels, upstream)
    out, dh, dw = _run(backend, hidden, weight, labels, upstream)
    _close(out, ref, dict(rtol=1e-4, atol=1e-4), "log-probs")
    _close(dh, ref_dh, TOL[torch.float16], "d hidden")
    _close(dw, ref_dw, TOL[torch.float16], "d weight")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_ignored_tokens_give_zero_and_no_gradient(backend):
    hidden, weight, labels = random_linear_inputs(23, 12, 41, torch.float32, kernel_device(), 3, ignore_frac=0.0)
    labels[::3] = -100
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, weight, labels, backend=backend)
    assert torch.all(out[::3] == 0)
    assert torch.all(out[1::3] < 0)
    out.sum().backward()
    assert torch.all(h.grad[::3] == 0)
    assert torch.all(h.grad[1::3].abs().sum(1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored(backend):
    hidden, weight, labels = random_linear_inputs(9, 8, 20, torch.float32, kernel_device(), 5, ignore_frac=1.0)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = linear_logprobs(h, w, labels, backend=backend)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_custom_ignore_index():
    hidden, weight, labels = random_linear_inputs(15, 8, 20, torch.float32, "cpu", 11, ignore_frac=0.0)
    labels[:4] = 7  # a real token that happens to equal the custom ignore index
    out = linear_logprobs(hidden, weight, labels, ignore_index=7, backend="torch")
    ref = linear_logprobs_reference(hidden, weight, labels, ignore_index=7)
    assert torch.all(out[:4] == 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_only_weight_or_only_hidden_needs_grad():
    hidden, weight, labels = random_linear_inputs(21, 10, 33, torch.float32, "cpu", 13)
    upstream = torch.randn(21, generator=torch.Generator().manual_seed(14))
    _, ref_dh, ref_dw = _reference_and_grads(hidden, weight, labels, upstream)
    w = weight.clone().requires_grad_()
    (linear_logprobs(hidden, w, labels, backend="torch") * upstream).sum().backward()
    _close(w.grad, ref_dw, TOL[torch.float32], "d weight alone")
    h = hidden.clone().requires_grad_()
    (linear_logprobs(h, weight, labels, backend="torch") * upstream).sum().backward()
    _close(h.grad, ref_dh, TOL[torch.float32], "d hidden alone")


def test_torch_backend_tiles_cover_several_chunks(monkeypatch):
    """Shrink the torch backend's tiles so N and V each span several, with ragged last tiles."""
    from altpo_kernels import torch_chunked

    monkeypatch.setattr(torch_chunked, "TOKEN_CHUNK", 8)
    monkeypatch.setattr(torch_chunked, "VOCAB_CHUNK", 16)
    monkeypatch.setattr(torch_chunked, "BACKWARD_TOKEN_CHUNK", 9)
    monkeypatch.setattr(torch_chunked, "BACKWARD_VOCAB_BAND", 17)
    hidden, weight, labels = random_linear_inputs(45, 11, 77, torch.float32, "cpu", 17)
    upstream = torch.randn(45, generator=torch.Generator().manual_seed(18))
    ref, ref_dh, ref_dw = _reference_and_grads(hidden, weight, labels, upstream)
    out, dh, dw = _run("torch", hidden, weight, labels, upstream)
    _close(out, ref, TOL[torch.float32], "log-probs")
    _close(dh, ref_dh, TOL[torch.float32], "d hidden")
    _close(dw, ref_dw, TOL[torch.float32], "d weight")
