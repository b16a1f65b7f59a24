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

import torch
import triton
import triton.language as tl

from ..chunked_backward import chunked_logprobs_backward, fp16_scale
from ..head_constants import fp16_output_scale, transform_constants
from .logprobs_forward import (
    _on_device,
    dot_precision,
    grouped_program,
    head_transform,
    logits_tile,
)
from .tile_configs import LogprobsTiles, interpreting, tiles_for

# Chunk sizes of the loop (None: chunked_backward's defaults); tests shrink them.
TOKEN_CHUNK = None
VOCAB_BAND = None


@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr, out_ptr,
    n_tokens, band, hidden_size, band_start,
    bias_ptr, colsum_ptr, pre_scale, post_scale, factor,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr = False, SCALE: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    ENTROPY: tl.constexpr = False, NEED_DB: tl.constexpr = False, FACTOR: tl.constexpr = False,
):
    # Grouped program order: consecutive programs take GROUP_N token blocks for one vocabulary
    # tile before moving on, so the programs resident at one time share operands in L2.
    pid_n, pid_v = grouped_program(tl.program_id(0), tl.cdiv(n_tokens, BLOCK_N),
                                   tl.cdiv(band, BLOCK_V), GROUP_N)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < band
    # int32 ids, made band-local: a label outside the band matches no column.
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1) - band_start
    if ENTROPY:
        # (lse, mu) and (grad of logp, grad of entropy) as [C, 2] rows
        lse = tl.load(lse_ptr + 2 * rows, mask=row_ok, other=0.0)
        mu = tl.load(lse_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
        g = tl.load(grad_ptr + 2 * rows, mask=row_ok, other=0.0)
        g_ent = tl.load(grad_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_size
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * hidden_size

    logits = logits_tile(h_rows, w_rows, row_ok, col_ok, hidden_size,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
    logits, t = head_transform(logits, band_start + cols, col_ok, bias_ptr, pre_scale, post_scale,
                               HAS_BIAS, SCALE, SOFTCAP)
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    p = tl.exp(logits - lse[:, None])
    grad = g[:, None] * (onehot - p)
    if ENTROPY:
        # d entropy / du_v = -p_v (u_v - mu)
        grad -= g_ent[:, None] * p * (logits - mu[:, None])
    if SOFTCAP:
        # d/dz of post * tanh(pre z) = post * pre * (1 - tanh^2) = dscale (1 - t^2); the launcher
        # passes factor = dscale * (the fp16 output scale)
        grad = grad * (factor * (1.0 - t * t))
    elif FACTOR:
        grad = grad * factor
    if NEED_DB:
        # this token block's column sums of G (in the output's scale), fp32, one row per block:
        # the launcher adds the rows in a fixed order (no atomics)
        tl.store(colsum_ptr + pid_n * band + cols, tl.sum(tl.where(row_ok[:, None], grad, 0.0), axis=0),
                 mask=col_ok)
    out = out_ptr + rows.to(tl.int64)[:, None] * band + cols[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def produce_g(h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, band_start: int, out, *,
              tiles: LogprobsTiles | None = None, bias=None, tf=None, entropy: bool = False,
              db=None, vocab: int | None = None) -> float:
    """Fill ``out [C, Vb]`` with ``g (onehot(label) - softmax)`` for one chunk and band; returns the
    scale ``out`` carries (1.0 without transforms).

    ``labels_chunk`` holds int32 absolute vocabulary ids; ``out`` is contiguous, in the inputs'
    dtype. ``tiles`` overrides the kernel's tile shapes (tests).

    With a head transform (``bias`` [V], ``tf`` a ``torch_chunked.HeadTransform``, ``entropy``)
    ``out`` holds ``s * du/dz * (g (onehot - p) - g_ent p (u - mu))``; with ``entropy``,
    ``lse_chunk`` is ``[C, 2]`` (lse, mu) and ``g_chunk`` ``[C, 2]`` (grad of logp, of entropy).
    ``s`` (returned) is 1 except for fp16 (:func:`fp16_output_scale`). ``db`` (fp32 [V]) gets this
    block's column sums of the unscaled G added to its band, in a fixed order. ``vocab`` (V, for
    the fp16 bound) defaults to the band's end.
    """
    c, hidden_size = h_chunk.shape
    band = w_band.shape[0]
    transformed = bias is not None or tf is not None or entropy or db is not None
    t = tiles or tiles_for(h_chunk.device).logprobs("backward", h_chunk.dtype, transformed)
    k = transform_constants(tf)
    s = fp16_output_scale(k["dscale"], entropy, vocab or band_start + band) \
        if out.dtype == torch.float16 and (tf is not None or entropy) else 1.0
    blocks_n = triton.cdiv(c, t.block_n)
    grid = (blocks_n * triton.cdiv(band, t.block_v),)
    colsum = torch.empty(blocks_n, band, dtype=torch.float32, device=out.device) \
        if db is not None else lse_chunk
    with _on_device(h_chunk.device):
        _grad_logits_kernel[grid](
            h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, out,
            c, band, hidden_size, band_start,
            bias if bias is not None else w_band, colsum, k["pre_scale"], k["post_scale"],
            k["dscale"] * s,
            BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, GROUP_N=t.group_n,
            DOT_PRECISION=dot_precision(h_chunk.dtype), UPCAST_DOT=interpreting(),
            HAS_BIAS=bias is not None, SCALE=k["SCALE"], SOFTCAP=k["SOFTCAP"], ENTROPY=entropy,
            NEED_DB=db is not None, FACTOR=k["dscale"] * s != 1.0,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
    if db is not None:
        part = colsum.sum(0)
        db[band_start:band_start + band] += part if s == 1.0 else part / s
    return s


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


def transformed_backward(hidden, weight, labels, bias, tf, lse, mu, g_logp, g_ent, need_dh: bool,
                         need_dw: bool, need_db: bool, *, token_chunk=None, vocab_band=None,
                         tiles: LogprobsTiles | None = None):
    """dH, dW, db of ``sum_t g_logp[t] logp_t + g_ent[t] entropy_t`` for the transformed head (the
    interface of ``torch_chunked.transformed_backward``; ``g_ent`` None: no entropy term, ``mu``
    unused). The shared chunk loop runs with this backend's producer; with entropy its per-token
    inputs travel as [N, 2] rows, (lse, mu) and (g_logp, g_ent), sliced per chunk like the [N]
    ones. db is summed in fp32 from the kernel's per-block column sums, in a fixed order.

    Returns ``(dH in hidden.dtype or None, dW in weight.dtype or None, db fp32 or None)``.
    """
    entropy = g_ent is not None
    stats = torch.stack([lse.float(), mu.float()], 1) if entropy else lse.float()
    grads = torch.stack([g_logp.float(), g_ent.float()], 1) if entropy else g_logp.float()
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None
    if not (need_dh or need_dw or need_db):
        return None, None, db

    def producer(*args):
        return produce_g(*args, tiles=tiles, bias=bias, tf=tf, entropy=entropy, db=db,
                         vocab=weight.shape[0])

    # The loop only forms G when dH or dW is wanted; for db alone, dH's GEMMs run and are dropped.
    dh, dw = chunked_logprobs_backward(
        hidden, weight, labels, stats, grads, need_dh or not need_dw, need_dw, produce_g=producer,
        token_chunk=token_chunk or TOKEN_CHUNK, vocab_band=vocab_band or VOCAB_BAND)
    if need_db and hidden.dtype == torch.float16:
        # the loop scaled the upstream gradients by this power of two (its fp16 rule); the fp32
        # accumulators of dH and dW were divided by it, db is here
        db /= fp16_scale(grads.abs().amax())
    return (dh if need_dh else None), dw, db
