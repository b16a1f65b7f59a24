"""The C ABI's epilogues called through ctypes on torch tensors, against float64.

On a CPU-only machine they run the host build (build/pytest-host/libaltpo_csrc_host.so, built by
the fixture); with a GPU they run the CUDA library (build/libaltpo_csrc.so) on CUDA tensors.
Sizes are odd and tiles have padded rows (a stride larger than the width).
"""

import math

import pytest
import torch

import csrc_build
from altpo_kernels import cuda_backend
from conftest import kernel_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def library():
    with csrc_build.backend_library(kernel_device()) as lib:
        yield lib


def _padded_tile(values32, dtype, pad=3):
    """values32 [C, Vb] fp32 stored in dtype inside a wider buffer: rows have stride Vb + pad."""
    rows, cols = values32.shape
    buf = torch.full((rows, cols + pad), float("nan"), dtype=dtype, device=values32.device)
    tile = buf[:, :cols]
    tile.copy_(values32.to(dtype))
    return tile


def test_g_scale_rule_is_the_same_in_python_and_in_the_library(library):
    g = torch.Generator().manual_seed(7)
    exps = torch.empty(3000).uniform_(-90, 120, generator=g)
    values = [float(torch.tensor(2.0) ** e) for e in exps]
    values += [0.0, 1.0, 0.75, 1e-4, 65504.0, 1e-38, 3.0e38, math.inf, math.nan, 2.0 ** -149]
    for v in values:
        v32 = float(torch.tensor(v, dtype=torch.float32))
        for dtype in DTYPES:
            want = cuda_backend.g_scale(v32, dtype)
            got = library.altpo_g_scale(v32, cuda_backend._DTYPE_CODES[dtype])
            assert got == want, (v32, dtype, got, want)
            if dtype == torch.float16 and 2.0 ** -85 <= v32 <= 2.0 ** 114:
                assert 2.0 ** 14 <= v32 * want < 2.0 ** 15, v32


# Large (|z| ~ 3e4) and very negative logits only in fp32: 16-bit tiles cannot hold values near
# 1e4 that differ by a few units.
FORWARD_CASES = [(dt, 0.0, 2.0) for dt in DTYPES] + [(dt, 0.0, 1e-3) for dt in DTYPES] + [
    (torch.float32, 3e4, 30.0), (torch.float32, -8e3, 5.0), (torch.float32, 0.0, 60.0)]


@pytest.mark.parametrize("tile_dtype, offset, spread", FORWARD_CASES)
def test_forward_epilogue_matches_float64(tile_dtype, offset, spread):
    dev = kernel_device()
    g = torch.Generator().manual_seed(int(abs(offset)) + 3)
    rows, vocab, band = 13, 203, 48  # bands of 48, the last one 11 wide
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[:6] = torch.tensor([0, vocab - 1, band - 1, band, 2 * band - 1, 4 * band])  # band edges
    labels32 = labels.to(torch.int32).to(dev)
    run_max = torch.full((rows,), float("-inf"), device=dev)
    run_sum = torch.zeros(rows, device=dev)
    picked = torch.full((rows,), -123.0, device=dev)
    seen = []
    for v0 in range(0, vocab, band):
        cols = min(band, vocab - v0)
        z32 = (offset + spread * torch.randn(rows, cols, generator=g)).to(dev)
        tile = _padded_tile(z32, tile_dtype)
        cuda_backend.forward_epilogue(tile, labels32, v0, run_max, run_sum, picked)
        seen.append(tile.double().cpu())
    z = torch.cat(seen, dim=1)
    ref_lse = torch.logsumexp(z, dim=1)
    got_lse = run_max.double().cpu() + torch.log(run_sum.double().cpu())
    torch.testing.assert_close(got_lse, ref_lse, rtol=2e-6, atol=2e-5)
    assert torch.equal(picked.double().cpu(), z.gather(1, labels[:, None]).squeeze(1))


