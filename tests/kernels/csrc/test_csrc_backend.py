"""The cuda backend end to end: torch.mm logits tiles + the C ABI epilogues + the chunk loop,
against the float64 reference (values and both gradients, ignored tokens, zero gradients, tiny
fp16 gradients, one-sided gradients), and its error messages.

On a CPU-only machine the epilogues run from the host build of the library; with a GPU, from the
CUDA build. Token chunks and vocabulary bands are made small so that every test walks several
of each, with ragged last ones.
"""

import sys
import types

import pytest
import torch

import csrc_build
from csrc_build import backend_library_for_module  # noqa: F401  (autouse: loads the library)
from altpo_kernels import cuda_backend
from altpo_kernels.backends import resolve_backend
from altpo_kernels.linear_logprobs import LinearLogprobsFunction
from altpo_kernels.reference import linear_logprobs_reference
from conftest import kernel_device
from kernel_cases import random_linear_inputs


# ------------------------------------------------------------------------------------------------
# STAND-IN for altpo_kernels.chunked_backward.chunked_logprobs_backward, the shared chunk loop that
# is written separately. It follows the same interface and is installed only while that module is
# missing; once it exists these tests run the real loop instead.
def _standin_chunked_logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh, need_dw, *,
                                       produce_g, token_chunk=None, vocab_band=None):
    n, width = hidden.shape
    vocab = weight.shape[0]
    token_chunk = token_chunk or 16
    vocab_band = vocab_band or 24
    dh = torch.zeros(n, width, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.zeros(vocab, width, dtype=torch.float32, device=hidden.device) if need_dw else None
    labels32 = labels.to(torch.int32)
    for v0 in range(0, vocab, vocab_band):
        v1 = min(vocab, v0 + vocab_band)
        for t0 in range(0, n, token_chunk):
            t1 = min(n, t0 + token_chunk)
            out = torch.empty(t1 - t0, v1 - v0, dtype=hidden.dtype, device=hidden.device)
            scale = produce_g(hidden[t0:t1], weight[v0:v1], labels32[t0:t1], lse[t0:t1],
                              grad_logp[t0:t1], v0, out)
            g_tile = out.float()
            if need_dh:
                dh[t0:t1] += (g_tile @ weight[v0:v1].float()) / scale
            if need_dw:
                dw[v0:v1] += (g_tile.T @ hidden[t0:t1].float()) / scale
    return (dh.to(hidden.dtype) if need_dh else None, dw.to(weight.dtype) if need_dw else None)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def chunk_loop(monkeypatch):
    """The real chunk loop when present, else the stand-in above; chunks small either way."""
    try:
        from altpo_kernels import chunked_backward
        loop = chunked_backward.chunked_logprobs_backward
    except ImportError:
        chunked_backward = types.ModuleType("altpo_kernels.chunked_backward")
        loop = _standin_chunked_logprobs_backward
        monkeypatch.setitem(sys.modules, "altpo_kernels.chunked_backward", chunked_backward)

    def small_chunks(*args, **kwargs):
        kwargs.setdefault("token_chunk", 16)
        kwargs.setdefault("vocab_band", 24)
        return loop(*args, **kwargs)

    monkeypatch.setattr(chunked_backward, "chunked_logprobs_backward", small_chunks, raising=False)


def _reference(hidden, weight, labels, upstream, ignore_index=-100):
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    logp = linear_logprobs_reference(h, w, labels.cpu(), ignore_index)
    (logp * upstream.cpu().double()).sum().backward()
    return logp.detach(), h.grad, w.grad


def _inputs(n, h, v, dtype, seed, ignore_frac=0.0):
    hidden, weight, labels = random_linear_inputs(n, h, v, dtype, kernel_device(), seed, ignore_frac=ignore_frac)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(hidden.device)
    return hidden, weight, labels, upstream


def _relative_error(got, ref):
    return ((got.double().cpu() - ref).abs().max() / ref.abs().max()).item()


# fp32 runs fp32 GEMMs throughout; 16-bit inputs add one rounding of G (and of the outputs).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_backward_match_float64(dtype):
    seed = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}[dtype]
    hidden, weight, labels, upstream = _inputs(37, 23, 101, dtype, seed)
    logp, lse = cuda_backend.logprobs_forward(hidden, weight, labels, token_chunk=16, vocab_band=24)
    dh, dw = cuda_backend.logprobs_backward(hidden, weight, labels, lse, upstream, True, True)
    ref_logp, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    ref_lse = torch.logsumexp(hidden.double().cpu() @ weight.double().cpu().T, dim=1)
    # The logits are fp32 products of the inputs as given (16-bit inputs are exact in fp32).
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=1e-5, atol=2e-5)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert _relative_error(dh, ref_dh) < TOLERANCE[dtype]
    assert _relative_error(dw, ref_dw) < TOLERANCE[dtype]


def test_small_upstream_gradients_keep_relative_accuracy_in_fp16():
    """Retain-token coefficients are ~1e-4; g * softmax would sit near fp16's subnormal range
    without the chunk scale. Errors are measured against the gradient's own size."""
    hidden, weight, labels, upstream = _inputs(29, 19, 66, torch.float16, 5)
    upstream = upstream * 2e-4
    _, lse = cuda_backend.logprobs_forward(hidden, weight, labels, token_chunk=16, vocab_band=24)
    dh, dw = cuda_backend.logprobs_backward(hidden, weight, labels, lse, upstream, True, True)
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    assert _relative_error(dh, ref_dh) < 3e-3
    assert _relative_error(dw, ref_dw) < 3e-3


