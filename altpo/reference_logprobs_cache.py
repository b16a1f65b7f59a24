"""Reference log-probs, computed once and kept in a safetensors file instead of a second model.

AltPO's reference is the frozen starting model and its data never changes, so the reference
sequence log-probs of every forget answer and every alternate are fixed numbers: a few thousand
floats. They are computed once with the starting weights (packed, through ``linear_logprobs``),
stored with a key, and reused by every later run whose key matches. The key is a sha256 over the
model's weights (names, dtypes, shapes, bytes), every token and label of the scored sequences
(which covers data, tokenizer, chat template and ``--max-length``) and the compute dtype.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .train_step import sequence_logprobs

FORMAT = "altpo-reference-logprobs-v1"


@dataclass
class ReferenceLogprobs:
    """Reference sequence log-probs: ``forget`` [Q] per forget question, ``alternates`` [P] per pair."""

    forget: torch.Tensor
    alternates: torch.Tensor
    key: str
    path: Path | None = None
    reused: bool = False


def model_fingerprint(model) -> str:
    """sha256 of a model's weights: every state-dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())  # no extra copy
    return h.hexdigest()


def cache_key(model_hash: str, data_hash: str, dtype: torch.dtype) -> str:
    """The cache key: weights, scored tokens, and the dtype the log-probs were computed in."""
    return hashlib.sha256(f"{FORMAT}|{model_hash}|{data_hash}|{dtype}".encode()).hexdigest()


def load_reference_logprobs(path: str | Path, key: str) -> ReferenceLogprobs | None:
    """The cached log-probs at ``path`` if the file exists and holds ``key``; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                return None
            forget, alternates = f.get_tensor("forget"), f.get_tensor("alternates")
    except Exception:  # an unreadable or truncated file is a cache miss, not an error
        return None
    return ReferenceLogprobs(forget, alternates, key, path, reused=True)


def save_reference_logprobs(path: str | Path, ref: ReferenceLogprobs, extra: dict | None = None) -> None:
    """Write atomically (temporary file, then rename), so a crash never leaves half a cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"format": FORMAT, "key": ref.key, **{k: str(v) for k, v in (extra or {}).items()}}
    save_file({"forget": ref.forget.contiguous(), "alternates": ref.alternates.contiguous()},
              str(tmp), metadata=meta)
    os.replace(tmp, path)


def compute_reference_logprobs(model, data, key: str, *, tokens_per_microbatch: int,
                               loss_backend: str = "auto",
                               progress: Callable[[int], None] | None = None) -> ReferenceLogprobs:
    """Log-probs of every forget answer and alternate of ``data`` (an AltPOData) under ``model``."""
    was_training = model.training
    model.eval()
    try:
        seqs = [(s.input_ids, s.labels) for s in data.forget] + \
               [(s.input_ids, s.labels) for s in data.alternates]
        logps = sequence_logprobs(model, seqs, tokens_per_microbatch=tokens_per_microbatch,
                                  loss_backend=loss_backend, progress=progress)
    finally:
        model.train(was_training)
    q = len(data.forget)
    return ReferenceLogprobs(logps[:q].clone(), logps[q:].clone(), key)
