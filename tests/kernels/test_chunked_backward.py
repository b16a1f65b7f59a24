"""The chunked backward (vocabulary bands x token chunks) of every backend against float64.

Chunk and tile sizes are shrunk so that small shapes cross every loop several times: H = 37 is
three 16-wide hidden slices of the Triton tiles, N = 53 tokens in chunks of 20 are three chunks
(the last ragged, each chunk two ragged 16-row tiles), V = 101 in bands of 36 are three bands
(each three ragged 16-wide tiles). None of the sizes is a multiple of a tile. Without CUDA the
triton backend runs under the Triton interpreter.
"""

import pytest
import torch

from altpo_kernels import linear_logprobs, torch_chunked
from altpo_kernels.chunked_backward import (
    chunk_scales,
    chunk_sizes,
    chunked_logprobs_backward,
    default_vocab_band,
    workspace_bytes,
)
from altpo_kernels.reference import linear_logprobs_reference
from altpo_kernels.triton import logprobs_backward as triton_backward
from conftest import kernel_device

N, H, V = 53, 37, 101
CHUNK, BAND = 20, 36
BACKWARDS = {"torch": torch_chunked.logprobs_backward, "triton": triton_backward}
# The gradients carry one 16-bit rounding of G and of the result. Under the interpreter the fp32
# -> bf16 cast truncates instead of rounding to nearest (GPU code rounds), doubling bf16's error.
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _inputs(dtype, seed, n=N, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2.0).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    # labels in every band, including each band's first and last entry
    labels[:6] = torch.tensor([0, BAND - 1, BAND, 2 * BAND - 1, 2 * BAND, v - 1])
    upstream = torch.randn(n, generator=g)
    dev = kernel_device()
    return hidden.to(dev), weight.to(dev), labels.to(dev), upstream.to(dev)


def _reference(hidden, weight, labels, upstream):
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    (linear_logprobs_reference(h, w, labels.cpu()) * upstream.cpu().double()).sum().backward()
    lse = torch.logsumexp(h.detach() @ w.detach().T, dim=1)
    return lse, h.grad, w.grad


