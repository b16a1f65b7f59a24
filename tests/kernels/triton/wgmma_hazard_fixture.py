"""A kernel with the register-operand pattern that ptxas miscompiled on sm_90 (never launched).

It is the fused dH + dW backward this project used before the chunked backward, cut down to the
pattern: a 16-bit tile ``d`` is formed once in registers from the logits accumulator
(loop-invariant), then inside the hidden-slice loop ``tl.dot(d, w)`` takes it as the register A
operand of a wgmma, and a second ``tl.dot`` takes ``d``'s transpose through shared memory
(ldmatrix) with the hidden slice, also from shared memory. Under that register pressure ptxas 3.6
gives the second dot's ldmatrix results the registers of the first dot's operand, so from the
second slice on the first dot reads the wrong values.

A smaller kernel with the same two dots (a 64 x 64 tile, no logits loop, no atomics' masks) does
not reproduce it: ptxas then re-packs ``d`` inside the loop. The AOT tests compile this fixture for
sm_90 and assert that ``sass_check.wgmma_register_hazards`` flags it; a synthetic SASS fixture in
the tests checks the analysis itself line by line.
"""

import triton
import triton.language as tl

from altpo_kernels.triton.logprobs_forward import logits_tile


@triton.jit
def register_operand_reuse_kernel(hidden_ptr, weight_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr,
                                  n_tokens, vocab, hidden_size,
                                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                  BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_tokens
    col_ok = cols < vocab
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_size
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * hidden_size
    logits = logits_tile(h_rows, w_rows, row_ok, col_ok, hidden_size,
                         BLOCK_N, BLOCK_V, BLOCK_H, "ieee", False)
    d = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(logits - lse[:, None]), 0.0)
    d_a = d.to(hidden_ptr.dtype.element_ty)                      # register operand, loop-invariant
    d_b = (d * g[:, None]).to(hidden_ptr.dtype.element_ty)       # transposed, through shared memory
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * hidden_size
    dw_rows = dw_ptr + cols.to(tl.int64)[:, None] * hidden_size
    for h0 in range(0, hidden_size, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden_size
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.dot(d_a, w)
        tl.atomic_add(dh_rows + ks[None, :], a * g[:, None], mask=row_ok[:, None] & k_ok[None, :],
                      sem="relaxed")
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.dot(tl.trans(d_b), h)
        tl.atomic_add(dw_rows + ks[None, :], b, mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


# Argument types and launch options the AOT test compiles it with (the old kernel's sm_90 config).
TYPES = dict(hidden_ptr="*bf16", weight_ptr="*bf16", lse_ptr="*fp32", grad_ptr="*fp32",
             dh_ptr="*fp32", dw_ptr="*fp32", n_tokens="i32", vocab="i32", hidden_size="i32")
CONSTEXPRS = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32)
OPTIONS = dict(num_warps=8, num_stages=3,
               divisible=("hidden_ptr", "weight_ptr", "lse_ptr", "grad_ptr", "dh_ptr", "dw_ptr",
                          "hidden_size"))
