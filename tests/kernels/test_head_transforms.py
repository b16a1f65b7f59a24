"""linear_logprobs with an LM-head bias, logit scale, final-logit soft-capping, temperature and
per-token entropy, against float64 autograd of the materialised transformed logits.

The torch backend's tiled path runs with tiles shrunk to 16 tokens x 24 vocabulary entries, so
N = 53 and V = 101 cross several token chunks and vocabulary tiles (ragged last ones).
"""

import pytest
import torch

from altpo_kernels import torch_chunked
from altpo_kernels.linear_logprobs import linear_logprobs
from altpo_kernels.reference import linear_logprobs_entropy_reference

N, H, V = 53, 19, 101


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(torch_chunked, "TRANSFORM_TOKEN_CHUNK", 16)
    monkeypatch.setattr(torch_chunked, "TRANSFORM_VOCAB_CHUNK", 24)


def _inputs(dtype, seed, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.8).to(dtype)
    bias = (torch.randn(V, generator=g) * 2).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    a = torch.randn(N, generator=g)
    c = torch.randn(N, generator=g)
    return hidden, weight, bias, labels, a, c


def _reference(hidden, weight, bias, labels, a, c, **tf):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logp, ent = linear_logprobs_entropy_reference(h, w, labels, bias=b, **tf)
    ((logp * a.double()).sum() + (ent * c.double()).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, (b.grad if b is not None else None)


CASES = {
    "all": dict(temperature=0.7, logit_scale=1.3, softcap=4.0),
    "softcap-only": dict(softcap=2.5),
    "temperature-scale": dict(temperature=1.9, logit_scale=0.45),
    "identity": dict(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_transforms_and_entropy_match_float64(case, dtype):
    tf = CASES[case]
    hidden, weight, bias, labels, a, c = _inputs(dtype, 10 + len(case) + (dtype == torch.bfloat16))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    logp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True, backend="torch", **tf)
    ((logp * a).sum() + (ent * c).sum()).backward()
    ref = _reference(hidden, weight, bias, labels, a, c, **tf)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, want, what in zip((logp, ent, h.grad, w.grad, b.grad), ref,
                               ("logp", "entropy", "dH", "dW", "db")):
        assert got.dtype == (torch.float32 if what in ("logp", "entropy") else dtype), what
        torch.testing.assert_close(got.detach().double(), want, **tol, msg=lambda m: f"{what}: {m}")
    assert torch.all(logp[labels == -100] == 0) and torch.all(ent[labels == -100] == 0)
    assert torch.all(h.grad[labels == -100] == 0)
    assert ent[labels != -100].min() > 0


def test_without_bias_and_logp_only_and_auto():
    hidden, weight, _, labels, a, _ = _inputs(torch.float32, 3, with_bias=False)
    tf = CASES["all"]
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, labels, backend="auto", **tf)  # auto picks the torch path
    (logp * a).sum().backward()
    ref = _reference(hidden, weight, None, labels, a, torch.zeros(N), **tf)
    torch.testing.assert_close(logp.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref[3], rtol=1e-5, atol=1e-5)
    # the reference backend returns the same float64 values, rounded to fp32
    got_ref = linear_logprobs(hidden, weight, labels, backend="reference", **tf)
    torch.testing.assert_close(got_ref.double(), ref[0], rtol=1e-6, atol=1e-6)


def test_entropy_only_gradient_and_all_ignored():
    hidden, weight, bias, labels, _, c = _inputs(torch.float32, 4)
    h = hidden.clone().requires_grad_()
    _, ent = linear_logprobs(h, weight, labels, bias=bias, return_entropy=True, softcap=3.0)
    (ent * c).sum().backward()
    ref = _reference(hidden, weight, bias, labels, torch.zeros(N), c, softcap=3.0)
    torch.testing.assert_close(h.grad.double(), ref[2], rtol=1e-5, atol=1e-5)
    # every token ignored: zeros, and zero gradients
    none = torch.full((N,), -100)
    h2 = hidden.clone().requires_grad_()
    lp, en = linear_logprobs(h2, weight, none, bias=bias, return_entropy=True, temperature=2.0)
    assert torch.all(lp == 0) and torch.all(en == 0)
    (lp.sum() + en.sum()).backward()
    assert torch.all(h2.grad == 0)
    # empty input
    lp, en = linear_logprobs(hidden[:0], weight, labels[:0], return_entropy=True)
    assert lp.shape == (0,) and en.shape == (0,)


def test_clear_errors():
    hidden, weight, bias, labels, _, _ = _inputs(torch.float32, 5)
    with pytest.raises(ValueError, match='backend="cuda" runs its epilogue kernels on CUDA tensors'):
        linear_logprobs(hidden, weight, labels, backend="cuda", temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        linear_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be None or a positive"):
        linear_logprobs(hidden, weight, labels, softcap=-1.0)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \[V\]"):
        linear_logprobs(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="bias.to\\(weight\\)"):
        linear_logprobs(hidden, weight, labels, bias=bias.double())