def _lse(hidden, weight, labels):
    return torch_chunked.logprobs_forward(hidden, weight, labels)[1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_loop_several_times_matches_float64(backend, dtype):
    hidden, weight, labels, upstream = _inputs(dtype, {torch.float32: 1, torch.bfloat16: 2,
                                                       torch.float16: 3}[dtype])
    assert chunk_sizes(N, V, CHUNK, BAND) == (CHUNK, BAND)
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    dh, dw = BACKWARDS[backend](hidden, weight, labels, _lse(hidden, weight, labels), upstream,
                                True, True, token_chunk=CHUNK, vocab_band=BAND)
    assert dh.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(dh.double().cpu(), ref_dh, **TOL[dtype], msg=lambda m: f"dH: {m}")
    torch.testing.assert_close(dw.double().cpu(), ref_dw, **TOL[dtype], msg=lambda m: f"dW: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_chunk_writes_each_band_once(backend, monkeypatch):
    """All tokens in one chunk: dW bands come straight from one GEMM each, no accumulator."""
    hidden, weight, labels, upstream = _inputs(torch.bfloat16, 4)
    allocated = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        allocated.append((tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list))
                          else shape, kw.get("dtype")))
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    dh, dw = BACKWARDS[backend](hidden, weight, labels, _lse(hidden, weight, labels), upstream,
                                True, True, token_chunk=N + 10, vocab_band=BAND)
    monkeypatch.undo()
    assert not any(shape == (BAND, H) and dt == torch.float32 for shape, dt in allocated), allocated
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    torch.testing.assert_close(dh.double().cpu(), ref_dh, **TOL[torch.bfloat16])
    torch.testing.assert_close(dw.double().cpu(), ref_dw, **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_gradient_rows_and_one_sided_gradients(backend):
    """Rows with g = 0 (a whole chunk of them, and scattered ones) contribute nothing; need_dh /
    need_dw alone give the same values as both together."""
    hidden, weight, labels, upstream = _inputs(torch.float32, 5)
    upstream[CHUNK:2 * CHUNK] = 0.0
    upstream[::7] = 0.0
    lse = _lse(hidden, weight, labels)
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    run = BACKWARDS[backend]
    dh, none_w = run(hidden, weight, labels, lse, upstream, True, False, token_chunk=CHUNK,
                     vocab_band=BAND)
    none_h, dw = run(hidden, weight, labels, lse, upstream, False, True, token_chunk=CHUNK,
                     vocab_band=BAND)
    assert none_w is None and none_h is None
    assert torch.all(dh[upstream == 0] == 0)
    torch.testing.assert_close(dh.double().cpu(), ref_dh, **TOL[torch.float32])
    torch.testing.assert_close(dw.double().cpu(), ref_dw, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ignored_rows_and_ignored_rows_across_chunks(backend, monkeypatch):
    """Through the public API with shrunk chunks: ignored rows get no gradient, an all-ignored
    input gives zero gradients, and the rest matches float64."""
    import importlib

    monkeypatch.setattr(torch_chunked, "BACKWARD_TOKEN_CHUNK", CHUNK)
    monkeypatch.setattr(torch_chunked, "BACKWARD_VOCAB_BAND", BAND)
    tb = importlib.import_module("altpo_kernels.triton.logprobs_backward")

    monkeypatch.setattr(tb, "TOKEN_CHUNK", CHUNK)
    monkeypatch.setattr(tb, "VOCAB_BAND", BAND)
    hidden, weight, labels, upstream = _inputs(torch.float32, 6, n=N + 12)
    labels[3:15] = -100  # a run of ignored rows inside the first chunk
    labels[-5:] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (linear_logprobs(h, w, labels, backend=backend) * upstream).sum().backward()
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    assert torch.all(h.grad[labels == -100] == 0)
    torch.testing.assert_close(h.grad.double().cpu(), ref_dh, **TOL[torch.float32])
    torch.testing.assert_close(w.grad.double().cpu(), ref_dw, **TOL[torch.float32])

    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    out = linear_logprobs(h2, w2, torch.full_like(labels, -100), backend=backend)
    (out * upstream).sum().backward()
    assert torch.all(out == 0) and torch.all(h2.grad == 0) and torch.all(w2.grad == 0)


def test_empty_input_gives_zero_gradients():
    hidden, weight, labels, upstream = _inputs(torch.bfloat16, 7)
    empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
    dh, dw = chunked_logprobs_backward(hidden[:0], weight, labels[:0], empty, empty, True, True,
                                       produce_g=torch_chunked.produce_g)
    assert dh.shape == (0, H) and dw.shape == (V, H) and torch.all(dw == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_two_backwards_are_bit_identical(backend, dtype):
    hidden, weight, labels, upstream = _inputs(dtype, 8)
    lse = _lse(hidden, weight, labels)
    first = BACKWARDS[backend](hidden, weight, labels, lse, upstream, True, True,
                               token_chunk=CHUNK, vocab_band=BAND)
    second = BACKWARDS[backend](hidden, weight, labels, lse, upstream, True, True,
                                token_chunk=CHUNK, vocab_band=BAND)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].abs().sum() > 0 and first[1].abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_small_upstream_gradients_keep_relative_accuracy(backend):
    """Retain-token coefficients ~1e-4 times small probabilities fall below fp16's normal range;
    the per-chunk power-of-two scale keeps them. Errors relative to the gradient's own size."""
    hidden, weight, labels, upstream = _inputs(torch.float16, 9)
    upstream = upstream * 2e-4
    lse = _lse(hidden, weight, labels)
    dh, dw = BACKWARDS[backend](hidden, weight, labels, lse, upstream, True, True,
                                token_chunk=CHUNK, vocab_band=BAND)
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    # (A chunk with far smaller coefficients gets its own scale, but its gradients would then sit
    # in fp16's subnormal range in the fp16 outputs, so the rule itself is checked separately.)
    for got, ref, what in ((dh, ref_dh, "dH"), (dw, ref_dw, "dW")):
        scale = ref.abs().max()
        assert scale > 0
        err = (got.double().cpu() - ref).abs().max() / scale
        assert err < 3e-3, f"{what}: max error {err:.3g} of the gradient's scale"


def test_fp16_scale_rule():
    g = torch.tensor([1e-4, -3e-4, 0.0, 0.0, 5.0, -2.0, 1e-30])
    scales = chunk_scales(g, 2, torch.float16)
    # chunk max |g|: 3e-4 -> 2**14 / 2**-11 = 2**25; 0 -> 1; 5 -> 2**(14-3); 1e-30 -> capped 2**60
    # (what each chunk alone would get; the loop applies one scale, that of the largest)
    assert scales == [2.0**25, 1.0, 2.0**11, 2.0**60]
    for s, chunk in zip(scales, g.split(2)):
        assert s * chunk.abs().max() <= 2.0**14
    assert chunk_scales(g, 2, torch.bfloat16) == [1.0] * 4


def test_workspace_formula_at_llama3_shape():
    """H=2048, V=128256 bf16 with the default chunk and band: at most 64 MiB of tiles."""
    mib = 2**20
    fused = workspace_bytes(16384, 2048, 128256, torch.bfloat16)
    # Vb = 4096: G tile 4096 x 4096 x 2 B, dW band accumulator 4096 x 2048 x 4 B, int32 labels
    assert fused == 4096 * 4096 * 2 + 4096 * 2048 * 4 + 16384 * 4
    assert fused - 16384 * 4 <= 64 * mib
    assert workspace_bytes(16384, 2048, 128256, torch.bfloat16, backend="torch") == \
        fused + 1024 * 4096 * 4
    # one chunk: no dW accumulator, so the band doubles to 8192
    assert workspace_bytes(4096, 2048, 128256, torch.bfloat16) == 4096 * 8192 * 2 + 4096 * 4
    # without dW the band is 8192 and there is no accumulator
    assert workspace_bytes(16384, 2048, 128256, torch.bfloat16, need_dw=False) == \
        4096 * 8192 * 2 + 16384 * 4
    # fp16 always accumulates dW in fp32 (its G carries the scale), one chunk included
    assert workspace_bytes(4096, 2048, 128256, torch.float16) == \
        4096 * 4096 * 2 + 4096 * 2048 * 4 + 4096 * 4


def test_default_vocab_band_formula():
    """Largest power of two in [1024, 8192] with G tile + dW accumulator <= 64 MiB, at most V."""
    b = default_vocab_band
    assert b(16384, 2048, 128256, torch.bfloat16) == 4096     # (8 + 8) KiB an entry
    assert b(4096, 2048, 128256, torch.bfloat16) == 8192      # one chunk: 8 KiB an entry
    assert b(16384, 2048, 128256, torch.float32) == 4096      # 16 KiB an entry, fp32 dW in place
    assert b(16384, 8192, 128256, torch.bfloat16) == 1024     # 40 KiB an entry: floor
    assert b(16384, 2048, 128256, torch.bfloat16, need_dw=False) == 8192
    assert b(53, 37, 101, torch.float32) == 101               # never more than V
    assert chunk_sizes(16384, 128256, h=2048, dtype=torch.bfloat16) == (4096, 4096)
    assert chunk_sizes(16384, 128256, 4096, 2048) == (4096, 2048)  # an explicit band wins
    # off CUDA: 2048 whatever the shape (the CPU's caches favour small tiles)
    assert b(16384, 2048, 128256, torch.bfloat16, device_type="cpu") == 2048
    assert chunk_sizes(4096, 32000, h=256, dtype=torch.float32, device_type="cpu") == (4096, 2048)
    assert workspace_bytes(4096, 256, 32000, torch.float32, backend="torch", device="cpu") == \
        4096 * 2048 * 4 + 4096 * 4 + 1024 * 2048 * 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_single_chunk_accumulates_dw_in_fp32(backend):
    """fp16, all tokens in one chunk, small upstream gradients: dW goes through the fp32
    accumulator (a direct fp16 GEMM output would hold the scaled sums) and matches float64."""
    hidden, weight, labels, upstream = _inputs(torch.float16, 10)
    upstream = upstream * 3e-4
    dh, dw = BACKWARDS[backend](hidden, weight, labels, _lse(hidden, weight, labels), upstream,
                                True, True, token_chunk=N + 10, vocab_band=BAND)
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    for got, ref, what in ((dh, ref_dh, "dH"), (dw, ref_dw, "dW")):
        err = (got.double().cpu() - ref).abs().max() / ref.abs().max()
        assert err < 3e-3, f"{what}: max error {err:.3g} of the gradient's scale"
