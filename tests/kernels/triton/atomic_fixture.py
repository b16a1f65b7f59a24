"""The segment sum this project shipped before it became deterministic, kept as a fixture: float
``tl.atomic_add`` into the per-sequence sums. Compiled for sm_80 and sm_90 its SASS holds RED/ATOM
instructions, which the no-atomics check must flag (test_sass_check.py)."""

import triton
import triton.language as tl


@triton.jit
def atomic_segment_sum_kernel(values_ptr, seq_ids_ptr, out_ptr, n_tokens, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_tokens
    seq = tl.load(seq_ids_ptr + offs, mask=ok, other=0)
    vals = tl.load(values_ptr + offs, mask=ok, other=0.0)
    tl.atomic_add(out_ptr + seq, vals, mask=ok, sem="relaxed")


TYPES = dict(values_ptr="*fp32", seq_ids_ptr="*i64", out_ptr="*fp32", n_tokens="i32")
CONSTEXPRS = dict(BLOCK=1024)
OPTIONS = dict(num_warps=4, num_stages=1)
