"""Backward of the fused linear log-prob: dH and dW from the saved [N] log-sum-exp alone.

One program per [BLOCK_N tokens x BLOCK_V vocabulary] tile. It recomputes the tile's logits
(the same ``tl.dot`` over hidden slices as the forward), turns them into

    D = onehot(label) - exp(z - lse)        (d logp_t / d z_t, exact, in fp32)

and then, slice by slice of the hidden dimension, forms both gradient contributions

    dH[rows, slice] += diag(g) (D  @ W[cols, slice])
    dW[cols, slice] += D^T @ (diag(g) H[rows, slice])

adding them into fp32 buffers with atomic adds. The caller casts the buffers to the inputs' dtype.

Why atomics: a tile's dH contribution has to be summed over all V/BLOCK_V vocabulary tiles and its
dW contribution over all N/BLOCK_N token blocks. Owning a whole dH row block (or dW row block) in
one program would need a [BLOCK_N, H] fp32 accumulator -- 1 MiB at H = 2048, far beyond registers --
or recomputing the logits once per hidden slice. Relaxed fp32 atomic adds cost
(BLOCK_N + BLOCK_V) * H reductions per 6 * BLOCK_N * BLOCK_V * H flops (384 flops each at
128 x 128 tiles), land in L2, and need no [N, V] or [splits, N, H] scratch. The price is a
summation order that varies from run to run (fp32 rounding level).

Why the per-token scale ``g`` is kept out of the 16-bit operands as far as possible: ``g`` can be
~1e-4 and softmax entries ~1e-7, so ``g * D`` rounded to fp16 would flush to zero. For dH, ``D``
(in [-1, 1]) is rounded alone and each result row is scaled by its ``g`` in fp32. For dW, the rows
of ``D`` are scaled by ``g / max|g|`` over the tile (again within [-1, 1]) before rounding and the
tile result multiplied back by ``max|g|``; the hidden rows then enter the dot exactly as given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprobs_forward import _on_device, dot_accumulate, dot_precision, logits_tile
from .tile_configs import interpreting, tiles_for


# Vocabulary rows per dW band (see logprobs_backward); a multiple of every BLOCK_V.
DW_BAND_ROWS = 16384


@triton.jit
def _logprobs_backward_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr,
    dhidden_ptr, dweight_ptr,
    n_tokens, vocab, hidden_size,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # Grouped program order: consecutive programs take GROUP_N token blocks for one vocabulary
    # tile before moving to the next tile, so the programs resident at one time read a few token
    # blocks and a band of vocabulary tiles, both of which stay in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_tokens, BLOCK_N)
    num_v = tl.cdiv(vocab, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_size
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * hidden_size

    logits = logits_tile(h_rows, w_rows, row_ok, col_ok, hidden_size,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)

    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    d = tl.where(row_ok[:, None] & col_ok[None, :], onehot - tl.exp(logits - lse[:, None]), 0.0)
    g_max = tl.max(tl.abs(g), axis=0)
    g_max = tl.where(g_max > 0, g_max, 1.0)
    # Operands of the 16-bit dots: D alone for dH (row scale g applied to the fp32 result), and
    # (g / max|g|) * D for dW, so the hidden rows enter their dot unrounded.
    d_for_dh = d.to(hidden_ptr.dtype.element_ty)
    d_for_dw = (d * (g / g_max)[:, None]).to(hidden_ptr.dtype.element_ty)

    dh_rows = dhidden_ptr + rows.to(tl.int64)[:, None] * hidden_size
    dw_rows = dweight_ptr + cols.to(tl.int64)[:, None] * hidden_size
    for h0 in range(0, hidden_size, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden_size
        if NEED_DH:
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dh = dot_accumulate(d_for_dh, w, tl.zeros([BLOCK_N, BLOCK_H], tl.float32),
                                DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(dh_rows + ks[None, :], dh * g[:, None],
                          mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        if NEED_DW:
            h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            dw = dot_accumulate(tl.trans(d_for_dw), h, tl.zeros([BLOCK_V, BLOCK_H], tl.float32),
                                DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(dw_rows + ks[None, :], dw * g_max,
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


def logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh=True, need_dw=True):
    """Gradients of ``sum_t grad_logp[t] * logp[t]`` with respect to hidden and weight.

    Args:
        hidden [N, H], weight [V, H] (fp32/bf16/fp16, contiguous), labels [N] int64 in [0, V),
        lse [N] fp32 from :func:`logprobs_forward`, grad_logp [N] fp32.

    Returns ``(dH in hidden.dtype or None, dW in weight.dtype or None)``; both are summed in fp32.
    """
    hidden, weight = hidden.contiguous(), weight.contiguous()
    labels = labels.contiguous().long()
    lse = lse.contiguous().float()
    grad_logp = grad_logp.contiguous().float()
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    if not (need_dh or need_dw):
        return None, None
    dh = torch.zeros(n, hidden_size, dtype=torch.float32, device=device) if need_dh else None
    dw = torch.empty(vocab, hidden_size, dtype=weight.dtype, device=device) if need_dw else None
    # The unused output still needs a pointer of the right type; the kernel never touches it.
    unused = torch.empty(1, dtype=torch.float32, device=device)
    t = tiles_for(device).logprobs("backward", hidden.dtype)
    # dW is summed in fp32 one band of vocabulary rows at a time and written in the weight's
    # dtype as each band finishes, so the fp32 workspace is [DW_BAND_ROWS, H] instead of [V, H]
    # (128 MiB instead of 1 GiB for a 128k x 2048 head). Each band is a full launch over all token
    # blocks, so no tile is computed twice; a label outside the band matches no column of it.
    band = min(vocab, DW_BAND_ROWS) if need_dw else vocab
    in_place = need_dw and dw.dtype == torch.float32
    scratch = None
    if need_dw and not in_place:
        scratch = torch.empty(band, hidden_size, dtype=torch.float32, device=device)
    for v0 in range(0, vocab, band):
        v1 = min(vocab, v0 + band)
        dw_band = unused
        if need_dw:
            dw_band = dw[v0:v1] if in_place else scratch[: v1 - v0]
            dw_band.zero_()
        grid = (triton.cdiv(n, t.block_n) * triton.cdiv(v1 - v0, t.block_v),)
        with _on_device(device):
            _logprobs_backward_kernel[grid](
                hidden, weight[v0:v1], labels - v0 if v0 else labels, lse, grad_logp,
                dh if need_dh else unused, dw_band,
                n, v1 - v0, hidden_size,
                NEED_DH=need_dh, NEED_DW=need_dw,
                BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, GROUP_N=t.group_n,
                DOT_PRECISION=dot_precision(hidden.dtype), UPCAST_DOT=interpreting(),
                num_warps=t.num_warps, num_stages=t.num_stages,
            )
        if need_dw and not in_place:
            dw[v0:v1].copy_(dw_band)
    return (dh.to(hidden.dtype) if need_dh else None, dw)
