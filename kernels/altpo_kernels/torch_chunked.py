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

from .chunked_backward import PRODUCER_ROWS, chunked_logprobs_backward

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


# Tokens per step of the CUDA segment sum: a [num_seqs, 4096] fp32 mask-product at a time.
SEGMENT_TOKEN_CHUNK = 4096


def segment_sum(values, seq_ids, num_seqs: int):
    """``out[s] = sum of values[t] with seq_ids[t] == s`` (fp32), bit-identical run to run, and
    accumulated in float64 then rounded once (an fp32 running sum over a long sequence drifts
    further from the exact sum than a pairwise ``.sum()``).

    On the CPU ``index_add_`` adds in token order. On CUDA it adds with atomics (order varies
    between runs), so there the sums are masked row reductions over fixed token chunks, added in
    chunk order: no atomics, ``num_seqs x 4096`` floats of workspace.
    """
    seq_ids = seq_ids.long()
    if values.device.type != "cuda":
        out = torch.zeros(num_seqs, dtype=torch.float64, device=values.device)
        return out.index_add_(0, seq_ids, values.double()).float()
    return masked_segment_sum(values, seq_ids, num_seqs, SEGMENT_TOKEN_CHUNK)


def masked_segment_sum(values, seq_ids, num_seqs: int, token_chunk: int):
    """The atomic-free segment sum: per chunk of ``token_chunk`` tokens, a ``[num_seqs, chunk]``
    masked tile reduced along tokens, chunks added in order, in float64."""
    out = torch.zeros(num_seqs, dtype=torch.float64, device=values.device)
    segs = torch.arange(num_seqs, device=values.device)[:, None]
    for start in range(0, values.shape[0], token_chunk):
        ids = seq_ids[start:start + token_chunk].long()
        vals = values[start:start + token_chunk].double()
        out += torch.where(ids[None, :] == segs, vals[None, :], 0.0).sum(dim=1)
    return out.float()


def gather_segments(seq_values, seq_ids):
    return seq_values.float()[seq_ids.long()]


# ------------------------------------------------------------------------------------------------
# Head transforms and entropy (linear_logprobs(..., bias=, temperature=, logit_scale=, softcap=,
# return_entropy=True))
#
# Per-token log-probs (and optionally entropy) of a linear head with the transforms some models
# apply to their logits: an LM-head bias, a logit scale, final-logit soft-capping and a sampling
# temperature, without the [tokens, vocab] logits.
#
# The logits of token t over the vocabulary are, in this order (the order TRL's fused head uses)::
#
#     z = (h_t W^T + b) * logit_scale
#     z = softcap * tanh(z / softcap)          only with softcap
#     u = z / temperature
#
# and ``logp_t = u[label] - lse(u)``, ``entropy_t = lse(u) - sum_v p_v u_v`` with ``p = softmax(u)``.
#
# Gradients with respect to ``u`` (upstream ``a_t`` on logp, ``c_t`` on entropy, ``mu = lse - H``)::
#
#     dL/du_v = a_t (onehot_v - p_v) - c_t p_v (u_v - mu_t)
#
# and ``du/d(hW^T + b) = logit_scale (1 - (z / softcap)^2) / temperature`` (without softcap the
# middle factor is 1). dH = G W, dW = G^T H, db = column sums of G.
#
# This path is plain torch over [TRANSFORM_TOKEN_CHUNK, TRANSFORM_VOCAB_CHUNK] fp32 tiles (16-bit
# operands are upcast per tile), on every device; the fused Triton and cuda kernels do not implement
# the transforms, so ``linear_logprobs`` routes calls that use them here (``backend="auto"`` or
# ``"torch"``).

TRANSFORM_TOKEN_CHUNK = 512
TRANSFORM_VOCAB_CHUNK = 8192


