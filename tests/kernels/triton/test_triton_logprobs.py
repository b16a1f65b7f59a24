"""Triton log-prob kernels called directly: vocabulary splits, fp16, one-sided gradients, tiny
upstream gradients. Everything is compared with the float64 reference.

Without CUDA these run under the Triton interpreter with 16-wide tiles; shapes are chosen so that
N, H and V are not multiples of 16 and V spans several tiles.
"""

import pytest
import torch

from altpo_kernels.reference import linear_logprobs_reference
from altpo_kernels.triton import logprobs_backward, logprobs_forward
from altpo_kernels.triton.logprobs_forward import program_order, token_group, vocab_split
from conftest import kernel_device
from kernel_cases import random_linear_inputs


def _reference(hidden, weight, labels, upstream):
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    logp = linear_logprobs_reference(h, w, labels.cpu())
    (logp * upstream.cpu().double()).sum().backward()
    lse = torch.logsumexp(h.detach() @ w.detach().T, dim=1)
    return logp.detach(), lse, h.grad, w.grad


def _inputs(n, h, v, dtype, seed):
    hidden, weight, labels = random_linear_inputs(n, h, v, dtype, kernel_device(), seed, ignore_frac=0.0)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(hidden.device)
    return hidden, weight, labels, upstream


@pytest.mark.parametrize("splits", [1, 2, 3, 50])
def test_forward_vocabulary_splits_combine_exactly(splits):
    """Any number of splits (3 leaves a short last split; 50 is clamped to one tile each)."""
    hidden, weight, labels, upstream = _inputs(21, 18, 83, torch.float32, 20 + splits)
    logp, lse = logprobs_forward(hidden, weight, labels, vocab_splits=splits)
    ref_logp, ref_lse, _, _ = _reference(hidden, weight, labels, upstream)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=1e-5, atol=2e-5)


def test_vocab_split_covers_the_vocabulary():
    # (n_tokens, vocab, block_n, block_v, slots) -> hand-checked choices on 132 SMs
    # 32 token blocks x 1002 tiles: 4 splits of 251 tiles = 128 programs in one wave (cost 251
    # tile-times; the best, 53 splits in 13 waves, costs 247: within 4 %, so fewer splits win)
    assert vocab_split(4096, 128256, 128, 128, 132) == (4, 32128)
    assert vocab_split(16384, 128256, 128, 128, 132) == (1, 128256)  # 128 blocks: one wave already
    assert vocab_split(100_000, 32000, 128, 128, 132) == (1, 32000)
    # 3 tiles on 2 slots: 1 split costs 3, 2 or 3 splits cost 2; the fewest at that cost is 2
    assert vocab_split(10, 40, 16, 16, 2) == (2, 32)
    for n, v in [(1, 7), (33, 1000), (4096, 128256), (5000, 151936)]:
        splits, per = vocab_split(n, v, 128, 128, 132)
        assert per % 128 == 0 and splits * per >= v and (splits - 1) * per < v


@pytest.mark.parametrize("group_n,splits", [(1, 1), (2, 3), (3, 2), (4, 1), (50, 2)])
def test_forward_grouped_grid_covers_every_block_and_split(group_n, splits):
    """The grouped 1-D grid: groups of 1 to 4 token blocks (5 blocks of 16: the last group ragged)
    and more than all, with 1 to 3 splits, against float64."""
    hidden, weight, labels, upstream = _inputs(77, 19, 61, torch.float32, 60 + 7 * group_n + splits)
    logp, lse = logprobs_forward(hidden, weight, labels, vocab_splits=splits, group_n=group_n)
    ref_logp, ref_lse, _, _ = _reference(hidden, weight, labels, upstream)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=1e-5, atol=2e-5)