@pytest.mark.parametrize("in_dtype, out_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
])
@pytest.mark.parametrize("g_size", [1.0, 1e-5, 3e4])
def test_backward_epilogue_matches_float64(in_dtype, out_dtype, g_size):
    dev = kernel_device()
    g = torch.Generator().manual_seed(int(g_size * 1e5) % 1000 + 11)
    rows, cols, band_start = 9, 77, 140
    z = (0.5 + 2.0 * torch.randn(rows, cols, generator=g)).to(dev)
    tile = _padded_tile(z, in_dtype)
    labels = band_start + torch.randint(0, cols, (rows,), generator=g)
    labels[:4] = torch.tensor([band_start, band_start + cols - 1, band_start - 1, band_start + cols])
    lse = (math.log(cols * 40.0) + 2.0 + torch.rand(rows, generator=g)).to(dev)
    signs = torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0)
    upstream = g_size * torch.empty(rows).uniform_(0.2, 1.0, generator=g) * signs
    upstream[1] = 0.0  # a row with zero gradient
    upstream = upstream.to(dev)
    scale = cuda_backend.g_scale(float(upstream.abs().max()), out_dtype)
    in_place = in_dtype == out_dtype and in_dtype != torch.float32
    out = tile if in_place else _padded_tile(torch.zeros(rows, cols, device=dev), out_dtype, pad=5)
    zin = tile.double().cpu()
    cuda_backend.backward_epilogue(tile, out, labels.to(torch.int32).to(dev), band_start, lse, upstream, scale)

    onehot = (torch.arange(cols)[None, :] + band_start == labels[:, None]).double()
    want = upstream.double().cpu()[:, None] * scale * (onehot - torch.exp(zin - lse.double().cpu()[:, None]))
    got = out.double().cpu()
    # One rounding to the output dtype (half an ulp: 2^-9 bf16, 2^-11 fp16) on top of fp32 math.
    rel = {torch.float32: 4e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}[out_dtype]
    floor = 2.0 ** -24 if out_dtype == torch.float16 else 0.0
    err = (got - want).abs() - rel * want.abs() - floor
    assert err.max() <= 1e-6 * upstream.abs().max().item() * scale, f"worst excess {err.max():.3g}"
    assert torch.all(got[1] == 0), "zero-gradient rows must give exact zeros"
    nonzero_rows = upstream.cpu() != 0
    if out_dtype == torch.float16:
        # the scale keeps every entry of a nonzero row representable: none flushes to zero
        assert bool((got[nonzero_rows] != 0).all())
        assert got.abs().max() <= 2.0 ** 15


def test_sixteen_bit_rounding_matches_torch():
    """The library's own float -> fp16/bf16 conversion gives torch's round-to-nearest-even result:
    with g = 1, scale = 1 and lse = +inf-free values, an fp32 tile of -exp(z - lse) is rounded once."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(99)
    rows, cols = 7, 301
    # Values spread over fp16's subnormal and normal range and bf16's whole range.
    z = torch.empty(rows, cols).uniform_(-25.0, 11.0, generator=g).to(dev)
    lse = torch.zeros(rows, device=dev)
    ones = torch.ones(rows, device=dev)
    labels = torch.full((rows,), -1, dtype=torch.int32, device=dev)
    for out_dtype in (torch.float16, torch.bfloat16):
        out = torch.empty(rows, cols, dtype=out_dtype, device=dev)
        cuda_backend.backward_epilogue(z.contiguous(), out, labels, 0, lse, ones, 1.0)
        fp32 = -torch.exp(z)  # the library's fp32 value up to an ulp of expf
        want = fp32.to(out_dtype)
        ulps = (out.float() - want.float()).abs() / (want.float().abs() * 2.0 ** -10).clamp_min(2.0 ** -24)
        assert ulps.max() <= 1.0, f"{out_dtype}: off by {ulps.max():.2f} ulp"
        assert (out == want).float().mean() > 0.99, f"{out_dtype}: too many entries differ from torch"


def test_epilogue_errors_name_the_problem():
    dev = kernel_device()
    z = torch.randn(4, 10, device=dev)
    ints = torch.zeros(4, dtype=torch.int32, device=dev)
    vec = torch.zeros(4, device=dev)
    with pytest.raises(cuda_backend.CsrcLibraryError, match="partly overlaps"):
        buf = torch.randn(4 * 10 + 5, device=dev)
        cuda_backend.backward_epilogue(buf[:40].view(4, 10), buf[5:45].view(4, 10), ints, 0, vec, vec, 1.0)
    with pytest.raises(cuda_backend.CsrcLibraryError, match="dtype or row stride differs"):
        raw = torch.zeros(4, 10, device=dev)
        cuda_backend.backward_epilogue(raw, raw.view(torch.bfloat16)[:, :10], ints, 0, vec, vec, 1.0)
    with pytest.raises(ValueError, match="labels must be a contiguous torch.int32"):
        cuda_backend.forward_epilogue(z, ints.long(), 0, vec, vec.clone(), vec.clone())
    with pytest.raises(ValueError, match="contiguous rows"):
        cuda_backend.forward_epilogue(z.T, ints, 0, vec, vec.clone(), vec.clone())