def test_one_sided_gradients():
    hidden, weight, labels, upstream = _inputs(21, 17, 50, torch.float32, 8)
    _, lse = cuda_backend.logprobs_forward(hidden, weight, labels, token_chunk=16, vocab_band=24)
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    dh, no_dw = cuda_backend.logprobs_backward(hidden, weight, labels, lse, upstream, True, False)
    no_dh, dw = cuda_backend.logprobs_backward(hidden, weight, labels, lse, upstream, False, True)
    assert no_dw is None and no_dh is None
    assert _relative_error(dh, ref_dh) < 2e-5 and _relative_error(dw, ref_dw) < 2e-5
    assert cuda_backend.logprobs_backward(hidden, weight, labels, lse, upstream, False, False) == (None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_with_ignored_tokens_and_zero_gradients(dtype):
    """Through LinearLogprobsFunction: ignored rows are dropped before the backend, rows with zero
    upstream gradient are dropped in backward, and the scattered results match the reference."""
    hidden, weight, labels, upstream = _inputs(45, 21, 77, dtype, 13, ignore_frac=0.3)
    upstream[::4] = 0.0
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = LinearLogprobsFunction.apply(h, w, labels, -100, "cuda")
    (logp * upstream).sum().backward()
    ref_logp, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=1e-5, atol=2e-5)
    assert bool((logp[labels == -100] == 0).all())
    assert bool((h.grad[(labels == -100) | (upstream == 0)] == 0).all())
    assert _relative_error(h.grad, ref_dh) < TOLERANCE[dtype]
    assert _relative_error(w.grad, ref_dw) < TOLERANCE[dtype]


def test_all_tokens_ignored_gives_zeros():
    hidden, weight, labels, upstream = _inputs(9, 8, 30, torch.float32, 21)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = LinearLogprobsFunction.apply(h, w, labels, -100, "cuda")
    (logp * upstream).sum().backward()
    assert bool((logp == 0).all()) and bool((h.grad == 0).all()) and bool((w.grad == 0).all())


@pytest.mark.parametrize("g_size", [1e-3, 1e-7])
def test_producer_returns_the_chunk_scale_and_fills_the_tile(g_size):
    """produce_g on its own: the scale comes from the chunk's max|g| (also when g_chunk is not a
    slice of the vector the producer was made with) and out / scale equals G in float64. At
    g ~ 1e-7, G rounded to fp16 without the scale would lose most of its entries."""
    hidden, weight, labels, upstream = _inputs(12, 10, 40, torch.float16, 31)
    upstream = upstream * g_size
    lse = torch.logsumexp(hidden.float() @ weight.float().T, dim=1)
    produce = cuda_backend.make_g_producer(upstream)
    labels32 = labels.to(torch.int32)
    z = hidden[3:11].double() @ weight[20:35].double().T
    onehot = (torch.arange(20, 35, device=hidden.device)[None, :] == labels[3:11, None]).double()
    want = (upstream[3:11].double()[:, None] * (onehot - torch.exp(z - lse[3:11].double()[:, None]))).cpu()
    for g_chunk in (upstream[3:11], upstream[3:11].clone()):
        out = torch.empty(8, 15, dtype=torch.float16, device=hidden.device)
        scale = produce(hidden[3:11], weight[20:35], labels32[3:11], lse[3:11], g_chunk, 20, out)
        assert scale == cuda_backend.g_scale(float(upstream[3:11].abs().max()), torch.float16)
        assert 2.0 ** 14 <= float(upstream[3:11].abs().max()) * scale < 2.0 ** 15
        assert _relative_error(out.double() / scale, want) < 2e-3
    if g_size < 1e-6:
        assert _relative_error(want.to(torch.float16), want) > 0.05  # what the scale avoids


# ------------------------------------------------------------------------------------------------
# Selection and errors


def test_cuda_backend_refuses_cpu_tensors_and_auto_never_picks_it():
    with pytest.raises(ValueError, match='backend="cuda" runs its epilogue kernels on CUDA tensors'):
        resolve_backend("cuda", torch.device("cpu"))
    from altpo_kernels import linear_logprobs
    h, w, lab = random_linear_inputs(4, 6, 10, torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match='use backend="torch" on the CPU'):
        linear_logprobs(h, w, lab, backend="cuda")
    for dev in ("cpu", "cuda"):
        assert resolve_backend("auto", torch.device(dev)) != "cuda"


def test_missing_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_backend, "_LOADED", {})
    monkeypatch.delenv("ALTPO_CSRC_LIB", raising=False)
    monkeypatch.setattr(cuda_backend, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(cuda_backend, "__file__", str(tmp_path / "altpo_kernels" / "cuda_backend.py"))
    with pytest.raises(cuda_backend.CsrcLibraryError, match=r"not built .*cmake -S \. -B build && cmake --build build"):
        cuda_backend.load_library("cuda")
    assert "cuda: absent" in cuda_backend.library_status()
    monkeypatch.setenv("ALTPO_CSRC_LIB", str(tmp_path / "nowhere.so"))
    with pytest.raises(cuda_backend.CsrcLibraryError, match="ALTPO_CSRC_LIB=.*is not a file"):
        cuda_backend.load_library("cuda")


def test_the_wrong_build_is_refused(monkeypatch):
    """The host build placed where the CUDA build belongs is named as such, not used."""
    monkeypatch.setattr(cuda_backend, "_LOADED", {})
    monkeypatch.setenv("ALTPO_CSRC_LIB", str(csrc_build.host_library()))
    with pytest.raises(cuda_backend.CsrcLibraryError, match="not the cuda build"):
        cuda_backend.load_library("cuda")
