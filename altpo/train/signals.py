"""Stopping cleanly: SIGTERM and Ctrl-C finish the step, save a checkpoint and return; before the
first step (the reference log-probs) SIGTERM stops like Ctrl-C, with nothing half-written."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager


class _StopFlag:
    requested = False
    signal_name: str | None = None


@contextmanager
def stop_signals():
    """SIGTERM / SIGINT ask the loop to finish the step, save a checkpoint and return.

    A second Ctrl-C aborts at once. Only the main thread can install handlers; elsewhere the
    defaults stay.
    """
    flag = _StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        flag.signal_name = signal.Signals(signum).name
        print(f"\n{flag.signal_name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abort)", file=sys.stderr, flush=True)

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        previous.clear()
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class ReferenceInterrupted(KeyboardInterrupt):
    """SIGTERM before the first step: nothing to checkpoint; the run stops cleanly."""


@contextmanager
def sigterm_interrupts(where: str):
    """SIGTERM stops the computation like Ctrl-C (cleanups run, the lock is released) instead of
    killing the process mid-way; nothing is saved, as no step has run."""
    def handler(signum, frame):
        raise ReferenceInterrupted(f"{signal.Signals(signum).name} {where}; no step had run, so "
                                   "nothing was saved: run the same command again")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
