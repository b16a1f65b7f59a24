"""The plain-torch backend: the fused kernels' algorithm written with torch ops over tiles.

It walks [tokens x vocab] tiles exactly as the Triton kernels do (online log-sum-exp forward,
recompute-per-tile backward), so at no time does it hold more than one tile of logits. This is the
CPU path and the fallback where Triton is missing; its peak memory is a small fraction of the
materialised path's (tests/test_torch_chunked.py measures the ratio).

Backend interface (shared with ``altpo_kernels.triton``):
    logprobs_forward(hidden, weight, labels) -> (logp [N] fp32, lse [N] fp32)
    logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh, need_dw) -> (dH, dW)
    segment_sum(values [N] fp32, seq_ids [N], num_seqs) -> [S] fp32
    gather_segments(seq_values [S] fp32, seq_ids [N]) -> [N] fp32
Callers pass only rows whose label is a real token (ignored rows are removed before the call).
"""

from __future__ import annotations

import torch

# Tile sizes: a [512, 8192] fp32 tile is 16 MiB, small next to the weight itself at LLM shapes,
# and large enough that the per-tile Python overhead is negligible on a CPU.
TOKEN_CHUNK = 512
VOCAB_CHUNK = 8192


def _tile_logits(h_chunk32, weight, v0: int, v1: int):
    return h_chunk32 @ weight[v0:v1].float().T


def logprobs_forward(hidden, weight, labels):
    n, v = hidden.shape[0], weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    label_logit = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for t0 in range(0, n, TOKEN_CHUNK):
        t1 = min(n, t0 + TOKEN_CHUNK)
        h = hidden[t0:t1].float()
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


def logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh=True, need_dw=True):
    n, v = hidden.shape[0], weight.shape[0]
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    # Vocabulary-outer order: each band of dW rows is summed in fp32 over all token chunks and
    # written in the weight's dtype when done, so the fp32 workspace is one band, not [V, H].
    for v0 in range(0, v, VOCAB_CHUNK):
        v1 = min(v, v0 + VOCAB_CHUNK)
        w = weight[v0:v1].float()
        dw_band = torch.zeros(v1 - v0, weight.shape[1], device=weight.device) if need_dw else None
        for t0 in range(0, n, TOKEN_CHUNK):
            t1 = min(n, t0 + TOKEN_CHUNK)
            h = hidden[t0:t1].float()
            lab = labels[t0:t1]
            g = grad_logp[t0:t1].float()
            # d logp_t / d z_t = onehot(label_t) - softmax(z_t); scaled by the upstream gradient.
            dz = (h @ w.T).sub_(lse[t0:t1, None]).exp_().mul_(-g[:, None])
            rows = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)
            dz[rows, lab[rows] - v0] += g[rows]
            if need_dh:
                dh[t0:t1] += dz @ w
            if need_dw:
                dw_band += dz.T @ h
            del dz
        if need_dw:
            dw[v0:v1] = dw_band
    return (dh.to(hidden.dtype) if need_dh else None, dw)


def segment_sum(values, seq_ids, num_seqs: int):
    out = torch.zeros(num_seqs, dtype=torch.float32, device=values.device)
    return out.index_add_(0, seq_ids.long(), values.float())


def gather_segments(seq_values, seq_ids):
    return seq_values.float()[seq_ids.long()]
