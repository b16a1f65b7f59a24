"""The cuda backend with the head transforms (LM-head bias, logit scale, final-logit soft-capping,
temperature) and the per-token entropy: torch.mm fp32 logits tiles, the transformed C ABI
epilogues (``altpo_forward_epilogue_tf`` / ``altpo_backward_epilogue_tf``) and the shared chunk
loop, against float64 autograd of ``reference.linear_logprobs_entropy_reference``.

On a CPU-only machine the epilogues run from the host build of the library (the same math header
the CUDA kernels compile); with a GPU, from the CUDA build. Chunks of 16 tokens and bands of 24
entries make N = 53, V = 101 walk 4 x 5 ragged tiles in both directions.
"""

import pytest
import torch

from csrc_build import backend_library_for_module  # noqa: F401  (autouse: loads the library)
from altpo_kernels import cuda_backend
from altpo_kernels.linear_logprobs import TransformedLogprobsFunction
from altpo_kernels.torch_chunked import HeadTransform
from conftest import kernel_device
from kernel_cases import HEAD_TRANSFORM_CASES, transformed_reference

N, H, V = 53, 29, 101
CHUNK, BAND = 16, 24
IGNORE = -100
CASES = HEAD_TRANSFORM_CASES


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Both directions walk 16-token chunks and 24-entry bands."""
    for name in ("transformed_forward", "transformed_backward"):
        real = getattr(cuda_backend, name)

        def small(*args, _real=real, **kwargs):
            kwargs.setdefault("token_chunk", CHUNK)
            kwargs.setdefault("vocab_band", BAND)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cuda_backend, name, small)


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = IGNORE
    a, c = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return [t.to(kernel_device()) for t in (hidden, weight, bias, labels, a, c)]


def _reference(hidden, weight, bias, labels, a, c, **tf):
    return transformed_reference(hidden, weight, bias, labels, a, c, ignore_index=IGNORE, **tf)


# 16-bit inputs are exact in float64; the gradients carry one 16-bit rounding of each G entry,
# so the absolute part of the tolerance is relative to the gradient's largest entry.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 4e-3), torch.float16: (2e-3, 1e-3)}


@pytest.mark.parametrize("case,dtype", [(c, d) for d in (torch.float32, torch.bfloat16) for c in CASES]
                         + [("all", torch.float16)])
def test_transformed_cuda_backend_matches_float64(case, dtype):
    tf = CASES[case]
    hidden, weight, bias, labels, a, c = _inputs(dtype, 200 + len(case) + 3 * (dtype != torch.float32)
                                                 + (dtype == torch.float16))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    logp, ent = TransformedLogprobsFunction.apply(h, w, b, labels, IGNORE, HeadTransform(**tf), "cuda",
                                                  True)
    ((logp * a).sum() + (ent * c).sum()).backward()
    ref = _reference(hidden, weight, bias, labels, a, c, **tf)
    rtol, rel = TOL[dtype]
    for got, want, what in zip((logp, ent, h.grad, w.grad, b.grad), ref, ("logp", "entropy", "dH", "dW", "db")):
        atol = rel if dtype == torch.float32 else max(rtol, rel * float(want.abs().max()))
        torch.testing.assert_close(got.detach().double().cpu(), want, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {m}")
    assert torch.all(logp[labels == IGNORE] == 0) and torch.all(h.grad[labels == IGNORE] == 0)


def test_without_entropy_and_bias_only_gradient():
    """entropy=False skips the entropy state (same log-probs); db alone is right."""
    tf = HeadTransform(**CASES["all"])
    hidden, weight, bias, labels, a, _ = _inputs(torch.float32, 301)
    rows = (labels != IGNORE).nonzero().squeeze(1)
    h, lab = hidden[rows], labels[rows]
    with_ent = cuda_backend.transformed_forward(h, weight, lab, bias, tf)
    without = cuda_backend.transformed_forward(h, weight, lab, bias, tf, entropy=False)
    assert without[1] is None and without[3] is None
    torch.testing.assert_close(without[0], with_ent[0], rtol=0, atol=0)
    b = bias.clone().requires_grad_()
    logp, _ = TransformedLogprobsFunction.apply(hidden, weight, b, labels, IGNORE, tf, "cuda", False)
    (logp * a).sum().backward()
    ref = _reference(hidden, weight, bias, labels, a, torch.zeros(N), **CASES["all"])
    torch.testing.assert_close(b.grad.double().cpu(), ref[4], rtol=2e-5, atol=2e-5)


def test_transformed_epilogue_errors():
    lib = cuda_backend.load_library("host") if kernel_device() == "cpu" else cuda_backend.load_library("cuda")
    dev = kernel_device()
    logits = torch.zeros(2, 4, device=dev)
    labels = torch.zeros(2, dtype=torch.int32, device=dev)
    m, s = torch.full((2,), float("-inf"), device=dev), torch.zeros(2, device=dev)
    rc = lib.altpo_forward_epilogue_tf(logits.data_ptr(), 2, 4, 4, labels.data_ptr(), 0, 0, 1.0, 1.0, 1,
                                       m.data_ptr(), s.data_ptr(), 0, s.data_ptr(), 0)
    assert rc == 1 and b"bias_band is null" in lib.altpo_last_error()
    rc = lib.altpo_forward_epilogue_tf(logits.data_ptr(), 2, 4, 4, labels.data_ptr(), 0, 0, 1.0, 1.0, 8,
                                       m.data_ptr(), s.data_ptr(), 0, s.data_ptr(), 0)
    assert rc == 1 and b"run_ent" in lib.altpo_last_error()
    rc = lib.altpo_forward_epilogue_tf(logits.data_ptr(), 2, 4, 4, labels.data_ptr(), 0, 0, 1.0, 1.0, 64,
                                       m.data_ptr(), s.data_ptr(), 0, s.data_ptr(), 0)
    assert rc == 1 and b"unknown transform flags" in lib.altpo_last_error()
