"""Reference log-probs, computed once and kept in a safetensors file instead of a second model.

AltPO's reference is the frozen starting model and its data never changes, so the reference
sequence log-probs of every forget answer and every alternate are fixed numbers: a few thousand
floats. They are computed once with the starting weights (packed, through ``linear_logprobs``),
stored with a key, and reused by every later run whose key matches. The key is a sha256 over the
model's weights (names, dtypes, shapes, bytes), every token and label of the scored sequences
(which covers data, tokenizer, chat template and ``--max-length``) and the compute dtype.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from altpo_kernels import linear_logprobs

from altpo.errors import UserError
from altpo.train.checkpoint import fsync_path
from altpo.train.methods import needs_reference
from altpo.train.run_folder import REF_CACHE_NAME
from altpo.train.sequence_sums import sequence_sums
from altpo.train.signals import ReferenceInterrupted, sigterm_interrupts  # noqa: F401 (ReferenceInterrupted: public)
from altpo.train.step import last_hidden_states, output_weight, sequence_logprobs

if TYPE_CHECKING:
    from altpo.train.config import TrainConfig

FORMAT = "altpo-reference-logprobs-v1"


@dataclass
class ReferenceLogprobs:
    """Reference sequence log-probs: ``forget`` [Q] per forget question, ``alternates`` [P] per pair."""

    forget: torch.Tensor
    alternates: torch.Tensor
    key: str
    path: Path | None = None
    reused: bool = False


def cache_key(model_hash: str, data_hash: str, dtype: torch.dtype) -> str:
    """The cache key: weights, scored tokens, and the dtype the log-probs were computed in."""
    return hashlib.sha256(f"{FORMAT}|{model_hash}|{data_hash}|{dtype}".encode()).hexdigest()


def tensor_checksum(forget: torch.Tensor, alternates: torch.Tensor) -> str:
    """sha256 of both tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in (("forget", forget), ("alternates", alternates)):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_reference_logprobs(path: str | Path, key: str,
                            expected: tuple[int, int] | None = None) -> tuple[ReferenceLogprobs | None, str | None]:
    """``(log-probs, None)`` when the file at ``path`` holds ``key`` and passes its checks, else
    ``(None, why)``; ``why`` is None when there is no file. The checks: the stored checksum, one
    float log-prob per forget question and per pair (``expected``), and only finite values."""
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return None, "it is not a reference cache of this version"
            if meta.get("key") != key:
                return None, "it was made for another model, data, template or dtype"
            forget, alternates = f.get_tensor("forget"), f.get_tensor("alternates")
    except Exception as err:
        return None, f"it cannot be read ({type(err).__name__})"
    if meta.get("checksum") != tensor_checksum(forget, alternates):
        return None, ("its values do not match their checksum (the file was changed or damaged)"
                      if meta.get("checksum") else "it has no checksum (an older version)")
    for name, t, n in (("forget", forget, expected and expected[0]),
                       ("alternates", alternates, expected and expected[1])):
        if t.dim() != 1 or not t.is_floating_point() or (n is not None and t.shape[0] != n):
            return None, (f"its {name} tensor is {t.dtype} of shape {tuple(t.shape)}, the data needs "
                          f"{n} float log-probs")
        if not bool(torch.isfinite(t).all()):
            return None, f"its {name} log-probs hold NaN or infinite values"
    return ReferenceLogprobs(forget, alternates, key, path, reused=True), None


def load_reference_logprobs(path: str | Path, key: str,
                            expected: tuple[int, int] | None = None) -> ReferenceLogprobs | None:
    """The cached log-probs at ``path`` if the file holds ``key`` and passes its checks; else None."""
    return read_reference_logprobs(path, key, expected)[0]


