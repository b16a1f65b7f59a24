"""One run per output folder: an exclusive lock held for the run's whole lifetime.

``OUTPUT/.altpo-train.lock`` is locked with ``flock`` (the kernel drops the lock when the process
ends, even by ``kill -9``, so a crash never leaves the folder locked) and holds the owner's pid and
host. A second run into the same folder stops at once with an error that names that pid. Under
torchrun only rank 0 takes the lock; the other ranks learn from it whether the run may go on.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

from altpo.errors import UserError

LOCK_NAME = ".altpo-train.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        text = []
    if not text:
        return "an unknown process"
    return f"pid {text[0]}" + (f" on host {text[1]}" if len(text) > 1 else "")


def acquire(out: Path, name: str = LOCK_NAME, what: str = "training run") -> int:
    """Lock ``out`` (created when missing); returns the open lock file's descriptor.

    ``name`` is the lock file (one per kind of writer: training runs, evals) and ``what`` names
    that writer in the message a second one gets."""
    import fcntl

    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is a file, not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"--output {out} is not writable ({err.strerror or err}); choose a folder "
                        "you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"--output {out} is in use by another {what} ({_holder(out / name)}); "
                        "wait for it to finish or stop it, or choose another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    probe = out / f".altpo-write-test-{os.getpid()}"
    try:  # the lock file may predate a chmod: check that new files can be made here
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        release(fd)
        raise UserError(f"--output {out} is not writable ({err.strerror or err}); choose a folder "
                        "you can write to") from None
    return fd


def training_holder(folder: Path) -> str | None:
    """Who holds the training lock of ``folder`` (e.g. "pid 12 on host h"), or None when no
    training run is running there. Creates nothing."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def release(fd: int) -> None:
    import fcntl

    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def output_lock(out: Path, dist):
    """Hold the lock on ``out`` (rank 0) while the block runs; every rank fails if rank 0 cannot."""
    fd, error = None, None
    created = not out.exists()
    before = set() if created or not out.is_dir() else {p.name for p in out.iterdir()}
    if dist.rank == 0:
        try:
            fd = acquire(out)
        except UserError as err:
            error = err
    if not dist.broadcast_flag(error is None):
        raise error or UserError(f"--output {out}: rank 0 could not lock the folder (see its message)")
    try:
        yield
    finally:
        if fd is not None:
            left = {p.name for p in out.iterdir()}
            if LOCK_NAME not in before and left == before | {LOCK_NAME}:
                (out / LOCK_NAME).unlink()  # a run that failed early leaves the folder as it was
                if created:
                    out.rmdir()
            release(fd)
