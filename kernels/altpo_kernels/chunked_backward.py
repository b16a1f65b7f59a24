"""The backward of the fused linear log-prob as bounded chunks: one loop that every backend uses.

For ``logp_t = log_softmax(h_t W^T)[label_t]`` and an upstream gradient ``g_t``, the gradient of the
logits row is ``G_t = g_t (onehot(label_t) - exp(z_t - lse_t))``, and

    dH = G @ W          dW = G^T @ H

``chunked_logprobs_backward`` walks vocabulary bands (outer) and token chunks (inner). For each
(band, chunk) a *G producer* recomputes that ``[C, Vb]`` block of logits and writes ``G`` into one
reused workspace tile (16-bit for 16-bit inputs); then two GEMMs through torch (cuBLAS on CUDA)

    dH[chunk]  += G @ W[band]            (fp32 accumulator [N, H])
    dW[band]   += G^T @ H[chunk]         (fp32 accumulator [Vb, H], or dW itself)

accumulate in fp32 (``out_dtype=torch.float32`` on CUDA once a probe has checked it on the device,
fp32 operands on the CPU or where the probe failed). There are no atomics and the order is fixed,
so dH and dW are bit-identical run to run. When all tokens fit one chunk and the weights are bf16,
each band of dW is written once by one GEMM (fp32 accumulation inside the GEMM with reduced-precision
split-K reduction switched off, one rounding to bf16) and no accumulator exists. The whole loop runs
under :class:`gemm_numerics`: fp32 inputs keep IEEE fp32 GEMMs whatever the global
``set_float32_matmul_precision`` (``FP32_MATMUL_PRECISION = None`` follows it instead).

The producer interface (``produce_g``), shared by the torch, triton and cuda backends::

    produce_g(h_chunk [C, H], w_band [Vb, H], labels_chunk int32 [C] (absolute vocabulary ids),
              lse_chunk fp32 [C], g_chunk fp32 [C], band_start: int, out [C, Vb]) -> float

fills ``out`` (16-bit for 16-bit inputs, fp32 for fp32 inputs) with ``G`` times a scale and returns
that scale; the GEMMs divide it out (``alpha = 1 / scale``).

fp16 anti-underflow rule: fp16 has 5 exponent bits, so ``g_t * p`` for small upstream gradients
(retain tokens: ``alpha / n_retain`` ~ 1e-4) times small probabilities would flush to zero. Before
calling the producer, the loop multiplies ``g`` by ``s = 2**(14 - ceil(log2 max|g|))`` over all
tokens (a power of two, computed on the device: no host synchronisation), and at the end divides
the fp32 dH and dW accumulators by it (exact). Then ``|s G| <= s max|g| <= 2**14`` stays below
fp16's 65504, and an entry flushes only below 2**-24 in scaled units, i.e. 2**-38 of the largest
possible entry. fp16 dW is therefore always accumulated in fp32 (also with one chunk). bf16 and
fp32 have fp32's exponent range and use ``s = 1``.

Workspace (bytes, excluding the inputs and the outputs: dW in the weight's dtype and the fp32 dH
accumulator [N, H], which is the dH output before its final cast), ``e`` the element size of G
(2 for 16-bit inputs, 4 for fp32), ``C = min(N, token_chunk)``, ``Vb = min(V, vocab_band)``
(default band: :func:`default_vocab_band`)::

    G tile                     C * Vb * e
    dW band accumulator        Vb * H * 4     only with need_dw, 16-bit weights and (N > C or fp16)
    label ids                  N * 4          int32 copy of the labels
    torch producer             min(C, 1024) * Vb * 4   fp32 logits rows (torch backend only)

plus, on the CPU with 16-bit inputs only (torch's CPU GEMMs have no fp32 output for 16-bit
operands), fp32 copies of the GEMM operands: ``4 * (C * Vb + Vb * H + C * H)``.
:func:`workspace_bytes` computes it. At H=2048, V=128256, N=16384 bf16 with the default chunks
(C=4096, Vb=4096) the triton backend needs 32 + 32 MiB + 64 KiB = 64.1 MiB, the torch backend
16 MiB more.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

# Default token chunk: C x Vb GEMMs of 4096 x Vb (x H) are large enough to run cuBLAS near its peak.
TOKEN_CHUNK = 4096
# Default vocabulary band: None means default_vocab_band(), a formula of N, H, V and the dtype;
# an integer fixes it for every call.
VOCAB_BAND = None
# The band formula's bounds: the G tile plus the dW band accumulator within 64 MiB (1/8 of the
# 512 MiB fp32 logits tile TRL's fused head works in), bands of 1024 to 8192 entries.
BAND_WORKSPACE = 64 * 2**20
MIN_BAND, MAX_BAND = 1024, 8192
# Off CUDA (the CPU), bands stay at 2048: the CPU's caches favour small tiles (the CPU band sweep
# measured 4096 1.8x slower than 1024 at N=512, H=64) and its GEMMs gain nothing from larger ones.
CPU_BAND = 2048
# fp16: scale G so that its largest possible entry is about 2**14 (see the module docstring).
FP16_TARGET_EXPONENT = 14
SIXTEEN_BIT = (torch.bfloat16, torch.float16)

Producer = Callable[..., float]


# Rows of the chunk whose fp32 logits the torch producer (torch_chunked.produce_g) holds at once:
# [1024, Vb] fp32 is 8 MiB at Vb = 2048, so the torch backend's workspace stays near the fused one's.
PRODUCER_ROWS = 1024


def default_vocab_band(n: int, h: int, v: int, dtype: torch.dtype, need_dw: bool = True,
                       token_chunk: int | None = None, device_type: str = "cuda") -> int:
    """The vocabulary band when none is given: the largest power of two in [MIN_BAND, MAX_BAND]
    whose G tile (``C x Vb``) and dW band accumulator (``Vb x H`` fp32, where one is needed) fit
    ``BAND_WORKSPACE``; at most V.

    Why larger is better up to there: every band re-reads and re-writes the fp32 dH accumulator of
    each token chunk (``C x H x 8`` bytes per ``2 C Vb H`` FLOPs of its GEMM: ``Vb / 4`` FLOPs a
    byte, which wants Vb in the thousands on an H100), and fewer bands mean fewer launches. H =
    2048, V = 128256, bf16: N = 16384 gives 4096 (32 MiB tile + 32 MiB accumulator, 32 bands);
    N = 4096 (one chunk, no accumulator) gives 8192; fp32 gives 4096. Off CUDA: ``CPU_BAND``.
    """
    if device_type != "cuda":
        return max(1, min(v, CPU_BAND))
    c = max(1, min(n, TOKEN_CHUNK if token_chunk is None else int(token_chunk)))
    e = 2 if dtype in SIXTEEN_BIT else 4
    acc = need_dw and dtype in SIXTEEN_BIT and (n > c or dtype == torch.float16)
    per_entry = c * e + (h * 4 if acc else 0)
    vb = MAX_BAND
    while vb > MIN_BAND and vb * per_entry > BAND_WORKSPACE:
        vb //= 2
    return max(1, min(v, vb))


def chunk_sizes(n: int, v: int, token_chunk: int | None = None, vocab_band: int | None = None,
                *, h: int = 0, dtype: torch.dtype = torch.bfloat16, need_dw: bool = True,
                device_type: str = "cuda") -> tuple[int, int]:
    """``(C, Vb)``: the token chunk and vocabulary band the loop will use for N tokens, V entries
    (hidden size ``h`` and ``dtype`` set the default band, :func:`default_vocab_band`)."""
    c = TOKEN_CHUNK if token_chunk is None else int(token_chunk)
    if vocab_band is None:
        vocab_band = VOCAB_BAND
    if vocab_band is None:
        vb = default_vocab_band(n, h, v, dtype, need_dw, c, device_type)
    else:
        vb = int(vocab_band)
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
    c, vb = chunk_sizes(n, v, token_chunk, vocab_band, h=h, dtype=dtype, need_dw=need_dw,
                        device_type=device)
    e = 2 if dtype in SIXTEEN_BIT else 4
    total = c * vb * e + n * 4
    if need_dw and dtype in SIXTEEN_BIT and (n > c or dtype == torch.float16):
        total += vb * h * 4
    if backend == "torch":
        total += min(c, PRODUCER_ROWS) * vb * 4
    if device == "cpu" and dtype in SIXTEEN_BIT:
        total += 4 * (c * vb + vb * h + c * h)
    return total


def chunk_scales(grad_logp: torch.Tensor, chunk: int, dtype: torch.dtype) -> list[float]:
    """Per token chunk, the power of two the fp16 rule would give that chunk alone (1.0 unless
    fp16). Host values, one device synchronisation: for inspection and tests; the loop itself uses
    :func:`fp16_scale`, one scale for all tokens, computed on the device."""
    n = grad_logp.shape[0]
    count = math.ceil(n / chunk) if n else 0
    if dtype != torch.float16 or count == 0:
        return [1.0] * count
    pad = count * chunk - n
    g = torch.nn.functional.pad(grad_logp.abs(), (0, pad)).view(count, chunk)
    return fp16_scale(g.amax(dim=1)).tolist()


def fp16_scale(max_abs: torch.Tensor) -> torch.Tensor:
    """``2**(14 - ceil(log2 m))`` elementwise for m = ``max_abs`` (fp32, on its device, no host
    synchronisation), the exponent clamped to [-60, 60]; 1 where m is 0 or not finite."""
    m = max_abs.float()
    mantissa, exponent = torch.frexp(m)  # m = mantissa * 2**exponent, mantissa in [0.5, 1)
    ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)
    k = (FP16_TARGET_EXPONENT - ceil_log2).clamp(-60, 60).float()
    s = torch.exp2(k)
    return torch.where((m > 0) & torch.isfinite(m), s, torch.ones_like(s))


# ------------------------------------------------------------------------------------------------
# Safe GEMMs on CUDA
#
# 16-bit operands into an fp32 accumulator go through ``torch.addmm(..., out_dtype=float32)``.
# That overload exists in torch >= 2.8, but whether cuBLAS honours it (fp32 output, beta = 1
# accumulation) is checked once per device by :func:`probe_addmm_out_dtype` on tiny shapes against
# a float64 product; where it is missing or wrong the GEMMs upcast their operands to fp32 instead
# (same values, more traffic and memory) and a warning says so once.

_ADDMM_PROBE: dict = {}
# Device types whose 16-bit GEMMs take the out_dtype path (tests add "cpu" with a fake addmm).
OUT_DTYPE_DEVICE_TYPES = ("cuda",)
_addmm = torch.addmm


def probe_addmm_out_dtype(device, addmm=None) -> tuple[bool, str]:
    """Run ``addmm(c, a, b, float32, beta=1, alpha=0.5, out=c)`` with bf16 and fp16 ``a``, ``b``
    (37 x 53 x 29, seeded) on ``device`` and compare with the float64 result: ``(ok, reason)``.

    Passes when every entry is within 1e-5 of the sum of the magnitudes of its terms (fp32
    accumulation of exact 16-bit products; a 16-bit accumulation or a dropped ``c`` is 1e-3 off).
    """
    addmm = addmm or _addmm
    if addmm is torch.addmm and not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False, f"torch {torch.__version__} has no addmm out_dtype overload"
    gen = torch.Generator().manual_seed(20260)
    for dtype in SIXTEEN_BIT:
        a = torch.randn(37, 53, generator=gen).to(dtype)
        b = torch.randn(53, 29, generator=gen).to(dtype)
        c = torch.randn(37, 29, generator=gen)
        ref = c.double() + 0.5 * (a.double() @ b.double())
        bound = 1e-5 * (c.double().abs() + 0.5 * (a.double().abs() @ b.double().abs()))
        out = c.to(device)
        try:
            addmm(out, a.to(device), b.to(device), torch.float32, beta=1.0, alpha=0.5, out=out)
        except Exception as err:  # noqa: BLE001 - any failure means: do not use it
            return False, f"{dtype}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        got = out.detach().double().cpu()
        if out.dtype != torch.float32 or not torch.isfinite(got).all():
            return False, f"{dtype}: output dtype {out.dtype} or non-finite values"
        excess = ((got - ref).abs() - bound).max().item()
        if excess > 0:
            worst = ((got - ref).abs() / bound.clamp_min(1e-30)).max().item()
            return False, f"{dtype}: off the float64 product by up to {worst:.3g}x the fp32 bound"
    return True, "ok"


def addmm_out_dtype_ok(device) -> bool:
    """The cached probe result for ``device`` (probed on first use)."""
    key = str(torch.device(device))
    if key not in _ADDMM_PROBE:
        ok, reason = probe_addmm_out_dtype(device)
        _ADDMM_PROBE[key] = (ok, reason)
        if not ok:
            warnings.warn(
                f"altpo_kernels: torch.addmm(..., out_dtype=torch.float32) failed its check on {key} "
                f"({reason}); the backward's GEMMs upcast 16-bit operands to fp32 instead (same "
                f"results, slower, more memory). Upgrading torch may restore the fast path.",
                RuntimeWarning, stacklevel=3)
    return _ADDMM_PROBE[key][0]


def set_addmm_probe_result(device, ok: bool, reason: str = "set by caller") -> None:
    """Record a probe result for ``device`` without running it (tests; callers that know)."""
    _ADDMM_PROBE[str(torch.device(device))] = (bool(ok), reason)


def addmm_probe_results() -> dict:
    """``{device: (ok, reason)}`` of every probe run or set so far."""
    return dict(_ADDMM_PROBE)


# The matmul settings the backward's GEMMs run under, whatever the caller's global settings:
# 16-bit GEMMs reduce split-K partial sums in fp32 (torch's default lets cuBLAS reduce them in 16
# bit), and fp32 GEMMs stay IEEE fp32 (a global set_float32_matmul_precision("high") would turn them
# into TF32, about 1e-3 relative error). Set FP32_MATMUL_PRECISION = None to follow the global
# setting instead.
FP32_MATMUL_PRECISION: str | None = "highest"


class gemm_numerics:
    """Context manager: the settings above for the duration of a backward, restored on exit."""

    def __init__(self, dtype: torch.dtype, device_type: str):
        self.dtype, self.device_type = dtype, device_type
        self.saved = None

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.saved = (m.allow_bf16_reduced_precision_reduction,
                      m.allow_fp16_reduced_precision_reduction, torch.get_float32_matmul_precision())
        if self.device_type == "cuda":
            m.allow_bf16_reduced_precision_reduction = False
            m.allow_fp16_reduced_precision_reduction = False
        if self.dtype == torch.float32 and FP32_MATMUL_PRECISION is not None:
            torch.set_float32_matmul_precision(FP32_MATMUL_PRECISION)
        return self

    def __exit__(self, *exc):
        m = torch.backends.cuda.matmul
        bf16, fp16, fp32 = self.saved
        m.allow_bf16_reduced_precision_reduction = bf16
        m.allow_fp16_reduced_precision_reduction = fp16
        if torch.get_float32_matmul_precision() != fp32:
            torch.set_float32_matmul_precision(fp32)
        return False


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0,
              accumulate: bool) -> None:
    """``out = (out if accumulate else 0) + alpha * (a @ b)``, the products summed in fp32.

    CUDA with 16-bit operands and an fp32 ``out``: one cuBLAS call with ``out_dtype=float32`` when
    the probe passed on this device, else fp32 copies of the operands.
    16-bit ``out`` (written once, never accumulated, bf16 only): cuBLAS sums in fp32 and rounds
    once; run inside :class:`gemm_numerics` so that split-K partial sums are not reduced in 16 bit.
    CPU with 16-bit operands: fp32 copies of the operands (torch's CPU GEMMs have no fp32 output
    for 16-bit inputs).
    """
    beta = 1.0 if accumulate else 0.0
    if a.dtype == out.dtype:
        if out.dtype in SIXTEEN_BIT and accumulate:
            raise ValueError("accumulating into a 16-bit buffer would round every partial sum")
        if out.dtype in SIXTEEN_BIT and out.device.type not in OUT_DTYPE_DEVICE_TYPES:
            tmp = torch.mm(a.float(), b.float())
            out.copy_(tmp.mul_(alpha) if alpha != 1.0 else tmp)
            return
        _addmm(out, a, b, beta=beta, alpha=alpha, out=out)
        return
    if out.dtype != torch.float32:
        raise ValueError(f"gemm_into: output dtype {out.dtype} for {a.dtype} operands")
    if out.device.type in OUT_DTYPE_DEVICE_TYPES and addmm_out_dtype_ok(out.device):
        _addmm(out, a, b, torch.float32, beta=beta, alpha=alpha, out=out)
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
    c, vb = chunk_sizes(n, v, token_chunk, vocab_band, h=h, dtype=dtype, need_dw=need_dw,
                        device_type=device.type)
    chunks = [(t0, min(n, t0 + c)) for t0 in range(0, n, c)]
    # fp16: one power-of-two scale for all tokens, computed and applied on the device (no host
    # synchronisation); undone exactly on the fp32 accumulators at the end.
    inv_scale = None
    if dtype == torch.float16:
        scale = fp16_scale(grad_logp.abs().amax())
        grad_logp = grad_logp * scale
        inv_scale = 1.0 / scale
    tile = torch.empty(c * vb, dtype=dtype, device=device)
    single = len(chunks) == 1
    # fp32 weights: dW itself is the fp32 accumulator. bf16 with one chunk: each band is written
    # once by one GEMM (fp32 accumulation, one rounding). fp16 always accumulates in fp32: its
    # G carries the scale, and only the fp32 accumulator can hold the scaled sums.
    acc = None
    if need_dw and dw.dtype != torch.float32 and (not single or dtype == torch.float16):
        acc = torch.empty(vb, h, dtype=torch.float32, device=device)

    with gemm_numerics(dtype, device.type):
        for v0 in range(0, v, vb):
            v1 = min(v, v0 + vb)
            w_band = weight[v0:v1]
            dw_band = None
            if need_dw:
                dw_band = dw[v0:v1] if acc is None else acc[: v1 - v0]
            for i, (t0, t1) in enumerate(chunks):
                g_tile = tile[: (t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0)
                s = float(produce_g(hidden[t0:t1], w_band, labels32[t0:t1], lse[t0:t1],
                                    grad_logp[t0:t1], v0, g_tile))
                inv = 1.0 / s
                if need_dh:
                    gemm_into(dh[t0:t1], g_tile, w_band, alpha=inv, accumulate=True)
                if need_dw:
                    gemm_into(dw_band, g_tile.T, hidden[t0:t1], alpha=inv, accumulate=i > 0)
            if acc is not None:
                if inv_scale is not None:
                    dw_band.mul_(inv_scale)
                dw[v0:v1].copy_(dw_band)
    if need_dh and inv_scale is not None:
        dh.mul_(inv_scale)
    return (dh.to(dtype) if need_dh else None), dw
