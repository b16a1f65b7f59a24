"""Where an eval writes: one eval per output folder, files that are whole or absent, and a record of
what was evaluated.

- ``OUTPUT/.altpo-eval.lock`` is held (``flock``, released by the kernel however the process
  ends) from before the model loads until the files are written: a second eval into the same
  folder stops at once naming the holder. An eval never writes into, or evaluates, a folder that
  a training run holds.
- Each file is written under a unique temporary name (``.NAME.tmp-<random>-<pid>``), fsynced,
  renamed, and the folder fsynced: a kill or a power loss leaves the old file or the new one.
- ``EVAL_PROVENANCE.json``, written last, records the model (path and a fingerprint of its
  weights; for an eval during training also the run, epoch and step), the data and the sha256 of
  each split file read, the settings, the package versions, the command and the sha256 of both
  result files. ``altpo-fast eval`` and ``--eval-every-epoch`` write the same record. A ``TOFU_EVAL.json`` without a matching record is from an eval that did not finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

from altpo.errors import UserError

EVAL_NAME = "TOFU_EVAL.json"
SUMMARY_NAME = "TOFU_SUMMARY.json"
PROVENANCE_NAME = "EVAL_PROVENANCE.json"
EVAL_LOCK = ".altpo-eval.lock"
_RESULTS = (EVAL_NAME, SUMMARY_NAME, PROVENANCE_NAME)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name of its own; file and folder fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def provenance_problem(out: Path) -> str | None:
    """Why the results in ``out`` are not the whole output of one finished eval, or None."""
    try:
        record = json.loads((out / PROVENANCE_NAME).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no readable {PROVENANCE_NAME} (written last by a finished eval)"
    for name in (EVAL_NAME, SUMMARY_NAME):
        if files.get(name) != _sha256(out / name):
            return f"{name} is not the file {PROVENANCE_NAME} records"
    return None


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an ``--output`` that is a file, or that holds results, before anything loads."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is a file, not a folder; pass a folder")
    if (out / EVAL_NAME).exists() and not overwrite:
        problem = provenance_problem(out)
        if problem:
            raise UserError(f"{out / EVAL_NAME} is from an eval that did not finish or an older "
                            f"version ({problem}); pass --overwrite to replace it, or choose another "
                            "--output")
        raise UserError(f"{out / EVAL_NAME} already exists; pass --overwrite to replace it or choose "
                        "another --output")


def refuse_training_folders(**folders) -> None:
    """An eval neither reads a model nor writes results where a training run is running."""
    from altpo.train.output_lock import training_holder

    for flag, folder in folders.items():
        if not folder:
            continue
        path = Path(os.path.expanduser(str(folder)))
        holder = training_holder(path) if path.is_dir() else None
        if holder:
            raise UserError(f"--{flag.replace('_', '-')} {folder} is in use by a training run "
                            f"({holder}); its files change until it ends. Wait for it to finish, or "
                            "evaluate a finished model into another --output")


def lock_output(out: Path) -> int:
    """Take the eval lock on ``out`` and clear temporaries that killed evals left; returns the fd."""
    from altpo.train.output_lock import acquire

    fd = acquire(out, EVAL_LOCK, "eval")
    for p in out.glob(".TOFU_*.json.tmp-*"):  # ours alone may write them, and we hold the lock
        p.unlink(missing_ok=True)
    for p in out.glob(f".{PROVENANCE_NAME}.tmp-*"):
        p.unlink(missing_ok=True)
    return fd


def unlock_output(out: Path, fd: int, remove_folder: bool = False) -> None:
    """Release the eval lock. The lock file stays (unlinking it would let two processes lock two
    different files), except in a folder this eval created and left empty: then both go."""
    from altpo.train.output_lock import release

    if remove_folder and [p.name for p in out.iterdir()] == [EVAL_LOCK]:
        (out / EVAL_LOCK).unlink()
        out.rmdir()
    release(fd)


# What a reader needs to rerun or trust an eval: the releases that computed it.
PROVENANCE_PACKAGES = ("altpo-fast", "torch", "transformers", "tokenizers", "safetensors", "datasets",
                       "numpy", "triton")


def package_versions() -> dict:
    """The Python version and each of ``PROVENANCE_PACKAGES``' installed version (None: absent)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def split_fingerprints(data, names) -> dict:
    """Each TOFU split ``names`` the eval read: its file, size and sha256 for a local folder; the
    hub id and split name for hub data (``datasets`` records no content hash we can read back)."""
    from altpo.data.tofu import split_file
    from altpo.sources import local_path, looks_like_hub_id

    if data is None:
        return {}
    if looks_like_hub_id(str(data)):
        return {name: {"hub": str(data), "split": name} for name in names}
    folder = local_path(str(data))
    found = {}
    for name in names:
        path = split_file(folder, name)
        found[name] = ({"file": str(path.resolve()), "bytes": path.stat().st_size, "sha256": _sha256(path)}
                       if path is not None else {"file": None, "missing": True})
    return found


def _weights_fingerprint(model) -> str | None:
    """sha256 of the weights, or None for a model sharded over processes (its shards are not the
    whole model; the run's checkpoint at that step identifies it)."""
    from altpo.model.fingerprint import model_fingerprint

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor cannot have sharded it
        DTensor = ()
    if any(isinstance(t, DTensor) for t in model.state_dict().values()):
        return None
    return model_fingerprint(model)


def provenance(*, model_path, model, tokenizer_path, data, splits, settings: dict, command=None,
               training: dict | None = None) -> dict:
    """What an eval evaluated: the model's path and weights fingerprint, the tokenizer, the data
    and the sha256 of each split file read, the settings, the package versions and the command.

    ``training``: for an eval made during training (``--eval-every-epoch``), the run folder, the
    starting model, and the epoch and optimizer step of the evaluated weights.
    """
    from altpo import __version__
    from altpo.sources import local_path

    def where(source):
        if source is None:
            return None
        p = local_path(str(source))
        return str(p.resolve()) if p.exists() else str(source)

    record = {"model": where(model_path), "model_weights_sha256": _weights_fingerprint(model),
              "tokenizer": where(tokenizer_path), "data": where(data),
              "data_splits": split_fingerprints(data, splits),
              "settings": settings, "tool": f"altpo-fast {__version__}",
              "packages": package_versions(), "command": list(command or sys.argv)}
    if training is not None:
        record["training"] = training
    return record


def write_results(out: Path, logs_text: str, summary_text: str, record: dict | None) -> None:
    """The two result files, then the record naming their hashes (so a reader can tell a whole
    set from a mix of two evals or a killed one)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PROVENANCE_NAME).unlink(missing_ok=True)  # the old record no longer describes the files
    write_atomic(out / EVAL_NAME, logs_text)
    write_atomic(out / SUMMARY_NAME, summary_text)
    record = dict(record or {})
    record["files"] = {EVAL_NAME: _sha256(out / EVAL_NAME), SUMMARY_NAME: _sha256(out / SUMMARY_NAME)}
    write_atomic(out / PROVENANCE_NAME, json.dumps(record, indent=2))
