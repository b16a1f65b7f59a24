"""Packed (variable-length) attention for the stock transformers Llama model.

A packed micro-batch is one row of concatenated sequences whose position ids restart at 0 for
each sequence. Attention must be block-diagonal causal: a token sees the earlier tokens of its own
sequence only. This module registers such an attention function with transformers'
``AttentionInterface`` and switches a model to it::

    backend = enable_packed_attention(model, backend="auto")
    kw = packed_attention_kwargs(seq_lens, device)
    out = model.model(input_ids=ids[None], position_ids=packed_position_ids(seq_lens, device)[None], **kw)

Backends (one function, chosen by ``backend``):

``flash``
    ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16), when ``flash_attn`` is installed.
``torch-varlen``
    ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16), when this torch has it.
``sdpa``
    ``scaled_dot_product_attention`` run once per sequence segment with ``is_causal=True``
    (any device, any dtype). Why per segment rather than one SDPA call with a [T, T]
    block-diagonal mask: the segment loop costs ``sum(L_i^2)`` work and ``max(L_i)^2`` scratch
    instead of ``T^2`` for both, it never builds a mask, and it reaches the fused causal kernels
    that an explicit mask rules out. For TOFU rows (sequences of ~100-300 tokens packed to 4k-8k
    tokens) that is 15-50x less attention work. The price is one kernel call per sequence per
    layer, negligible on CPU and acceptable as a CUDA fallback.

None of the paths builds a per-head [T, T] mask. On the varlen paths, fp32 queries (which the
CUDA flash kernels do not accept) fall back to the segment SDPA path with a warning; under
``torch.autocast`` the queries are already bf16/fp16.

Calls without packing keyword arguments keep working after ``enable_packed_attention``: a padded
batch with a 2-D ``attention_mask`` is handled by transformers' own SDPA mask and attention, a
single-row call with restarting ``position_ids`` but no ``cu_seq_lens_*`` derives the segments from
the position ids (one host sync per layer: pass ``packed_attention_kwargs`` to avoid it).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "torch-varlen", "sdpa")

# Names under which the attention functions are registered in transformers' interfaces.
_IMPL_NAMES = {
    "flash": "altpo_packed_flash",
    "torch-varlen": "altpo_packed_torch_varlen",
    "sdpa": "altpo_packed_sdpa",
}



def _sdpa_has_gqa() -> bool:
    # SDPA is a builtin without an inspectable signature; enable_gqa arrived in torch 2.5
    try:
        F.scaled_dot_product_attention(*(torch.zeros(1, h, 1, 1) for h in (2, 1, 1)), enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


_SDPA_HAS_GQA = _sdpa_has_gqa()


# ----------------------------------------------------------------------------------------------
# availability


def _flash_attn_varlen():
    """flash_attn's varlen function, or None when flash_attn is not installed or does not load."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # a flash_attn wheel built for another torch/CUDA fails at import time
        return None
    return flash_attn_varlen_func


def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn, or None on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def available_backends(device: torch.device | str) -> list[str]:
    """The packed-attention backends usable on ``device``, in the order ``auto`` prefers them."""
    device = torch.device(device)
    found = []
    if device.type == "cuda" and torch.cuda.is_available():
        if _flash_attn_varlen() is not None:
            found.append("flash")
        if _torch_varlen() is not None:
            found.append("torch-varlen")
    found.append("sdpa")
    return found


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# keyword arguments for one packed row


def _check_seq_lens(seq_lens) -> tuple[int, ...]:
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.dim() != 1:
            raise ValueError(f"seq_lens must be 1-D, got shape {tuple(seq_lens.shape)}")
        seq_lens = seq_lens.tolist()
    lens = tuple(int(n) for n in seq_lens)
    if not lens:
        raise ValueError("seq_lens is empty: a packed row needs at least one sequence")
    if any(n <= 0 for n in lens) or any(int(n) != n for n in seq_lens):
        raise ValueError(f"seq_lens must be positive integers, got {list(seq_lens)[:20]}")
    return lens


