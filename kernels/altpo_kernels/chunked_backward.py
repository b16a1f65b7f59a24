"""The backward of the fused linear log-prob as bounded chunks: one loop that every backend uses.

For ``logp_t = log_softmax(h_t W^T)[label_t]`` and an upstream gradient ``g_t``, the gradient of the
logits row is ``G_t = g_t (onehot(label_t) - exp(z_t - lse_t))``, and

    dH = G @ W          dW = G^T @ H

``chunked_logprobs_backward`` walks vocabulary bands (outer) and token chunks (inner). For each
(band, chunk) a *G producer* recomputes that ``[C, Vb]`` block of logits and writes ``G`` into one
reused workspace tile (16-bit for 16-bit inputs); then two GEMMs through torch (cuBLAS on CUDA)

    dH[chunk]  += G @ W[band]            (fp32 accumulator [N, H])
    dW[band]   += G^T @ H[chunk]         (fp32 accumulator [Vb, H], or dW itself)

accumulate in fp32 (``out_dtype=torch.float32`` on CUDA, fp32 operands on the CPU). There are no
atomics and the order is fixed, so dH and dW are bit-identical run to run. When all tokens fit one
chunk, each band of dW is written once by one GEMM (fp32 accumulation inside the GEMM, one rounding
to the weight's dtype) and no accumulator exists.

The producer interface (``produce_g``), shared by the torch, triton and cuda backends::

    produce_g(h_chunk [C, H], w_band [Vb, H], labels_chunk int32 [C] (absolute vocabulary ids),
              lse_chunk fp32 [C], g_chunk fp32 [C], band_start: int, out [C, Vb]) -> float

fills ``out`` (16-bit for 16-bit inputs, fp32 for fp32 inputs) with ``G`` times a scale and returns
that scale; the GEMMs divide it out (``alpha = 1 / scale``).

fp16 anti-underflow rule: fp16 has 5 exponent bits, so ``g_t * p`` for small upstream gradients
(retain tokens: ``alpha / n_retain`` ~ 1e-4) times small probabilities would flush to zero. Before
calling the producer, the loop multiplies each chunk's ``g`` by ``s = 2**floor(log2(2**14 /
max|g|))`` over the chunk (a power of two, so the scaling and its undoing in the GEMM's ``alpha``
are exact). Then ``|s G| <= s max|g| <= 2**14`` stays below fp16's 65504, and an entry flushes only
below 2**-24 in scaled units, i.e. 2**-38 of the chunk's largest possible entry. bf16 and fp32 have
fp32's exponent range and use ``s = 1``.

Workspace (bytes, excluding the inputs and the outputs: dW in the weight's dtype and the fp32 dH
accumulator [N, H], which is the dH output before its final cast), ``e`` the element size of G
(2 for 16-bit inputs, 4 for fp32), ``C = min(N, token_chunk)``, ``Vb = min(V, vocab_band)``::

    G tile                     C * Vb * e
    dW band accumulator        Vb * H * 4     only with need_dw, 16-bit weights and N > C
    label ids                  N * 4          int32 copy of the labels
    torch producer             min(C, 1024) * Vb * 4   fp32 logits rows (torch backend only)

plus, on the CPU with 16-bit inputs only (torch's CPU GEMMs have no fp32 output for 16-bit
operands), fp32 copies of the GEMM operands: ``4 * (C * Vb + Vb * H + C * H)``.
:func:`workspace_bytes` computes it. At H=2048, V=128256, N=16384 bf16 with the default chunks
(C=4096, Vb=2048) the triton backend needs 16 + 16 MiB + 64 KiB = 32.1 MiB, the torch backend
8 MiB more.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# Default chunk sizes. C x Vb GEMMs of 4096 x 2048 (x H) are large enough to run cuBLAS near its
# peak, and the two workspace tiles stay at 16 MiB each at H = 2048 in bf16.
TOKEN_CHUNK = 4096
VOCAB_BAND = 2048
# fp16: scale G so that its largest possible entry is about 2**14 (see the module docstring).
FP16_TARGET_EXPONENT = 14
SIXTEEN_BIT = (torch.bfloat16, torch.float16)

Producer = Callable[..., float]


def chunk_sizes(n: int, v: int, token_chunk: int | None = None,
                vocab_band: int | None = None) -> tuple[int, int]:
    """``(C, Vb)``: the token chunk and vocabulary band the loop will use for N tokens, V entries."""
    c = TOKEN_CHUNK if token_chunk is None else int(token_chunk)
    vb = VOCAB_BAND if vocab_band is None else int(vocab_band)
    if c <= 0 or vb <= 0:
        raise ValueError(f"token_chunk and vocab_band must be positive, got {token_chunk}, {vocab_band}")
    return max(1, min(n, c)), max(1, min(v, vb))


def workspace_bytes(n: int, h: int, v: int, dtype: torch.dtype, *, backend: str = "triton",
                    device: str = "cuda", need_dw: bool = True, token_chunk: int | None = None,
                    vocab_band: int | None = None) -> int:
    """Bytes the chunked backward allocates beyond its inputs and outputs (formula above).

    ``backend`` is ``"triton"``/``"cuda"`` (G written straight into the tile) or ``"torch"`` (an
    fp32 logits tile first); ``device`` is ``"cuda"`` or ``"cpu"``.
    """
    c, vb = chunk_sizes(n, v, token_chunk, vocab_band)
    e = 2 if dtype in SIXTEEN_BIT else 4
    total = c * vb * e + n * 4
    if need_dw and dtype in SIXTEEN_BIT and n > c:
        total += vb * h * 4
    if backend == "torch":
        from .torch_chunked import PRODUCER_ROWS

        total += min(c, PRODUCER_ROWS) * vb * 4
    if device == "cpu" and dtype in SIXTEEN_BIT:
        total += 4 * (c * vb + vb * h + c * h)
    return total


def chunk_scales(grad_logp: torch.Tensor, chunk: int, dtype: torch.dtype) -> list[float]:
    """Per token chunk, the power of two the fp16 rule multiplies ``g`` by (1.0 unless fp16)."""
    n = grad_logp.shape[0]
    count = math.ceil(n / chunk) if n else 0
    if dtype != torch.float16 or count == 0:
        return [1.0] * count
    pad = count * chunk - n
    g = torch.nn.functional.pad(grad_logp.abs(), (0, pad)).view(count, chunk)
    scales = []
    for m in g.amax(dim=1).tolist():  # one device sync for all chunks
        if not (m > 0 and math.isfinite(m)):
            scales.append(1.0)
            continue
        k = FP16_TARGET_EXPONENT - math.ceil(math.log2(m))
        scales.append(2.0 ** max(-60, min(60, k)))
    return scales


def _has_out_dtype() -> bool:
    return hasattr(torch.ops.aten.addmm, "dtype_out")


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0,
              accumulate: bool) -> None:
    """``out = (out if accumulate else 0) + alpha * (a @ b)``, the products summed in fp32.

    CUDA with 16-bit operands and an fp32 ``out``: one cuBLAS call with ``out_dtype=float32``.
    16-bit ``out`` (written once, never accumulated): cuBLAS sums in fp32 and rounds once.
    CPU with 16-bit operands: fp32 copies of the operands (torch's CPU GEMMs have no fp32 output
    for 16-bit inputs).
    """
    beta = 1.0 if accumulate else 0.0
    if a.dtype == out.dtype:
        if out.dtype in SIXTEEN_BIT and accumulate:
            raise ValueError("accumulating into a 16-bit buffer would round every partial sum")
        if out.dtype in SIXTEEN_BIT and out.device.type != "cuda":
            tmp = torch.mm(a.float(), b.float())
            out.copy_(tmp.mul_(alpha) if alpha != 1.0 else tmp)
            return
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
        return
    if out.dtype != torch.float32:
        raise ValueError(f"gemm_into: output dtype {out.dtype} for {a.dtype} operands")
    if out.device.type == "cuda" and _has_out_dtype():
        torch.addmm(out, a, b, torch.float32, beta=beta, alpha=alpha, out=out)
    else:
        torch.addmm(out, a.float(), b.float(), beta=beta, alpha=alpha, out=out)


def chunked_logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh: bool, need_dw: bool,
                              *, produce_g: Producer, token_chunk: int | None = None,
                              vocab_band: int | None = None):
    """Gradients of ``sum_t grad_logp[t] * logp[t]`` with respect to hidden and weight.

    Args:
        hidden [N, H], weight [V, H]: fp32, bf16 or fp16, same dtype and device.
        labels [N]: int32 or int64 ids in [0, V) (ignored rows already removed).
        lse [N] fp32: log-sum-exp from the forward. grad_logp [N] fp32: upstream gradient.
        produce_g: the backend's G producer (module docstring).
        token_chunk, vocab_band: chunk sizes (default ``TOKEN_CHUNK``, ``VOCAB_BAND``).

    Returns ``(dH in hidden.dtype or None, dW in weight.dtype or None)``.
    """
    if not (need_dh or need_dw):
        return None, None
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    labels32 = labels.to(torch.int32).contiguous()
    lse = lse.float().contiguous()
    grad_logp = grad_logp.float().contiguous()
    dh = torch.zeros(n, h, dtype=torch.float32, device=device) if need_dh else None
    dw = torch.empty(v, h, dtype=weight.dtype, device=device) if need_dw else None
    if n == 0:
        if need_dw:
            dw.zero_()
        return (dh.to(dtype) if need_dh else None), dw
    c, vb = chunk_sizes(n, v, token_chunk, vocab_band)
    chunks = [(t0, min(n, t0 + c)) for t0 in range(0, n, c)]
    scales = chunk_scales(grad_logp, c, dtype)
    g_scaled = [grad_logp[t0:t1] * s if s != 1.0 else grad_logp[t0:t1]
                for (t0, t1), s in zip(chunks, scales)]
    tile = torch.empty(c * vb, dtype=dtype, device=device)
    single = len(chunks) == 1
    # fp32 weights: dW itself is the fp32 accumulator.
    acc = None
    if need_dw and not single and dw.dtype != torch.float32:
        acc = torch.empty(vb, h, dtype=torch.float32, device=device)

    for v0 in range(0, v, vb):
        v1 = min(v, v0 + vb)
        w_band = weight[v0:v1]
        dw_band = None
        if need_dw:
            dw_band = dw[v0:v1] if acc is None else acc[: v1 - v0]
        for i, (t0, t1) in enumerate(chunks):
            g_tile = tile[: (t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0)
            s = scales[i] * float(produce_g(hidden[t0:t1], w_band, labels32[t0:t1], lse[t0:t1],
                                            g_scaled[i], v0, g_tile))
            inv = 1.0 / s
            if need_dh:
                gemm_into(dh[t0:t1], g_tile, w_band, alpha=inv, accumulate=True)
            if need_dw:
                gemm_into(dw_band, g_tile.T, hidden[t0:t1], alpha=inv, accumulate=i > 0)
        if acc is not None:
            dw[v0:v1].copy_(dw_band)
    return (dh.to(dtype) if need_dh else None), dw
