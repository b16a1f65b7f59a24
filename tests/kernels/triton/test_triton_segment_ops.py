"""The AltPO epilogue's Triton kernels (segment sums, coefficient gather) against plain loops.

Without CUDA these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the interpreter's tiles are 16 tokens wide and 4 sequences tall, so the sizes below span several
token blocks (ragged last one) and several sequence tiles of the atomic-free segment sum.
"""

import pytest
import torch

from altpo_kernels.altpo_loss import SegmentSumFunction
from altpo_kernels.torch_chunked import masked_segment_sum
from altpo_kernels.torch_chunked import segment_sum as torch_segment_sum
from altpo_kernels.triton import gather_segments, segment_sum
from altpo_kernels.triton.segment_ops import _segment_sum_kernel
from conftest import kernel_device


def _loop_segment_sum(values, seq_ids, num_seqs):
    """Independent float64 reference: one Python loop over tokens."""
    out = [0.0] * num_seqs
    for v, s in zip(values.double().tolist(), seq_ids.tolist()):
        out[s] += v
    return torch.tensor(out, dtype=torch.float64)


def _packed_ids(lengths):
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("layout", ["packed", "shuffled", "one_sequence"])
def test_segment_sum_matches_loop(layout):
    g = torch.Generator().manual_seed({"packed": 1, "shuffled": 2, "one_sequence": 3}[layout])
    if layout == "packed":
        # Sequences back to back as packing makes them, lengths crossing block edges, and
        # sequence 4 absent (no tokens) so its sum must stay 0.
        seq_ids = _packed_ids([7, 20, 1, 13, 0, 12])
    elif layout == "shuffled":
        seq_ids = torch.randint(0, 9, (53,), generator=g)
    else:
        seq_ids = torch.zeros(37, dtype=torch.long)
    num_seqs = int(seq_ids.max()) + 3  # trailing sequences with no tokens
    values = torch.randn(seq_ids.numel(), generator=g) * 3 - 1
    device = kernel_device()
    out = segment_sum(values.to(device), seq_ids.to(device), num_seqs)
    ref = _loop_segment_sum(values, seq_ids, num_seqs)
    assert out.dtype == torch.float32 and out.shape == (num_seqs,)
    # fp32 sums in a fixed order: error bounded by a few ulps of the running sums.
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-6, atol=1e-5)
    assert torch.all(out[num_seqs - 2:].cpu() == 0)


def test_segment_sum_accepts_int32_ids_and_empty_input():
    g = torch.Generator().manual_seed(4)
    seq_ids = torch.randint(0, 5, (29,), generator=g)
    values = torch.rand(29, generator=g) + 0.5
    device = kernel_device()
    out = segment_sum(values.to(device), seq_ids.to(torch.int32).to(device), 5)
    torch.testing.assert_close(out.double().cpu(), _loop_segment_sum(values, seq_ids, 5),
                               rtol=1e-6, atol=1e-5)
    empty = segment_sum(torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device), 4)
    assert empty.shape == (4,) and torch.all(empty == 0)


def test_gather_segments_matches_indexing():
    g = torch.Generator().manual_seed(5)
    seq_ids = _packed_ids([3, 17, 9, 1, 22])
    seq_ids = seq_ids[torch.randperm(seq_ids.numel(), generator=g)]
    seq_values = torch.randn(6, generator=g) * 5
    device = kernel_device()
    out = gather_segments(seq_values.to(device), seq_ids.to(device))
    expected = torch.tensor([seq_values[s].item() for s in seq_ids.tolist()])
    assert out.dtype == torch.float32 and out.shape == seq_ids.shape
    assert torch.equal(out.cpu(), expected)  # a gather copies values exactly
    assert gather_segments(seq_values.to(device), torch.empty(0, dtype=torch.long, device=device)).numel() == 0


def test_segment_sum_gradient_is_the_gather():
    """The autograd function's backward hands each token its sequence's incoming gradient."""
    g = torch.Generator().manual_seed(6)
    seq_ids = _packed_ids([5, 11, 18, 4])
    device = kernel_device()
    values = (torch.randn(seq_ids.numel(), generator=g)).to(device).requires_grad_()
    weights = torch.randn(4, generator=g).to(device)
    sums = SegmentSumFunction.apply(values, seq_ids.to(device), 4, "triton")
    (sums * weights).sum().backward()
    expected = weights.cpu()[seq_ids]
    torch.testing.assert_close(values.grad.cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(sums.double().detach().cpu(),
                               _loop_segment_sum(values.detach().cpu(), seq_ids, 4),
                               rtol=1e-6, atol=1e-5)


def test_segment_sum_spans_many_sequence_tiles_and_is_repeatable():
    """23 sequences (6 tiles of 4 under the interpreter, one 32-wide tile on a GPU) over 150
    tokens; two calls give bit-identical sums (on a GPU this is the no-atomics property)."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 13, (23,), generator=g).tolist()
    seq_ids = _packed_ids(lengths)
    values = torch.randn(seq_ids.numel(), generator=g) * 2 + 0.3
    device = kernel_device()
    first = segment_sum(values.to(device), seq_ids.to(device), 23)
    second = segment_sum(values.to(device), seq_ids.to(device), 23)
    torch.testing.assert_close(first.double().cpu(), _loop_segment_sum(values, seq_ids, 23),
                               rtol=1e-6, atol=1e-5)
    assert torch.equal(first, second)
    assert torch.all(first.cpu()[torch.tensor(lengths) == 0] == 0)


def test_segment_sum_kernel_has_no_atomic_add():
    """The source-level half of the no-atomics rule (the SASS half is in test_triton_compile)."""
    import inspect
    src = inspect.getsource(_segment_sum_kernel.fn if hasattr(_segment_sum_kernel, "fn")
                            else _segment_sum_kernel)
    assert "atomic" not in src.replace("atomics", "")


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_masked_segment_sum_matches_loop(chunk):
    """The torch backend's CUDA segment sum (atomic-free, chunked), run here on the CPU with
    chunks from one token to all of them; shuffled ids and empty sequences."""
    g = torch.Generator().manual_seed(8 + chunk)
    seq_ids = torch.randint(0, 11, (61,), generator=g)
    values = torch.randn(61, generator=g) * 4 - 1
    out = masked_segment_sum(values, seq_ids, 13, chunk)
    torch.testing.assert_close(out.double(), _loop_segment_sum(values, seq_ids, 13),
                               rtol=1e-6, atol=1e-5)
    assert torch.equal(out, masked_segment_sum(values, seq_ids, 13, chunk))
    assert masked_segment_sum(values[:0], seq_ids[:0], 3, chunk).tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(torch_segment_sum(values, seq_ids, 13).double(),
                               _loop_segment_sum(values, seq_ids, 13), rtol=1e-6, atol=1e-5)