class HeadTransform:
    """The transform's constants, checked once."""

    def __init__(self, temperature: float = 1.0, logit_scale: float = 1.0,
                 softcap: float | None = None):
        for name, value in (("temperature", temperature), ("logit_scale", logit_scale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
                    or value == float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
                                    or not softcap > 0 or softcap == float("inf")):
            raise ValueError(f"softcap must be None or a positive finite number (Gemma-2 uses 30.0), "
                             f"got {softcap!r}")
        self.temperature = float(temperature)
        self.logit_scale = float(logit_scale)
        self.softcap = None if softcap is None else float(softcap)

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.logit_scale == 1.0 and self.softcap is None

    def apply(self, z):
        """``u`` from the raw fp32 tile ``hW^T + b`` (in place), and ``du/dz`` (None if constant)."""
        z.mul_(self.logit_scale)
        deriv = None
        if self.softcap is not None:
            z.div_(self.softcap).tanh_()
            deriv = (1.0 - z * z).mul_(self.logit_scale / self.temperature)
            z.mul_(self.softcap)
        z.div_(self.temperature)
        return z, deriv

    def constant_derivative(self) -> float:
        return self.logit_scale / self.temperature


def _raw_tile(h, weight, bias, v0, v1):
    z = h.float() @ weight[v0:v1].float().T
    if bias is not None:
        z += bias[v0:v1].float()
    return z


def transformed_forward(hidden, weight, labels, bias, tf: HeadTransform):
    """``(logp, entropy, lse, mu)`` fp32 [N] for rows with real labels (all of ``labels``)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4)]
    for t0 in range(0, n, TRANSFORM_TOKEN_CHUNK):
        t1 = min(n, t0 + TRANSFORM_TOKEN_CHUNK)
        h, lab = hidden[t0:t1], labels[t0:t1]
        m = torch.full((t1 - t0,), float("-inf"), device=dev)
        s = torch.zeros(t1 - t0, device=dev)
        su = torch.zeros(t1 - t0, device=dev)  # sum exp(u - m) * u
        picked = torch.zeros(t1 - t0, device=dev)
        for v0 in range(0, v, TRANSFORM_VOCAB_CHUNK):
            v1 = min(v, v0 + TRANSFORM_VOCAB_CHUNK)
            u, _ = tf.apply(_raw_tile(h, weight, bias, v0, v1))
            inside = (lab >= v0) & (lab < v1)
            local = (lab - v0).clamp(0, v1 - v0 - 1)
            picked = torch.where(inside, u.gather(1, local[:, None]).squeeze(1), picked)
            new_m = torch.maximum(m, u.max(dim=1).values)
            rescale = torch.exp(m - new_m)
            e = torch.exp(u - new_m[:, None])
            s = s * rescale + e.sum(1)
            su = su * rescale + (e * u).sum(1)
            m = new_m
        lse = m + torch.log(s)
        mu = su / s
        out[0][t0:t1] = picked - lse
        out[1][t0:t1] = lse - mu
        out[2][t0:t1] = lse
        out[3][t0:t1] = mu
    return tuple(out)


def transformed_backward(hidden, weight, labels, bias, tf: HeadTransform, lse, mu, g_logp, g_ent,
             need_dh: bool, need_dw: bool, need_db: bool):
    """dH, dW, db (fp32) of ``sum_t g_logp[t] logp_t + g_ent[t] entropy_t``; ``g_ent`` may be None."""
    n, h_size = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros(n, h_size, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(v, h_size, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    for t0 in range(0, n, TRANSFORM_TOKEN_CHUNK):
        t1 = min(n, t0 + TRANSFORM_TOKEN_CHUNK)
        h, lab = hidden[t0:t1], labels[t0:t1]
        a = g_logp[t0:t1, None]
        for v0 in range(0, v, TRANSFORM_VOCAB_CHUNK):
            v1 = min(v, v0 + TRANSFORM_VOCAB_CHUNK)
            u, deriv = tf.apply(_raw_tile(h, weight, bias, v0, v1))
            p = torch.exp(u - lse[t0:t1, None])
            g = -a * p
            if g_ent is not None:
                g -= g_ent[t0:t1, None] * p * (u - mu[t0:t1, None])
            local = lab - v0
            inside = (local >= 0) & (local < v1 - v0)
            g.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None],
                           (a.squeeze(1) * inside.float())[:, None])
            if deriv is None:
                g *= tf.constant_derivative()
            else:
                g *= deriv
            if need_dh:
                dh[t0:t1] += g @ weight[v0:v1].float()
            if need_dw:
                dw[v0:v1] += g.T @ h.float()
            if need_db:
                db[v0:v1] += g.sum(0)
    return dh, dw, db
