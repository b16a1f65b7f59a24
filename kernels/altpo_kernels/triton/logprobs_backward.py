"""Backward of the fused linear log-prob: a Triton G producer inside the shared chunk loop.

The loop (``altpo_kernels.chunked_backward``) walks vocabulary bands and token chunks; for each it
calls :func:`produce_g`, whose kernel recomputes the ``[C, Vb]`` block of logits on the tensor cores
(the same ``logits_tile`` as the forward, fp32 accumulation) and writes

    G = g * (onehot(label) - exp(z - lse))

as one 16-bit (or fp32, for fp32 inputs) tile into the loop's workspace. cuBLAS, through torch,
then does ``dH += G @ W_band`` and ``dW_band += G^T @ H_chunk`` with fp32 accumulation.

Why this split rather than one kernel doing everything: a kernel that also formed dH and dW had to
sum them over tiles with fp32 atomics (about 1.7e10 reductions at N=16384, H=2048, V=128256, no
overlap with the MMAs, a run-to-run varying order), and it kept a 16-bit copy of the tile in
registers as a wgmma operand across a loop that later reused those registers, which ptxas
miscompiled on sm_90 (see ``sass_check``). Here the kernel has one dot chain fed from shared
memory and a store; the two large GEMMs run at cuBLAS speed, in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..chunked_backward import chunked_logprobs_backward
from .logprobs_forward import _on_device, dot_precision, logits_tile
from .tile_configs import LogprobsTiles, interpreting, tiles_for

# Chunk sizes of the loop (None: chunked_backward's defaults); tests shrink them.
TOKEN_CHUNK = None
VOCAB_BAND = None


@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr, out_ptr,
    n_tokens, band, hidden_size, band_start,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # Grouped program order: consecutive programs take GROUP_N token blocks for one vocabulary
    # tile before moving on, so the programs resident at one time share operands in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_tokens, BLOCK_N)
    num_v = tl.cdiv(band, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < band
    # int32 ids, made band-local: a label outside the band matches no column.
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1) - band_start
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_size
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * hidden_size

    logits = logits_tile(h_rows, w_rows, row_ok, col_ok, hidden_size,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    grad = g[:, None] * (onehot - tl.exp(logits - lse[:, None]))
    out = out_ptr + rows.to(tl.int64)[:, None] * band + cols[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def produce_g(h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, band_start: int, out, *,
              tiles: LogprobsTiles | None = None) -> float:
    """Fill ``out [C, Vb]`` with ``g (onehot(label) - softmax)`` for one chunk and band; returns 1.0.

    ``labels_chunk`` holds int32 absolute vocabulary ids; ``out`` is contiguous, in the inputs'
    dtype. ``tiles`` overrides the kernel's tile shapes (tests).
    """
    c, hidden_size = h_chunk.shape
    band = w_band.shape[0]
    t = tiles or tiles_for(h_chunk.device).logprobs("backward", h_chunk.dtype)
    grid = (triton.cdiv(c, t.block_n) * triton.cdiv(band, t.block_v),)
    with _on_device(h_chunk.device):
        _grad_logits_kernel[grid](
            h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, out,
            c, band, hidden_size, band_start,
            BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, GROUP_N=t.group_n,
            DOT_PRECISION=dot_precision(h_chunk.dtype), UPCAST_DOT=interpreting(),
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
    return 1.0


def logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh=True, need_dw=True, *,
                      token_chunk=None, vocab_band=None, tiles: LogprobsTiles | None = None):
    """Gradients of ``sum_t grad_logp[t] * logp[t]`` with respect to hidden and weight.

    Args:
        hidden [N, H], weight [V, H] (fp32/bf16/fp16), labels [N] int32/int64 in [0, V),
        lse [N] fp32 from :func:`logprobs_forward`, grad_logp [N] fp32.
        token_chunk, vocab_band, tiles: chunk and tile sizes (default: the loop's and the
            device's); tests shrink them so that small shapes cross every loop several times.

    Returns ``(dH in hidden.dtype or None, dW in weight.dtype or None)``; both summed in fp32,
    bit-identical from run to run.
    """
    def producer(*args):
        return produce_g(*args, tiles=tiles)

    return chunked_logprobs_backward(
        hidden, weight, labels, lse, grad_logp, need_dh, need_dw, produce_g=producer,
        token_chunk=token_chunk or TOKEN_CHUNK, vocab_band=vocab_band or VOCAB_BAND)
