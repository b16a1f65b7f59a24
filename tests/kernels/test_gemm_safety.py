"""The backward's GEMMs on CUDA, made safe, with the CUDA-only logic exercised on the CPU.

* ``probe_addmm_out_dtype`` checks ``addmm(out_dtype=float32)`` with beta = 1 accumulation against a
  float64 product; fake addmm functions stand in for a correct, a 16-bit-accumulating, a
  ``c``-dropping and a failing cuBLAS.
* ``gemm_into`` takes the out_dtype path only where the probe passed, and otherwise upcasts and
  warns once (the CUDA device type is replaced by "cpu" here, with a fake addmm).
* ``gemm_numerics`` switches off 16-bit split-K reduction and keeps fp32 GEMMs IEEE whatever the
  global matmul precision, and restores every setting.
* fp16 scaling happens on the device: the loop makes no host synchronisation.
"""

import warnings

import pytest
import torch

from altpo_kernels import chunked_backward as cb
from altpo_kernels.reference import linear_logprobs_reference


def _fake_correct(out, a, b, out_dtype=None, *, beta, alpha, out_=None, **kw):
    torch.addmm(out, a.float(), b.float(), beta=beta, alpha=alpha, out=out)
    return out


def _call(fake):
    """Adapt a fake to addmm's calling convention (``out=`` keyword names the output)."""
    def addmm(c, a, b, out_dtype=None, *, beta=1.0, alpha=1.0, out=None):
        return fake(out, a, b, out_dtype, beta=beta, alpha=alpha)
    return addmm


def _fake_sixteen_bit_sum(out, a, b, out_dtype=None, *, beta, alpha):
    # products summed in the operands' 16-bit dtype, as a reduced-precision cuBLAS path would
    prod = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
    for k in range(a.shape[1]):
        prod = prod + a[:, k:k + 1] * b[k:k + 1, :]
    out.mul_(beta).add_(alpha * prod.float())


def _fake_drops_c(out, a, b, out_dtype=None, *, beta, alpha):
    out.copy_(alpha * (a.float() @ b.float()))


def _fake_raises(out, a, b, out_dtype=None, *, beta, alpha):
    raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasGemmEx")


def test_probe_passes_a_correct_addmm_and_fails_wrong_ones():
    assert cb.probe_addmm_out_dtype("cpu", addmm=_call(lambda o, a, b, d, beta, alpha:
                                                       _fake_correct(o, a, b, beta=beta, alpha=alpha))) == (True, "ok")
    ok, reason = cb.probe_addmm_out_dtype("cpu", addmm=_call(_fake_sixteen_bit_sum))
    assert not ok and "bound" in reason
    ok, reason = cb.probe_addmm_out_dtype("cpu", addmm=_call(_fake_drops_c))
    assert not ok and "bound" in reason
    ok, reason = cb.probe_addmm_out_dtype("cpu", addmm=_call(_fake_raises))
    assert not ok and "CUBLAS_STATUS_NOT_SUPPORTED" in reason


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """The CPU takes the CUDA code path of gemm_into, with a recording fake addmm."""
    calls = []

    def fake(c, a, b, out_dtype=None, *, beta=1.0, alpha=1.0, out=None):
        calls.append(out_dtype)
        if out_dtype is not None:
            torch.addmm(out, a.float(), b.float(), beta=beta, alpha=alpha, out=out)
        else:
            torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
        return out

    monkeypatch.setattr(cb, "OUT_DTYPE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(cb, "_addmm", fake)
    monkeypatch.setattr(cb, "_ADDMM_PROBE", {})
    return calls


def _operands(seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(19, 23, generator=g).to(dtype), torch.randn(23, 11, generator=g).to(dtype),
            torch.randn(19, 11, generator=g))


def test_gemm_uses_out_dtype_only_where_the_probe_passed(cpu_as_cuda):
    a, b, c = _operands(1)
    ref = c.double() + 0.25 * (a.double() @ b.double())
    out = c.clone()
    cb.gemm_into(out, a, b, alpha=0.25, accumulate=True)  # probes with the fake: passes
    assert cb.addmm_probe_results()["cpu"] == (True, "ok")
    assert cpu_as_cuda[-1] is torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    cb.set_addmm_probe_result("cpu", False, "injected")
    n_calls = len(cpu_as_cuda)
    out = c.clone()
    cb.gemm_into(out, a, b, alpha=0.25, accumulate=True)
    assert len(cpu_as_cuda) == n_calls  # fallback: upcast operands, plain torch.addmm
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_failed_probe_warns_once_and_the_backward_stays_right(cpu_as_cuda, monkeypatch):
    def broken(c, a, b, out_dtype=None, *, beta=1.0, alpha=1.0, out=None):
        if out_dtype is not None:
            _fake_sixteen_bit_sum(out, a, b, beta=beta, alpha=alpha)
            return out
        return torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)

    monkeypatch.setattr(cb, "_addmm", broken)
    g = torch.Generator().manual_seed(2)
    n, h, v = 29, 13, 41
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.rand(n, generator=g) + 0.1
    from altpo_kernels import torch_chunked

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _, lse = torch_chunked.logprobs_forward(hidden, weight, labels)
            dh, dw = torch_chunked.logprobs_backward(hidden, weight, labels, lse, upstream,
                                                     token_chunk=10, vocab_band=16)
    msgs = [str(w.message) for w in caught if "out_dtype" in str(w.message)]
    assert len(msgs) == 1 and "upcast" in msgs[0], msgs
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (linear_logprobs_reference(h64, w64, labels) * upstream.double()).sum().backward()
    for got, ref in ((dh, h64.grad), (dw, w64.grad)):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, err