def packed_position_ids(seq_lens: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Position ids of one packed row: ``0..L_i-1`` for each sequence, concatenated ([T] long)."""
    lens = _check_seq_lens(seq_lens)
    return torch.cat([torch.arange(n, dtype=torch.long) for n in lens]).to(device)


def packed_attention_kwargs(seq_lens: Sequence[int], device: torch.device | str) -> dict:
    """Keyword arguments for ``model.model(input_ids=ids[None], position_ids=pos[None], **kw)``.

    ``seq_lens`` are the lengths of the sequences concatenated in the row, in order. Computed once
    per micro-batch and reused by every layer:

    - ``cu_seq_lens_q`` / ``cu_seq_lens_k``: int32 [N+1] cumulative offsets on ``device`` (the
      names transformers forwards to attention functions; the varlen kernels read them).
    - ``max_length_q`` / ``max_length_k``: the longest sequence, as a Python int (no device sync).
    - ``packed_seq_lens``: the lengths as a tuple of Python ints (the segment SDPA path slices
      with them, again without a device sync).
    - ``use_cache=False``: a key/value cache is useless in training and, in stock transformers,
      also disables its own packed-sequence detection.

    Add ``packed_key_mask`` ([T] bool, False = a key no query may attend to; see
    :func:`altpo.data.packing.with_key_mask`) to hide single tokens inside their sequences; only
    the ``sdpa`` backend honours it, the others refuse it.
    """
    lens = _check_seq_lens(seq_lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    cu = cu.to(device)
    longest = max(lens)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "packed_seq_lens": lens,
        "use_cache": False,
    }


# ----------------------------------------------------------------------------------------------
# the attention computations; query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1 (Llama's grouping)
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _sdpa_grouped_kv(query, key, value):
    """Keys/values and SDPA kwargs for grouped-query attention, on any torch version."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep == 1:
        return key, value, {}
    if _SDPA_HAS_GQA:
        return key, value, {"enable_gqa": True}
    return _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), {}


def _segment_sdpa(query, key, value, seq_lens, scaling, dropout, key_mask=None):
    key, value, extra = _sdpa_grouped_kv(query, key, value)
    outs = []
    start = 0
    for n in seq_lens:
        stop = start + n
        q, k, v = query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]
        if key_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, **extra
            )
        else:
            out = _masked_keys_sdpa(q, k, v, key_mask[start:stop], scaling, dropout, extra)
        outs.append(out)
        start = stop
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous()


def _masked_keys_sdpa(q, k, v, visible, scaling, dropout, extra):
    """Causal SDPA over one segment whose keys at ``visible == False`` are hidden from every query.

    A query that sees no key at all (the segment starts with hidden tokens) gets a zero output,
    whatever the SDPA kernel would make of an all-masked row (NaN on some torch versions)."""
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
    allowed = causal & visible.to(device=q.device, dtype=torch.bool)[None, :]
    seen = allowed.any(dim=1)
    # an all-masked row is given its own key so the softmax stays finite; its output is zeroed
    allowed = allowed | (~seen)[:, None] & torch.eye(n, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                         scale=scaling, **extra)
    return out * seen.to(out.dtype)[:, None]


def _flash_varlen(query, key, value, cu, max_len, scaling, dropout):
    fn = _flash_attn_varlen()
    # flash_attn takes [T, H, D] and handles grouped kv heads itself
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = fn(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.unsqueeze(0)


@functools.lru_cache(maxsize=None)
def _torch_varlen_params() -> frozenset:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _torch_varlen_call(query, key, value, cu, max_len, scaling, dropout):
    if dropout:
        raise ValueError("torch-varlen attention has no dropout; use backend 'flash' or 'sdpa'")
    fn = _torch_varlen()
    params = _torch_varlen_params()
    n_rep = query.shape[1] // key.shape[1]
    extra = {}
    # The varlen signature changed between torch releases: older ones take is_causal and no
    # scale / GQA, newer ones express causality as window_size=(-1, 0).
    if "window_size" in params:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if "scale" in params:
        extra["scale"] = scaling
    elif abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(
            f"this torch's varlen_attn has no scale argument and the model scales by {scaling}; "
            "use backend 'flash' or 'sdpa'"
        )
    if n_rep > 1:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = fn(q, k, v, cu, cu, max_len, max_len, **extra)
    return out.unsqueeze(0)


def _segments_from_positions(position_ids: torch.Tensor, total: int) -> tuple[int, ...]:
    # a new sequence starts wherever the position does not continue the previous one
    pos = position_ids.reshape(-1)[-total:]
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 1) != 1).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [total]
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


_warned_fp32 = set()


