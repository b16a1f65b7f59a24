"""The Triton kernels with the head transforms compiled in (LM-head bias, logit scale, final-logit
soft-capping, temperature) and the per-token entropy, forward and backward, against float64
autograd of ``reference.linear_logprobs_entropy_reference`` on fresh random inputs.

Without CUDA these run under the Triton interpreter with 16-wide tiles. N = 53 tokens, H = 37 and
V = 101 make every loop of each kernel run more than once: 3 hidden slices per logits tile, 4 token
blocks, 7 vocabulary tiles (ragged last ones) spread over several forward splits and token groups;
the backward's chunk loop runs with 20-token chunks and 40-entry bands (3 x 3, ragged) and its
kernel with groups of 2 token blocks.
"""

import importlib

import pytest
import torch

from altpo_kernels import triton as triton_backend
from altpo_kernels.head_constants import fp16_output_scale
from altpo_kernels.linear_logprobs import linear_logprobs
from altpo_kernels.torch_chunked import HeadTransform
from conftest import kernel_device
from kernel_cases import HEAD_TRANSFORM_CASES, transformed_reference

N, H, V = 53, 37, 101
IGNORE = -100

CASES = HEAD_TRANSFORM_CASES


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """The chunk loop's token chunk and band, shrunk so that it crosses 3 x 3 (ragged) blocks."""
    bwd_module = importlib.import_module("altpo_kernels.triton.logprobs_backward")
    monkeypatch.setattr(bwd_module, "TOKEN_CHUNK", 20)
    monkeypatch.setattr(bwd_module, "VOCAB_BAND", 40)