def test_program_order_is_a_bijection_in_groups():
    for n, block, splits, group in [(77, 16, 3, 2), (16384, 128, 5, 32), (4096, 128, 4, 32),
                                    (1000, 128, 7, 3), (5, 16, 1, 1)]:
        blocks = -(-n // block)
        seen = [program_order(p, n, block, splits, group) for p in range(blocks * splits)]
        assert sorted(seen) == [(b, s) for b in range(blocks) for s in range(splits)]
        # the first group_n * splits programs touch only the first group_n token blocks
        first = seen[: min(group, blocks) * splits]
        assert {b for b, _ in first} == set(range(min(group, blocks)))
    with pytest.raises(ValueError, match="group_n"):
        hidden, weight, labels, _ = _inputs(5, 4, 9, torch.float32, 1)
        logprobs_forward(hidden, weight, labels, group_n=0)


def test_token_group_and_l2_split_floor():
    # H = 2048 bf16, 128-token blocks: 512 KiB each; 16 MiB of them = 32 blocks
    assert token_group(16384, 2048, 128, 2, 132) == 32
    assert token_group(4096, 2048, 128, 2, 132) == 32
    assert token_group(100, 2048, 128, 2, 132) == 1
    assert token_group(16384, 8192, 128, 4, 132) == 4  # 4 MiB blocks
    # N = 16384: at least ceil(132 / 32) = 5 splits; 5 splits of 201 tiles: 640 programs in 5
    # waves = 1005 tile-times (6 splits: 6 waves x 167 = 1002, within 4 %, so the fewer splits win)
    assert vocab_split(16384, 128256, 128, 128, 132, min_splits=5) == (5, 201 * 128)
    # the floor never exceeds the tile count
    assert vocab_split(10, 40, 16, 16, 2, min_splits=9) == (3, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_forward_and_backward(dtype):
    hidden, weight, labels, upstream = _inputs(35, 27, 70, dtype, 31 if dtype == torch.float16 else 41)
    logp, lse = logprobs_forward(hidden, weight, labels)
    dh, dw = logprobs_backward(hidden, weight, labels, lse, upstream, True, True)
    ref_logp, _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    assert dh.dtype == dtype and dw.dtype == dtype
    # Inputs are exact in float64; the log-probs carry fp32 accumulation only, the gradients one
    # 16-bit rounding of (onehot - softmax) in the dots plus the final cast.
    torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dh.double().cpu(), ref_dh, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dw.double().cpu(), ref_dw, rtol=1e-2, atol=1e-2)


def test_one_sided_gradients_match_the_full_pass():
    """need_dh / need_dw each compile a separate kernel variant; both must give the same values."""
    hidden, weight, labels, upstream = _inputs(19, 20, 45, torch.float32, 51)
    _, lse = logprobs_forward(hidden, weight, labels)
    _, _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    dh_only, none_w = logprobs_backward(hidden, weight, labels, lse, upstream, True, False)
    none_h, dw_only = logprobs_backward(hidden, weight, labels, lse, upstream, False, True)
    assert none_w is None and none_h is None
    torch.testing.assert_close(dh_only.double().cpu(), ref_dh, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dw_only.double().cpu(), ref_dw, rtol=1e-5, atol=2e-5)


def test_small_upstream_gradients_keep_relative_accuracy_in_fp16():
    """Retain tokens carry coefficients ~alpha / n_retain (1e-4 .. 1e-3). In fp16 the products
    with softmax entries sit near the subnormal range, so the kernel keeps the per-token scale
    out of the 16-bit operands; the gradients must stay accurate relative to their own size."""
    hidden, weight, labels, upstream = _inputs(23, 17, 52, torch.float16, 61)
    upstream = upstream * 2e-4
    _, lse = logprobs_forward(hidden, weight, labels)
    dh, dw = logprobs_backward(hidden, weight, labels, lse, upstream, True, True)
    _, _, ref_dh, ref_dw = _reference(hidden, weight, labels, upstream)
    # Relative to the gradient's own scale: absolute tolerances would pass anything this small.
    # Measured: ~3e-4 for both; the bound leaves room for fp16 output rounding.
    for got, ref, what in ((dh, ref_dh, "dH"), (dw, ref_dw, "dW")):
        scale = ref.abs().max()
        assert scale > 0
        err = (got.double().cpu() - ref).abs().max() / scale
        assert err < 2e-3, f"{what}: max error {err:.3g} of the gradient's scale"
