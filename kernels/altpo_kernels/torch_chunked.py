"""The plain-torch backend: the fused kernels' algorithm written with torch ops over tiles.

The forward walks [tokens x vocab] tiles with an online log-sum-exp, as the Triton forward does;
the backward is the shared chunk loop of ``chunked_backward`` with a plain-torch G producer. At no
time is more than one tile of logits held. On CUDA the matmuls take 16-bit operands with fp32
outputs (tensor cores), so this is a usable fallback there, not only the CPU path. Its peak memory
is a small fraction of the materialised path's (tests/kernels/test_torch_chunked_memory.py).

Backend interface (shared with ``altpo_kernels.triton``):
    logprobs_forward(hidden, weight, labels) -> (logp [N] fp32, lse [N] fp32)
    logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh, need_dw) -> (dH, dW)
    segment_sum(values [N] fp32, seq_ids [N], num_seqs) -> [S] fp32
    gather_segments(seq_values [S] fp32, seq_ids [N]) -> [N] fp32
Callers pass only rows whose label is a real token (ignored rows are removed before the call).
"""

from __future__ import annotations

import torch

from .chunked_backward import chunked_logprobs_backward

# Tile sizes: a [512, 8192] fp32 tile is 16 MiB, small next to the weight itself at LLM shapes,
# and large enough that the per-tile Python overhead is negligible on a CPU.
TOKEN_CHUNK = 512
VOCAB_CHUNK = 8192


def _tile_logits(h_chunk, weight, v0: int, v1: int):
    return logits_f32(h_chunk, weight[v0:v1])


def logprobs_forward(hidden, weight, labels):
    n, v = hidden.shape[0], weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    label_logit = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for t0 in range(0, n, TOKEN_CHUNK):
        t1 = min(n, t0 + TOKEN_CHUNK)
        h = hidden[t0:t1]
        lab = labels[t0:t1]
        run_max = torch.full((t1 - t0,), float("-inf"), device=hidden.device)
        run_sum = torch.zeros(t1 - t0, device=hidden.device)
        picked = torch.zeros(t1 - t0, device=hidden.device)
        for v0 in range(0, v, VOCAB_CHUNK):
            v1 = min(v, v0 + VOCAB_CHUNK)
            z = _tile_logits(h, weight, v0, v1)
            inside = (lab >= v0) & (lab < v1)
            local = (lab - v0).clamp(0, v1 - v0 - 1)
            picked = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), picked)
            new_max = torch.maximum(run_max, z.max(dim=1).values)
            # in place: one tile-sized buffer per step keeps the peak at one tile
            tile_sum = z.sub_(new_max[:, None]).exp_().sum(1)
            run_sum = run_sum * torch.exp(run_max - new_max) + tile_sum
            run_max = new_max
            del z
        lse[t0:t1] = run_max + torch.log(run_sum)
        label_logit[t0:t1] = picked
    return label_logit - lse, lse


def logits_f32(h, w):
    """``h @ w.T`` as fp32: 16-bit operands with an fp32 output on CUDA (tensor cores), fp32
    operands on the CPU (whose GEMMs have no fp32 output for 16-bit inputs)."""
    if h.dtype != torch.float32 and h.device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(h, w.T, out_dtype=torch.float32)
    return h.float() @ w.float().T


# Rows of the chunk whose fp32 logits the torch producer holds at once: [1024, Vb] fp32 is 8 MiB
# at Vb = 2048, so the torch backend's workspace stays near the fused one's.
PRODUCER_ROWS = 1024


def produce_g(h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, band_start: int, out) -> float:
    """The plain-torch G producer of ``chunked_backward``: ``out = g (onehot(label) - softmax)``.

    Works through the chunk ``PRODUCER_ROWS`` rows at a time, holding one fp32 logits block; the
    label's column gets ``p - 1`` through a scatter (no device sync), so every entry is
    ``g (onehot - p)`` with the same roundings as the Triton producer.
    """
    vb = w_band.shape[0]
    for r0 in range(0, h_chunk.shape[0], PRODUCER_ROWS):
        r1 = min(h_chunk.shape[0], r0 + PRODUCER_ROWS)
        z = logits_f32(h_chunk[r0:r1], w_band)
        z.sub_(lse_chunk[r0:r1, None]).exp_()
        local = labels_chunk[r0:r1].long() - band_start
        inside = (local >= 0) & (local < vb)
        z.scatter_add_(1, local.clamp(0, vb - 1)[:, None], -inside.float()[:, None])
        out[r0:r1].copy_(z.mul_(-g_chunk[r0:r1, None]))
    return 1.0


# Chunk sizes of the backward (None: chunked_backward's defaults); tests shrink them.
BACKWARD_TOKEN_CHUNK = None
BACKWARD_VOCAB_BAND = None


def logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh=True, need_dw=True, *,
                      token_chunk=None, vocab_band=None):
    """dH and dW by the shared chunk loop (``chunked_backward``) with the plain-torch producer."""
    return chunked_logprobs_backward(
        hidden, weight, labels, lse, grad_logp, need_dh, need_dw, produce_g=produce_g,
        token_chunk=token_chunk or BACKWARD_TOKEN_CHUNK, vocab_band=vocab_band or BACKWARD_VOCAB_BAND)


def segment_sum(values, seq_ids, num_seqs: int):
    # float64 accumulation, rounded once: an fp32 index_add_ adds a sequence's tokens one by one,
    # and its error grows with the length beyond that of a pairwise .sum()
    out = torch.zeros(num_seqs, dtype=torch.float64, device=values.device)
    return out.index_add_(0, seq_ids.long(), values.double()).float()


def gather_segments(seq_values, seq_ids):
    return seq_values.float()[seq_ids.long()]