def _inputs(dtype, seed, n=N, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, H, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    a = torch.randn(n, generator=g)
    c = torch.randn(n, generator=g)
    dev = kernel_device()
    return [t.to(dev) for t in (hidden, weight, bias, labels, a, c)]


def _reference(hidden, weight, bias, labels, a, c, **tf):
    return transformed_reference(hidden, weight, bias, labels, a, c, ignore_index=IGNORE, **tf)


# 16-bit inputs are exact in float64; the gradients carry one 16-bit rounding of each G entry (2**-9
# relative for bf16, 2**-12 for fp16) summed over tokens, plus the output's rounding, so the
# absolute part of the tolerance is relative to the gradient's largest entry.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 4e-3), torch.float16: (2e-3, 1e-3)}


def _check(got, want, dtype, what):
    rtol, rel_atol = TOL[dtype]
    atol = max(rtol, rel_atol * float(want.abs().max())) if dtype != torch.float32 else rel_atol
    torch.testing.assert_close(got.detach().double().cpu(), want, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# every case in fp32 and bf16; fp16 (whose G carries a power-of-two output scale,
# fp16_output_scale, undone in dH, dW and db) with every flag and with the constant factor
PUBLIC_CASES = [(case, dtype) for dtype in (torch.float32, torch.bfloat16) for case in CASES] + [
    ("all", torch.float16), ("temperature-scale", torch.float16)]


@pytest.mark.parametrize("case,dtype", PUBLIC_CASES)
def test_public_api_triton_matches_float64(case, dtype):
    """linear_logprobs(backend="triton") with bias and entropy: values and the gradients of
    hidden, weight and bias, with ignored tokens."""
    tf = CASES[case]
    hidden, weight, bias, labels, a, c = _inputs(dtype, 100 + len(case) + (dtype != torch.float32)
                                                 + 2 * (dtype == torch.float16))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    logp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True, backend="triton", **tf)
    ((logp * a).sum() + (ent * c).sum()).backward()
    ref = _reference(hidden, weight, bias, labels, a, c, **tf)
    for got, want, what in zip((logp, ent, h.grad, w.grad, b.grad), ref,
                               ("logp", "entropy", "dH", "dW", "db")):
        assert got.dtype == (torch.float32 if what in ("logp", "entropy") else dtype), what
        _check(got, want, dtype, what)
    ignored = labels == IGNORE
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(h.grad[ignored] == 0)


def test_fp16_output_scale_bound():
    # dscale 1, no entropy: the bound is 1, no scale
    assert fp16_output_scale(1.0, False, 1000) == 1.0
    # dscale 1.3 / 0.7 = 1.857: one halving
    assert fp16_output_scale(1.3 / 0.7, False, 1000) == 0.5
    # entropy at V = 128256: 1 + 1/e + log V = 13.1 -> 2**-4
    assert fp16_output_scale(1.0, True, 128256) == 2.0 ** -4
    # a small dscale gets headroom back: 0.1 -> 2**3
    assert fp16_output_scale(0.1, False, 1000) == 8.0
    # extreme constants stay within normal fp32 scales
    assert fp16_output_scale(1e-30, False, 1000) == 2.0 ** 60
    assert fp16_output_scale(1e30, True, 1000) == 2.0 ** -60


@pytest.mark.parametrize("splits,group_n", [(1, 1), (3, 2), (7, 4)])
def test_forward_kernel_splits_and_groups_with_every_flag(splits, group_n):
    """The forward kernel's split partials (max, sum, entropy state) combine exactly."""
    tf = CASES["all"]
    hidden, weight, bias, labels, _, _ = _inputs(torch.float32, 30 + splits, ignore_every=0)
    lp, ent, lse, mu = triton_backend.transformed_forward(
        hidden, weight, labels, bias, HeadTransform(**tf), vocab_splits=splits, group_n=group_n)
    ref_lp, ref_ent, *_ = _reference(hidden, weight, bias, labels, torch.zeros(N), None, **tf)
    _check(lp, ref_lp, torch.float32, "logp")
    _check(ent, ref_ent, torch.float32, "entropy")
    torch.testing.assert_close((lse - mu).double().cpu(), ref_ent, rtol=2e-5, atol=2e-5)
    # without entropy the kernels skip its state and give the same log-probs
    lp2, ent2, lse2, mu2 = triton_backend.transformed_forward(
        hidden, weight, labels, bias, HeadTransform(**tf), entropy=False, vocab_splits=splits,
        group_n=group_n)
    assert ent2 is None and mu2 is None
    torch.testing.assert_close(lp2, lp, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)


def test_logp_only_gradient_without_bias_and_one_sided():
    """No bias, no entropy output: the kernels run with the transform only; dH alone and dW alone
    match the full pass."""
    tf = CASES["all"]
    hidden, weight, _, labels, a, _ = _inputs(torch.float32, 41)
    ref = _reference(hidden, weight, None, labels, a, None, **tf)
    h = hidden.clone().requires_grad_()
    logp = linear_logprobs(h, weight, labels, backend="triton", **tf)
    (logp * a).sum().backward()
    _check(logp, ref[0], torch.float32, "logp")
    _check(h.grad, ref[2], torch.float32, "dH")
    w = weight.clone().requires_grad_()
    (linear_logprobs(hidden, w, labels, backend="triton", **tf) * a).sum().backward()
    _check(w.grad, ref[3], torch.float32, "dW")


def test_entropy_only_gradient_and_bias_only_gradient():
    tf = CASES["softcap-only"]
    hidden, weight, bias, labels, _, c = _inputs(torch.float32, 52)
    h = hidden.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    _, ent = linear_logprobs(h, weight, labels, bias=b, return_entropy=True, backend="triton", **tf)
    (ent * c).sum().backward()
    ref = _reference(hidden, weight, bias, labels, torch.zeros(N), c, **tf)
    _check(h.grad, ref[2], torch.float32, "dH")
    _check(b.grad, ref[4], torch.float32, "db")
    # only the bias needs a gradient: the loop still forms G, dH is dropped
    b2 = bias.clone().requires_grad_()
    _, ent = linear_logprobs(hidden, weight, labels, bias=b2, return_entropy=True,
                             backend="triton", **tf)
    (ent * c).sum().backward()
    _check(b2.grad, ref[4], torch.float32, "db alone")


def test_ignored_and_empty_inputs():
    hidden, weight, bias, labels, _, _ = _inputs(torch.float32, 61)
    h = hidden.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    none = torch.full_like(labels, IGNORE)
    lp, en = linear_logprobs(h, weight, none, bias=b, return_entropy=True, temperature=2.0,
                             backend="triton")
    assert torch.all(lp == 0) and torch.all(en == 0)
    (lp.sum() + en.sum()).backward()
    assert torch.all(h.grad == 0) and torch.all(b.grad == 0)
    lp, en = linear_logprobs(hidden[:0], weight, labels[:0], bias=bias, return_entropy=True,
                             backend="triton")
    assert lp.shape == (0,) and en.shape == (0,)
    # one real token among ignored ones
    one = none.clone()
    one[7] = 3
    h = hidden.clone().requires_grad_()
    lp, en = linear_logprobs(h, weight, one, bias=bias, return_entropy=True, softcap=3.0,
                             backend="triton")
    (lp.sum() + en.sum()).backward()
    ref = _reference(hidden, weight, bias, one, torch.ones(N), torch.ones(N), softcap=3.0)
    _check(lp, ref[0], torch.float32, "logp")
    _check(en, ref[1], torch.float32, "entropy")
    _check(h.grad, ref[2], torch.float32, "dH")


def test_auto_routes_transforms_to_the_fused_backend_on_cuda(monkeypatch):
    """``auto`` resolves like the plain path (triton on CUDA): the transformed call goes to the
    triton backend's kernels, not the torch path. Without a GPU the resolution is forced."""
    calls = []
    real = triton_backend.transformed_forward

    def spy(*args, **kwargs):
        calls.append("triton")
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "transformed_forward", spy)
    ll_module = importlib.import_module("altpo_kernels.linear_logprobs")
    monkeypatch.setattr(ll_module, "resolve_backend", lambda backend, device: "triton")
    hidden, weight, bias, labels, _, _ = _inputs(torch.float32, 71)
    logp = linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.5, backend="auto")
    assert calls == ["triton"]
    ref = _reference(hidden, weight, bias, labels, torch.zeros(N), None, temperature=0.5)
    _check(logp, ref[0], torch.float32, "logp")

