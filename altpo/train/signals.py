"""Stopping cleanly: SIGTERM and Ctrl-C finish the step, save a checkpoint and return."""

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