def _packed_attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    _backend: str,
    **kwargs,
):
    """The function registered with transformers; returns ``(attn_output [B, T, Hq, D], None)``."""
    batch, _, total, head_dim = query.shape
    if scaling is None:
        scaling = head_dim**-0.5
    cu = kwargs.get("cu_seq_lens_q")
    seq_lens = kwargs.get("packed_seq_lens")
    key_mask = kwargs.get("packed_key_mask")

    if cu is None and seq_lens is None:
        if attention_mask is not None:
            # padded batch: transformers built the 4-D mask, let its SDPA attention apply it
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling
            )
        position_ids = kwargs.get("position_ids")
        if batch == 1 and position_ids is not None and position_ids.numel() >= total:
            seq_lens = _segments_from_positions(position_ids, total)
        else:
            seq_lens = None

    if batch != 1 and (cu is not None or seq_lens is not None):
        raise ValueError(
            f"packed attention expects one packed row (batch 1), got batch {batch}; "
            "concatenate the sequences into one row"
        )

    if seq_lens is None and cu is None:
        # ordinary causal rows (one sequence each, no padding)
        return _segment_sdpa_rows(query, key, value, scaling, dropout), None

    if seq_lens is None:
        seq_lens = tuple(torch.diff(cu.to(torch.int64)).tolist())
    if sum(seq_lens) != total:
        raise ValueError(
            f"packed sequence lengths sum to {sum(seq_lens)} but the row has {total} tokens; "
            "pass packed_attention_kwargs() of the same seq_lens used to build the row"
        )

    backend = _backend
    if key_mask is not None:
        if key_mask.shape != (total,):
            raise ValueError(f"packed_key_mask must be [{total}] (one flag per token of the row), "
                             f"got shape {tuple(key_mask.shape)}")
        if backend != "sdpa":
            raise ValueError(f"attention backend {backend!r} cannot hide single keys (packed_key_mask); "
                             "use backend 'sdpa'")
    if backend != "sdpa" and (query.dtype not in (torch.float16, torch.bfloat16) or query.device.type != "cuda"):
        if (backend, query.dtype) not in _warned_fp32:
            _warned_fp32.add((backend, query.dtype))
            warnings.warn(
                f"packed attention backend {backend!r} needs fp16/bf16 CUDA tensors, got "
                f"{query.dtype} on {query.device.type}; using the segment SDPA path",
                stacklevel=2,
            )
        backend = "sdpa"

    if backend == "sdpa":
        return _segment_sdpa(query, key, value, seq_lens, scaling, dropout, key_mask), None
    if cu is None:
        cu = packed_attention_kwargs(seq_lens, query.device)["cu_seq_lens_q"]
    cu = cu.to(device=query.device, dtype=torch.int32)
    max_len = kwargs.get("max_length_q") or max(seq_lens)
    if backend == "flash":
        return _flash_varlen(query, key, value, cu, max_len, scaling, dropout), None
    return _torch_varlen_call(query, key, value, cu, max_len, scaling, dropout), None


def _segment_sdpa_rows(query, key, value, scaling, dropout):
    key, value, extra = _sdpa_grouped_kv(query, key, value)
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=query.shape[2] > 1, scale=scaling, **extra
    )
    return out.transpose(1, 2).contiguous()


def _packed_mask(*args, attention_mask=None, **kwargs):
    """Mask builder registered beside the attention function.

    Without a padding mask, none is built (the packed path needs only the segment lengths);
    with one, transformers' SDPA mask is built as usual so padded batches still work.
    """
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# registration


def _register() -> None:
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers before 4.53
        AttentionMaskInterface = None
    for backend, name in _IMPL_NAMES.items():
        AttentionInterface.register(name, functools.partial(_packed_attention_forward, _backend=backend))
        if AttentionMaskInterface is not None:
            AttentionMaskInterface.register(name, _packed_mask)


def enable_packed_attention(model, backend: str = "auto") -> str:
    """Switch a transformers model to block-diagonal packed attention; return the backend used.

    ``backend``: ``"auto"`` (the first of flash, torch-varlen, sdpa available for the device the
    model's parameters are on), ``"flash"``, ``"torch-varlen"`` or ``"sdpa"``. Call it after the
    model is on its device. Raises ``ValueError`` when an explicitly named backend is unavailable.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    device = _model_device(model)
    usable = available_backends(device)
    if backend == "auto":
        backend = usable[0]
    elif backend not in usable:
        if device.type != "cuda":
            why = f"it needs a CUDA device and the model is on {device}"
        elif backend == "flash":
            why = "flash_attn is not installed (pip install flash-attn) or does not load"
        else:
            why = f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
        raise ValueError(f"attention backend {backend!r} is unavailable: {why}; use 'auto' or 'sdpa'")

    _register()
    name = _IMPL_NAMES[backend]
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    if getattr(model.config, "_attn_implementation", None) != name:
        # transformers without a working setter: the config attribute is what the layers read
        model.config._attn_implementation = name
    return backend
