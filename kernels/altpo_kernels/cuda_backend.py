"""The ``cuda`` backend: cuBLAS (through ``torch.mm``) for every matmul, small CUDA C++ epilogues.

It computes the same thing as the Triton backend without Triton's code generation, so each can
check the other at full size on a GPU. Per (token chunk, vocabulary band):

    forward   z = torch.mm(h_chunk, w_band.T) into an fp32 tile; the forward epilogue folds the tile
              into each row's running (max, sum-exp) and picks the label logit.
    backward  the shared chunk loop (``altpo_kernels.chunked_backward``) asks ``produce_g`` for
              each tile: torch.mm writes the logits, the backward epilogue turns them in place into
              G = g * (onehot - exp(z - lse)) times a scale, and the loop runs cuBLAS for dH and dW.

The epilogues live in ``kernels/csrc`` behind a plain C ABI (``altpo_csrc.h``) and are loaded with
ctypes, so they need no torch headers. Build them once, in the repository root:

    cmake -S . -B build && cmake --build build

The library is looked for, in order, at ``$ALTPO_CSRC_LIB``, at ``build/libaltpo_csrc.so`` in the
repository, and next to this file. ``python -m altpo_kernels.cuda_backend`` says which was found.
Without it the package works as before and ``backend="cuda"`` raises an error naming the command.

A host build of the same C ABI (``libaltpo_csrc_host.so``, ``$ALTPO_CSRC_HOST_LIB``) runs the same
epilogue math on the CPU. The functions below use it for CPU tensors; ``backend="cuda"`` itself
refuses CPU tensors, so this path serves the tests, which run the whole chunk loop through it.

Implements the backend interface described in ``altpo_kernels.torch_chunked``.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

import torch

from .torch_chunked import gather_segments, segment_sum

__all__ = [
    "logprobs_forward", "logprobs_backward", "segment_sum", "gather_segments", "make_g_producer",
    "g_scale", "load_library", "library_status", "BUILD_COMMAND",
]

BUILD_COMMAND = "cmake -S . -B build && cmake --build build"
LIBRARY_ENV = {"cuda": "ALTPO_CSRC_LIB", "host": "ALTPO_CSRC_HOST_LIB"}
LIBRARY_FILE = {"cuda": "libaltpo_csrc.so", "host": "libaltpo_csrc_host.so"}
ABI_VERSION = 2
REPO_ROOT = Path(__file__).resolve().parents[2]

# Forward tile: [TOKEN_CHUNK, VOCAB_BAND] fp32 logits, 64 MiB, reused for every (chunk, band). Each
# torch.mm is then 2 * 2048 * 8192 * H flops (69 GFLOP at H = 2048), long enough for cuBLAS to
# reach its full rate and for the epilogue launch to cost nothing.
TOKEN_CHUNK = 2048
VOCAB_BAND = 8192

# The fp16 G scale (kernels/csrc/altpo_math.h, g_scale): max|g| * scale lies in [2^14, 2^15).
F16_GRAD_EXPONENT = 15
MAX_SCALE_EXPONENT = 100

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class CsrcLibraryError(RuntimeError):
    """The epilogue library is missing, unloadable, or reported an error."""


# ------------------------------------------------------------------------------------------------
# Loading the library


def library_candidates(kind: str = "cuda") -> list[Path]:
    """Where ``load_library(kind)`` looks, in order."""
    paths = []
    env = os.environ.get(LIBRARY_ENV[kind])
    if env:
        paths.append(Path(env))
    paths.append(REPO_ROOT / "build" / LIBRARY_FILE[kind])
    paths.append(Path(__file__).resolve().parent / LIBRARY_FILE[kind])
    return paths


_LOADED: dict[str, ctypes.CDLL] = {}


def load_library(kind: str = "cuda") -> ctypes.CDLL:
    """The epilogue library (``"cuda"``, or ``"host"`` for the CPU build), loaded once."""
    if kind in _LOADED:
        return _LOADED[kind]
    if kind not in LIBRARY_FILE:
        raise ValueError(f"kind must be 'cuda' or 'host', got {kind!r}")
    candidates = library_candidates(kind)
    env = os.environ.get(LIBRARY_ENV[kind])
    if env and not Path(env).is_file():
        raise CsrcLibraryError(f"{LIBRARY_ENV[kind]}={env} is not a file; point it at {LIBRARY_FILE[kind]} "
                               f"built by `{BUILD_COMMAND}` (in the repository root), or unset it")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        looked = ", ".join(str(p) for p in candidates)
        need = "nvcc (CUDA 12 or later) and cmake" if kind == "cuda" else "cmake and a C++ compiler"
        raise CsrcLibraryError(
            f'backend="cuda" needs the epilogue library {LIBRARY_FILE[kind]}, which is not built '
            f"(looked at {looked}). Build it in the repository root with `{BUILD_COMMAND}` "
            f"(needs {need}), or set {LIBRARY_ENV[kind]} to its path; backend=\"triton\" or "
            f'"torch" need no build'
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise CsrcLibraryError(f"cannot load {path}: {err}; rebuild it with `{BUILD_COMMAND}`") from err
    lib.altpo_abi_version.restype = ctypes.c_int
    lib.altpo_abi_version.argtypes = []
    # the version first: a library built from older sources lacks newer entry points, and
    # declaring those would fail with a bare AttributeError instead of saying "rebuild"
    if lib.altpo_abi_version() != ABI_VERSION:
        raise CsrcLibraryError(f"{path} has C ABI version {lib.altpo_abi_version()}, this package expects "
                               f"{ABI_VERSION}; rebuild it with `{BUILD_COMMAND}`")
    _declare(lib)
    if bool(lib.altpo_is_cuda()) != (kind == "cuda"):
        raise CsrcLibraryError(f"{path} is not the {kind} build of the epilogue library")
    _LOADED[kind] = lib
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i32, i64, u64, ptr, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_float
    lib.altpo_abi_version.restype = i32
    lib.altpo_abi_version.argtypes = []
    lib.altpo_is_cuda.restype = i32
    lib.altpo_is_cuda.argtypes = []
    lib.altpo_last_error.restype = ctypes.c_char_p
    lib.altpo_last_error.argtypes = []
    lib.altpo_g_scale.restype = f32
    lib.altpo_g_scale.argtypes = [f32, i32]
    lib.altpo_forward_epilogue.restype = i32
    lib.altpo_forward_epilogue.argtypes = [ptr, i32, i64, i64, i64, ptr, i64, ptr, ptr, ptr, u64]
    lib.altpo_backward_epilogue.restype = i32
    lib.altpo_backward_epilogue.argtypes = [ptr, i32, i64, ptr, i32, i64, i64, i64, ptr, i64, ptr, ptr, f32, u64]
    lib.altpo_forward_epilogue_tf.restype = i32
    lib.altpo_forward_epilogue_tf.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, f32, f32, i32, ptr, ptr, ptr,
                                              ptr, u64]
    lib.altpo_backward_epilogue_tf.restype = i32
    lib.altpo_backward_epilogue_tf.argtypes = [ptr, i64, ptr, i32, i64, i64, i64, ptr, i64, ptr, f32, f32, i32,
                                               ptr, ptr, ptr, ptr, f32, u64]


def library_status() -> str:
    """One line per library: where it was found, or that it is absent and how to build it."""
    lines = []
    for kind in ("cuda", "host"):
        try:
            lib = load_library(kind)
            lines.append(f"{kind}: {lib._name}")
        except CsrcLibraryError as err:
            lines.append(f"{kind}: absent. {err}")
    return "\n".join(lines)


def _library_for(device: torch.device) -> ctypes.CDLL:
    return load_library("cuda" if device.type == "cuda" else "host")


def _check(lib: ctypes.CDLL, rc: int) -> None:
    if rc != 0:
        raise CsrcLibraryError(lib.altpo_last_error().decode(errors="replace"))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


# ------------------------------------------------------------------------------------------------
# The epilogues on torch tensors


def _tile_args(name: str, t: torch.Tensor):
    if t.dim() != 2 or t.stride(1) != 1 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        raise ValueError(f"{name} must be a 2-D tile with contiguous rows, got shape {tuple(t.shape)} "
                         f"and strides {t.stride()}")
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return t.data_ptr(), _DTYPE_CODES[t.dtype], max(t.stride(0), t.shape[1])


def _vector(name: str, t: torch.Tensor, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    if t.shape != (rows,) or t.dtype != dtype or not t.is_contiguous() or t.device != device:
        raise ValueError(f"{name} must be a contiguous {dtype} vector of {rows} entries on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t


def forward_epilogue(logits, labels, band_start: int, run_max, run_sum, label_logit) -> None:
    """Fold the logits tile [C, Vb] (absolute band ``[band_start, band_start + Vb)``) into the rows'
    running log-sum-exp state and pick the label logits that fall in the band (all fp32 [C])."""
    rows, cols = logits.shape
    ptr, code, ld = _tile_args("logits", logits)
    dev = logits.device
    labels = _vector("labels", labels, rows, torch.int32, dev)
    for name, t in (("run_max", run_max), ("run_sum", run_sum), ("label_logit", label_logit)):
        _vector(name, t, rows, torch.float32, dev)
    lib = _library_for(dev)
    _check(lib, lib.altpo_forward_epilogue(ptr, code, rows, cols, ld, labels.data_ptr(), band_start,
                                           run_max.data_ptr(), run_sum.data_ptr(),
                                           label_logit.data_ptr(), _stream(dev)))


def backward_epilogue(logits, out, labels, band_start: int, lse, g, scale: float) -> None:
    """out = g * scale * (onehot(label) - exp(logits - lse)), rounded to out's dtype. ``out`` may be
    ``logits`` itself (same dtype)."""
    rows, cols = logits.shape
    if tuple(out.shape) != (rows, cols):
        raise ValueError(f"out has shape {tuple(out.shape)}, the logits tile {(rows, cols)}")
    lp, lcode, lld = _tile_args("logits", logits)
    op, ocode, old = _tile_args("out", out)
    dev = logits.device
    labels = _vector("labels", labels, rows, torch.int32, dev)
    _vector("lse", lse, rows, torch.float32, dev)
    _vector("g", g, rows, torch.float32, dev)
    lib = _library_for(dev)
    _check(lib, lib.altpo_backward_epilogue(lp, lcode, lld, op, ocode, old, rows, cols, labels.data_ptr(),
                                            band_start, lse.data_ptr(), g.data_ptr(), float(scale),
                                            _stream(dev)))


def g_scale(max_abs_g: float, out_dtype: torch.dtype) -> float:
    """The factor a G producer multiplies G by (the chunk loop divides it out after the GEMMs).

    fp16 tiles: the power of two ``2^(15 - e)`` where ``max|g| = f * 2^e``, ``f`` in [0.5, 1)
    (``math.frexp``), so ``max|g| * scale`` lies in [2^14, 2^15): G's largest entry stays below
    fp16's 65504 (``|onehot - p| <= 1``) and small softmax terms stay clear of fp16's subnormals.
    The exponent is clamped to [-100, 100]. bf16 and fp32 tiles, and chunks whose max|g| is 0 or
    not finite, get 1. The same rule as ``altpo_g_scale`` in the C library (a test checks both).
    """
    max_abs_g = float(max_abs_g)
    if out_dtype != torch.float16 or not (max_abs_g > 0.0) or math.isinf(max_abs_g):
        return 1.0
    _, e = math.frexp(max_abs_g)
    k = max(-MAX_SCALE_EXPONENT, min(MAX_SCALE_EXPONENT, F16_GRAD_EXPONENT - e))
    return math.ldexp(1.0, k)


# ------------------------------------------------------------------------------------------------
# Logits tiles in fp32

_MM_OUT_DTYPE: dict = {}


def _mm_out_dtype_works(device, dtype) -> bool:
    """Whether torch.mm can write ``dtype`` products straight into an fp32 tile (``out_dtype``,
    CUDA, torch >= 2.8): cuBLAS accumulates in fp32 either way, and this skips a rounding to 16
    bit. Probed once per (device, dtype) on a 2 x 2 product."""
    key = (str(device), dtype)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            out = torch.empty(2, 2, dtype=torch.float32, device=device)
            torch.mm(a, a, out_dtype=torch.float32, out=out)
            _MM_OUT_DTYPE[key] = bool((out == 2).all())
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def logits_tile_fp32(h_chunk, w_band, out) -> None:
    """out [C, Vb] fp32 = h_chunk @ w_band.T, accumulated in fp32 from the inputs as given.

    Why fp32 and not a 16-bit tile: a logit of 20 rounded to bf16 moves by up to 0.06, which is 6 %
    of exp(z - lse) and 0.06 of a log-prob. On the CPU (the host-library tests) and where torch.mm
    has no ``out_dtype``, 16-bit inputs are upcast first (same values, more memory traffic).
    """
    if h_chunk.dtype == torch.float32:
        torch.mm(h_chunk, w_band.T, out=out)
    elif h_chunk.device.type == "cuda" and _mm_out_dtype_works(h_chunk.device, h_chunk.dtype):
        torch.mm(h_chunk, w_band.T, out_dtype=torch.float32, out=out)
    else:
        torch.mm(h_chunk.float(), w_band.float().T, out=out)


class _Workspace:
    """One reusable fp32 buffer, grown to the largest tile asked for."""

    def __init__(self, device):
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.float32, device=device)

    def tile(self, rows: int, cols: int) -> torch.Tensor:
        if self.buffer.numel() < rows * cols:
            self.buffer = torch.empty(rows * cols, dtype=torch.float32, device=self.device)
        return self.buffer[: rows * cols].view(rows, cols)


# ------------------------------------------------------------------------------------------------
# The backend interface


def _device_guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def logprobs_forward(hidden, weight, labels, *, token_chunk: int = TOKEN_CHUNK, vocab_band: int = VOCAB_BAND):
    """(logp [N] fp32, lse [N] fp32): torch.mm logits tiles folded by the forward epilogue."""
    n, v = hidden.shape[0], weight.shape[0]
    device = hidden.device
    _library_for(device)  # a missing library fails here, before any work
    labels32 = labels.to(torch.int32).contiguous()
    run_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=device)
    picked = torch.zeros(n, dtype=torch.float32, device=device)
    workspace = _Workspace(device)
    with _device_guard(device):
        for t0 in range(0, n, token_chunk):
            t1 = min(n, t0 + token_chunk)
            h = hidden[t0:t1]
            for v0 in range(0, v, vocab_band):
                v1 = min(v, v0 + vocab_band)
                tile = workspace.tile(t1 - t0, v1 - v0)
                logits_tile_fp32(h, weight[v0:v1], tile)
                forward_epilogue(tile, labels32[t0:t1], v0, run_max[t0:t1], run_sum[t0:t1], picked[t0:t1])
    lse = run_max + torch.log(run_sum)
    return picked - lse, lse


def make_g_producer(grad_logp, own_scale: bool = True):
    """A ``produce_g`` for the chunk loop: torch.mm logits, then the backward epilogue.

    ``produce_g(h_chunk [C,H], w_band [Vb,H], labels_chunk int32 [C], lse_chunk fp32 [C],
    g_chunk fp32 [C], band_start, out [C,Vb]) -> scale`` fills ``out`` with ``scale * G`` and
    returns the scale (:func:`g_scale` of the chunk's max|g|). fp32 ``out`` holds the logits
    itself (in place); for 16-bit ``out`` the logits go to a reused fp32 tile first.

    ``grad_logp`` is the loop's whole fp32 gradient vector: its |g| is copied to the host once, so
    the per-chunk maxima that set the scales cost no device synchronisation when ``g_chunk`` is a
    slice of it (any other ``g_chunk`` is reduced on its device).

    ``own_scale=False``: the scale is always 1 and nothing is copied to the host. The chunk loop
    uses this: it has already scaled fp16 ``g`` on the device so that max|g| <= 2^14, which keeps
    every G entry below fp16's 65504.
    """
    grad_logp = grad_logp.detach()
    abs_host = grad_logp.abs().float().cpu() if own_scale and grad_logp.is_contiguous() else None
    base = grad_logp.data_ptr()
    workspace = _Workspace(grad_logp.device)

    def chunk_max_abs(g_chunk) -> float:
        if g_chunk.numel() == 0:
            return 0.0
        if (abs_host is not None and g_chunk.is_contiguous() and g_chunk.dtype == torch.float32
                and g_chunk.device == grad_logp.device
                and g_chunk.untyped_storage().data_ptr() == grad_logp.untyped_storage().data_ptr()):
            offset = (g_chunk.data_ptr() - base) // 4
            if 0 <= offset and offset + g_chunk.numel() <= abs_host.numel():
                return float(abs_host[offset: offset + g_chunk.numel()].max())
        return float(g_chunk.detach().abs().max())

    def produce_g(h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, band_start: int, out) -> float:
        rows, cols = h_chunk.shape[0], w_band.shape[0]
        if tuple(out.shape) != (rows, cols):
            raise ValueError(f"out must be [{rows}, {cols}] (h_chunk rows x w_band rows), got {tuple(out.shape)}")
        scale = g_scale(chunk_max_abs(g_chunk), out.dtype) if own_scale else 1.0
        logits = out if out.dtype == torch.float32 else workspace.tile(rows, cols)
        with _device_guard(out.device):
            logits_tile_fp32(h_chunk, w_band, logits)
            backward_epilogue(logits, out, labels_chunk.to(torch.int32).contiguous(), int(band_start),
                              lse_chunk.float().contiguous(), g_chunk.float().contiguous(), scale)
        return scale

    return produce_g


def _chunk_loop():
    try:
        from .chunked_backward import chunked_logprobs_backward
    except ImportError as err:
        raise CsrcLibraryError(
            "the cuda backend's backward runs the shared chunk loop altpo_kernels.chunked_backward, "
            "which this installation lacks; use backend=\"triton\" or \"torch\" for gradients"
        ) from err
    return chunked_logprobs_backward


def logprobs_backward(hidden, weight, labels, lse, grad_logp, need_dh=True, need_dw=True):
    """(dH, dW) of ``sum_t grad_logp[t] * logp[t]``: the shared chunk loop, G from the epilogue."""
    if not (need_dh or need_dw):
        return None, None
    _library_for(hidden.device)
    loop = _chunk_loop()
    grad = grad_logp.contiguous().float()
    return loop(hidden, weight, labels, lse.contiguous().float(), grad, need_dh, need_dw,
                produce_g=make_g_producer(grad, own_scale=False))


# ------------------------------------------------------------------------------------------------
# Head transforms (bias, logit scale, softcap, temperature, entropy): the interface of
# torch_chunked.transformed_forward / transformed_backward, with the *_tf epilogues on the fp32
# logits tiles. The flags are those of altpo_math.h.

_HAS_BIAS, _SCALE, _SOFTCAP, _ENTROPY = 1, 2, 4, 8


def _tf_flags(k: dict, has_bias: bool, entropy: bool) -> int:
    return ((_HAS_BIAS if has_bias else 0) | (_SCALE if k["SCALE"] else 0)
            | (_SOFTCAP if k["SOFTCAP"] else 0) | (_ENTROPY if entropy else 0))


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def transformed_forward(hidden, weight, labels, bias, tf, *, entropy: bool = True,
                        token_chunk: int = TOKEN_CHUNK, vocab_band: int = VOCAB_BAND):
    """``(logp, entropy, lse, mu)`` fp32 [N] (entropy and mu None without ``entropy``): torch.mm
    fp32 logits tiles folded by the transformed forward epilogue."""
    from .head_constants import transform_constants

    n, v = hidden.shape[0], weight.shape[0]
    device = hidden.device
    lib = _library_for(device)
    k = transform_constants(tf)
    flags = _tf_flags(k, bias is not None, entropy)
    bias32 = bias.float().contiguous() if bias is not None else None
    labels32 = labels.to(torch.int32).contiguous()
    run_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=device)
    run_ent = torch.zeros(n, dtype=torch.float32, device=device) if entropy else None
    picked = torch.zeros(n, dtype=torch.float32, device=device)
    workspace = _Workspace(device)
    with _device_guard(device):
        for t0 in range(0, n, token_chunk):
            t1 = min(n, t0 + token_chunk)
            for v0 in range(0, v, vocab_band):
                v1 = min(v, v0 + vocab_band)
                tile = workspace.tile(t1 - t0, v1 - v0)
                logits_tile_fp32(hidden[t0:t1], weight[v0:v1], tile)
                _check(lib, lib.altpo_forward_epilogue_tf(
                    tile.data_ptr(), t1 - t0, v1 - v0, v1 - v0, labels32[t0:t1].data_ptr(), v0,
                    _ptr(bias32[v0:v1] if bias32 is not None else None), k["pre_scale"],
                    k["post_scale"], flags, run_max[t0:t1].data_ptr(), run_sum[t0:t1].data_ptr(),
                    _ptr(run_ent[t0:t1] if entropy else None), picked[t0:t1].data_ptr(),
                    _stream(device)))
    lse = run_max + torch.log(run_sum)
    if not entropy:
        return picked - lse, None, lse, None
    ent = torch.log(run_sum) - run_ent / run_sum
    return picked - lse, ent, lse, lse - ent


def transformed_backward(hidden, weight, labels, bias, tf, lse, mu, g_logp, g_ent, need_dh: bool,
                         need_dw: bool, need_db: bool, *, token_chunk=None, vocab_band=None):
    """dH, dW, db of ``sum_t g_logp[t] logp_t + g_ent[t] entropy_t`` (``g_ent`` None: no entropy
    term): the shared chunk loop with the transformed backward epilogue as its G producer. With
    entropy the per-token inputs travel as [N, 2] rows, (lse, mu) and (g_logp, g_ent). db is the
    column sum of the fp32 G of each (band, chunk), added in the loop's fixed order."""
    from .chunked_backward import fp16_scale
    from .head_constants import fp16_output_scale, transform_constants

    lib = _library_for(hidden.device)
    loop = _chunk_loop()
    entropy = g_ent is not None
    k = transform_constants(tf)
    flags = _tf_flags(k, bias is not None, entropy)
    bias32 = bias.float().contiguous() if bias is not None else None
    stats = torch.stack([lse.float(), mu.float()], 1) if entropy else lse.float().contiguous()
    grads = torch.stack([g_logp.float(), g_ent.float()], 1) if entropy else g_logp.float().contiguous()
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None
    if not (need_dh or need_dw or need_db):
        return None, None, db
    workspace = _Workspace(hidden.device)
    vocab = weight.shape[0]

    def produce_g(h_chunk, w_band, labels_chunk, lse_chunk, g_chunk, band_start: int, out) -> float:
        rows, cols = h_chunk.shape[0], w_band.shape[0]
        s = fp16_output_scale(k["dscale"], entropy, vocab) if out.dtype == torch.float16 else 1.0
        logits = out if out.dtype == torch.float32 else workspace.tile(rows, cols)
        # with db, G goes to the fp32 tile first (in place) so that its column sums are fp32
        target = logits if db is not None else out
        cols_of = (lambda t, i: t[:, i].contiguous()) if entropy else (lambda t, i: t.contiguous())
        lse_c, g_c = cols_of(lse_chunk, 0), cols_of(g_chunk, 0)
        mu_c = cols_of(lse_chunk, 1) if entropy else None
        ge_c = cols_of(g_chunk, 1) if entropy else None
        with _device_guard(out.device):
            logits_tile_fp32(h_chunk, w_band, logits)
            _check(lib, lib.altpo_backward_epilogue_tf(
                logits.data_ptr(), cols, target.data_ptr(), _DTYPE_CODES[target.dtype], cols, rows, cols,
                labels_chunk.to(torch.int32).contiguous().data_ptr(), int(band_start),
                _ptr(bias32[band_start:band_start + cols] if bias32 is not None else None),
                k["pre_scale"], k["post_scale"], flags, lse_c.data_ptr(), _ptr(mu_c),
                g_c.data_ptr(), _ptr(ge_c), k["dscale"] * s, _stream(out.device)))
            if db is not None:
                part = target.sum(0)
                db[band_start:band_start + cols] += part if s == 1.0 else part / s
                if target is not out:
                    out.copy_(target)
        return s

    dh, dw = loop(hidden, weight, labels, stats, grads, need_dh or not need_dw, need_dw,
                  produce_g=produce_g, token_chunk=token_chunk, vocab_band=vocab_band)
    if need_db and hidden.dtype == torch.float16:
        db /= fp16_scale(grads.abs().amax())  # the loop's fp16 scale on the upstream gradients
    return (dh if need_dh else None), dw, db


if __name__ == "__main__":
    print(library_status())