def save_reference_logprobs(path: str | Path, ref: ReferenceLogprobs, extra: dict | None = None) -> None:
    """Write atomically and durably (temporary file, fsync, rename, fsync of the folder), so a
    crash or power loss never leaves half a cache; the metadata holds the tensors' checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"format": FORMAT, "key": ref.key, "checksum": tensor_checksum(ref.forget, ref.alternates),
            **{k: str(v) for k, v in (extra or {}).items()}}
    try:
        save_file({"forget": ref.forget.contiguous(), "alternates": ref.alternates.contiguous()},
                  str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any file the user makes (the writer uses 0600)
        fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)


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
                                  loss_backend=loss_backend, progress=progress,
                                  masked_key_id=getattr(data, "masked_key_id", None))
    finally:
        model.train(was_training)
    q = len(data.forget)
    return ReferenceLogprobs(logps[:q].clone(), logps[q:].clone(), key)


def cached_reference_logprobs(model, data, key, path: Path, budget, config, dist, say) -> ReferenceLogprobs:
    """The run's reference log-probs: reused from ``path`` when its key matches, else computed on
    rank 0 with the starting weights, saved, and read back by the other ranks."""
    ref, why = reusable_reference(path, key, data, dist, say)
    if ref is not None:
        return ref
    if dist.rank == 0:
        if why:
            say(f"reference log-probs: not reusing {path}: {why}; computing them again")
        n = len(data.forget) + len(data.alternates)
        bar = say.bar(n, "reference log-probs")
        with sigterm_interrupts("while the reference log-probs were computed"):
            ref = compute_reference_logprobs(model, data, key, tokens_per_microbatch=budget,
                                             loss_backend=config.loss_backend, progress=bar.update)
            bar.close()
            for name, t in (("forget answers", ref.forget), ("alternates", ref.alternates)):
                if not bool(torch.isfinite(t).all()):
                    raise UserError(f"the starting model's log-probs of {int((~torch.isfinite(t)).sum())} "
                                    f"{name} are NaN or infinite: --model {config.model} cannot serve "
                                    "as the reference (check its weights, or use --dtype fp32)")
            ref.path = path
            save_reference_logprobs(path, ref, {"model": config.model, "forget_split": config.forget_split,
                                                "alternates": config.alternates})
        say(f"reference log-probs: computed {n} sequences, cached in {path}")
    dist.barrier()
    if dist.rank != 0:
        ref = _read_on_this_rank(path, key, data, dist)
    return ref


def reusable_reference(path: Path, key: str, data, dist, say) -> tuple[ReferenceLogprobs | None, str | None]:
    """``(the cached log-probs, None)`` on every rank when the cache at ``path`` holds ``key`` and
    passes its checks, else ``(None, why rank 0 does not reuse it)``. Rank 0 decides for everyone:
    a rank that looked on its own could see the file rank 0 has just written and skip the barrier
    the others wait in."""
    expected = (len(data.forget), len(data.alternates))
    ref, why = read_reference_logprobs(path, key, expected) if dist.rank == 0 else (None, None)
    if not dist.broadcast_flag(ref is not None):
        return None, why
    ref = ref or _read_on_this_rank(path, key, data, dist)
    say(f"reference log-probs: reusing {path}")
    return ref, None


def _read_on_this_rank(path: Path, key: str, data, dist) -> ReferenceLogprobs:
    ref = load_reference_logprobs(path, key, (len(data.forget), len(data.alternates)))
    if ref is None:
        raise UserError(f"reference cache {path} is not readable from rank {dist.rank}; "
                        "all processes need the same filesystem")
    return ref


def resident_reference(ref_model, config: TrainConfig, budget: int):
    """A ``before_forward`` hook that scores each micro-batch's pairs with the resident reference."""
    @torch.no_grad()
    def fill(mb):
        if mb.num_pairs == 0:
            return mb
        hidden = last_hidden_states(ref_model, mb)
        token_logp = linear_logprobs(hidden, output_weight(ref_model), mb.labels,
                                     backend=config.loss_backend)
        per_seq = sequence_sums(token_logp, mb.seq_ids, len(mb.seq_lens))
        mb.ref_chosen_logps = per_seq[mb.chosen_seqs]
        mb.ref_forget_logps = per_seq[mb.forget_seqs]
        return mb

    return fill


# ------------------------------------------------------------------------------------------------
# the one place reference log-probs enter a run


@dataclass
class StepReference:
    """What every step needs of the reference, whatever the run: ``logprobs`` (the cached values,
    which the packing units carry into each micro-batch) or ``fill`` (a ``before_forward`` hook
    that scores each micro-batch with a resident copy of the starting model); neither for a
    method without a reference."""

    logprobs: ReferenceLogprobs | None = None
    fill: Callable | None = None

    @property
    def key(self) -> str | None:
        return self.logprobs.key if self.logprobs is not None else None

    @property
    def path(self) -> Path | None:
        return self.logprobs.path if self.logprobs is not None else None

    @property
    def reused(self) -> bool:
        return bool(self.logprobs is not None and self.logprobs.reused)


def step_reference(config: TrainConfig, scale, model, data, model_hash: str, dtype, budget: int,
                   out: Path, dist, say) -> StepReference:
    """The run's reference, with the starting weights (before any update or checkpoint load).

    ``--reference cached``: reused from the cache file when its key matches, else computed and
    cached; ``scale`` (:class:`~altpo.train.parallel.ScaleOut`) scores them, sharded under FSDP.
    Otherwise a frozen copy of the model scores every micro-batch as it goes."""
    if not needs_reference(config.method):
        return StepReference()
    if config.reference == "cached":
        path = Path(config.ref_cache).expanduser() if config.ref_cache else out / REF_CACHE_NAME
        key = cache_key(model_hash, data.reference_fingerprint(), dtype)
        return StepReference(logprobs=scale.reference_logprobs(model, data, key, path, budget,
                                                               config, dist, say))
    scale.check_resident_reference()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    return StepReference(fill=resident_reference(ref_model, config, budget))