def test_gemm_numerics_sets_and_restores(monkeypatch):
    m = torch.backends.cuda.matmul
    before = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction,
              torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")
    try:
        with cb.gemm_numerics(torch.float32, "cuda"):
            assert not m.allow_bf16_reduced_precision_reduction
            assert not m.allow_fp16_reduced_precision_reduction
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        assert m.allow_bf16_reduced_precision_reduction == before[0]
        with pytest.raises(KeyError):
            with cb.gemm_numerics(torch.bfloat16, "cuda"):
                assert torch.get_float32_matmul_precision() == "high"  # 16-bit: untouched
                raise KeyError("inside")
        assert m.allow_fp16_reduced_precision_reduction == before[1]
        monkeypatch.setattr(cb, "FP32_MATMUL_PRECISION", None)
        with cb.gemm_numerics(torch.float32, "cuda"):
            assert torch.get_float32_matmul_precision() == "high"  # follows the global setting
    finally:
        torch.set_float32_matmul_precision(before[2])


def test_fp32_backward_ignores_a_global_tf32_setting():
    """The producer and GEMMs of an fp32 backward run at "highest" even when the caller set
    "high"; the result matches float64 to fp32 accuracy."""
    seen = []
    from altpo_kernels import torch_chunked

    def spy(*args):
        seen.append(torch.get_float32_matmul_precision())
        return torch_chunked.produce_g(*args)

    g = torch.Generator().manual_seed(3)
    n, h, v = 23, 17, 37
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    labels, upstream = torch.randint(0, v, (n,), generator=g), torch.randn(n, generator=g)
    _, lse = torch_chunked.logprobs_forward(hidden, weight, labels)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        dh, dw = cb.chunked_logprobs_backward(hidden, weight, labels, lse, upstream, True, True,
                                              produce_g=spy, token_chunk=10, vocab_band=16)
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and set(seen) == {"highest"}
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (linear_logprobs_reference(h64, w64, labels) * upstream.double()).sum().backward()
    torch.testing.assert_close(dh.double(), h64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_fp16_backward_makes_no_host_synchronisation(monkeypatch):
    """The fp16 scale is found and applied on the device: no .item(), .tolist() or float() of a
    tensor inside the loop (a producer that returns 1 stands in for the backends)."""
    from altpo_kernels import torch_chunked

    g = torch.Generator().manual_seed(4)
    n, h, v = 31, 16, 45
    hidden = torch.randn(n, h, generator=g).to(torch.float16)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(torch.float16)
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = (torch.rand(n, generator=g) + 0.5) * 3e-5
    _, lse = torch_chunked.logprobs_forward(hidden, weight, labels)

    def producer(h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, band_start, out):
        z = h_chunk.float() @ w_band.float().T
        p = torch.exp(z - lse_chunk[:, None])
        cols = torch.arange(band_start, band_start + w_band.shape[0])
        onehot = (labels_chunk.long()[:, None] == cols[None, :]).float()
        out.copy_(g_chunk[:, None] * (onehot - p))
        return 1.0

    def forbid(*a, **k):
        raise AssertionError("host synchronisation inside the backward")

    monkeypatch.setattr(torch.Tensor, "item", forbid)
    monkeypatch.setattr(torch.Tensor, "tolist", forbid)
    monkeypatch.setattr(torch.Tensor, "__float__", forbid)
    dh, dw = cb.chunked_logprobs_backward(hidden, weight, labels, lse, upstream, True, True,
                                          produce_g=producer, token_chunk=9, vocab_band=16)
    monkeypatch.undo()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (linear_logprobs_reference(h64, w64, labels) * upstream.double()).sum().backward()
    for got, ref in ((dh, h64.grad), (dw, w64.grad)):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 3e-3, err


def test_fp16_scale_on_device_matches_the_rule():
    m = torch.tensor([3e-4, 0.0, 5.0, 1e-30, 1.0, 0.75, 2.0**-10, float("inf"), 65504.0])
    got = cb.fp16_scale(m).tolist()
    assert got == [2.0**25, 1.0, 2.0**11, 2.0**60, 2.0**14, 2.0**14, 2.0**24, 1.0, 0.25]
    g = torch.Generator().manual_seed(5)
    r = torch.exp(torch.randn(3000, generator=g) * 8)
    s = cb.fp16_scale(r)
    assert torch.all(r * s <= 2.0**14) and torch.all(r * s > 2.0**13)
