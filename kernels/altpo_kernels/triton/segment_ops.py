"""Per-token kernels of the AltPO epilogue: sums of token log-probs per sequence, and the gather
that hands each token its sequence's coefficient in backward.

The per-pair arithmetic between them (deltas, log-sigmoid, normalisers) is a few hundred numbers
and stays in torch; these two are the only epilogue steps whose size is the token count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprobs_forward import _on_device
from .tile_configs import tiles_for


@triton.jit
def _segment_sum_kernel(values_ptr, seq_ids_ptr, out_ptr, n_tokens, num_seqs,
                        BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    # Deterministic by construction: no atomics. A program owns BLOCK_S sequences and walks all
    # tokens in BLOCK-wide blocks, in order; each block is folded into the program's [BLOCK_S]
    # fp32 sums by a masked row reduction (tl.sum: a fixed shuffle tree plus one shared-memory
    # step). Every output is therefore written once, by one program, in one order, and the result
    # is bit-identical from run to run. Cost: ceil(S / BLOCK_S) x N compares, which at a packed
    # step's 1e4 tokens and 1e2 sequences is a few microseconds of one program per 32 sequences.
    segs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for start in range(0, n_tokens, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n_tokens
        seq = tl.load(seq_ids_ptr + offs, mask=ok, other=-1)
        vals = tl.load(values_ptr + offs, mask=ok, other=0.0)
        hit = seq[None, :] == segs[:, None]
        acc += tl.sum(tl.where(hit, vals[None, :], 0.0), axis=1)
    tl.store(out_ptr + segs, acc, mask=segs < num_seqs)


@triton.jit
def _gather_segments_kernel(seq_values_ptr, seq_ids_ptr, out_ptr, n_tokens, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_tokens
    seq = tl.load(seq_ids_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, tl.load(seq_values_ptr + seq, mask=ok, other=0.0), mask=ok)


def segment_sum(values, seq_ids, num_seqs: int):
    """``out[s] = sum of values[t] over tokens t with seq_ids[t] == s`` as fp32 [num_seqs].

    ``seq_ids`` must lie in [0, num_seqs) (the caller checks). No atomics: each sum is formed by
    one program in token order, so the result is bit-identical from run to run (the SASS of the
    compiled kernel is checked for ATOM/RED instructions).
    """
    values = values.contiguous().float()
    seq_ids = seq_ids.contiguous().long()
    out = torch.zeros(num_seqs, dtype=torch.float32, device=values.device)
    n = values.shape[0]
    if n == 0 or num_seqs == 0:
        return out
    e = tiles_for(values.device).segment
    with _on_device(values.device):
        _segment_sum_kernel[(triton.cdiv(num_seqs, e.block_s),)](
            values, seq_ids, out, n, num_seqs, BLOCK_S=e.block_s, BLOCK=e.block,
            num_warps=e.num_warps)
    return out


def gather_segments(seq_values, seq_ids):
    """``out[t] = seq_values[seq_ids[t]]`` as fp32 [N]: each token gets its sequence's value."""
    seq_values = seq_values.contiguous().float()
    seq_ids = seq_ids.contiguous().long()
    n = seq_ids.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=seq_ids.device)
    if n == 0:
        return out
    e = tiles_for(seq_ids.device).elementwise
    with _on_device(seq_ids.device):
        _gather_segments_kernel[(triton.cdiv(n, e.block),)](seq_values, seq_ids, out, n,
                                                             BLOCK=e.block, num_warps=e.num_warps)
    return out
