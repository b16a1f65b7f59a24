"""Progress that reads well in both places: a tqdm bar on a terminal, sparse plain lines in a log.

When stderr is not a terminal (a log file, a pipe, CI), a bar's carriage-return redraws would
pile up as thousands of lines; there a stage prints one line when it ends (count, time, rate), and
while it runs at most one line every ``LOG_INTERVAL_S`` seconds with the count, the rate and the
time left. ``third_party_bars(False)`` silences transformers', datasets' and huggingface_hub's
own bars for a block.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

LOG_INTERVAL_S = 10.0


def interactive() -> bool:
    """Whether stderr is a terminal (bars) rather than a file or a pipe (plain lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LogProgress:
    """tqdm's small interface (update, set_postfix, set_postfix_str, close, iteration), as lines."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0,
                 interval_s=LOG_INTERVAL_S, clock=time.monotonic, stream=None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.n, self.start_n, self.interval_s, self.clock = initial, initial, interval_s, clock
        self.stream = stream
        self.postfix = ""
        self.started = self.last = clock()
        self.closed = False

    def _write(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def _counts(self) -> str:
        return f"{self.n}/{self.total}" if self.total else f"{self.n}"

    def _rate(self, elapsed: float) -> float:
        return (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0

    def update(self, n=1):
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval_s and not (self.total and self.n >= self.total):
            self.last = now
            elapsed = now - self.started
            rate = self._rate(elapsed)
            eta = (f", about {_duration((self.total - self.n) / rate)} left"
                   if self.total and rate > 0 else "")
            self._write(f"{self.desc}: {self._counts()} {self.unit} ({rate:.2f} {self.unit}/s{eta})"
                        f"{self.postfix}")

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ("; " + ", ".join(f"{k} {v}" for k, v in items.items())) if items else ""

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = f"; {s}" if s else ""

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.n == self.start_n and not self.total:
            return  # an empty stage: nothing to report
        elapsed = self.clock() - self.started
        self._write(f"{self.desc}: {self._counts()} {self.unit} in {_duration(elapsed)} "
                    f"({self._rate(elapsed):.2f} {self.unit}/s){self.postfix}")

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off:
    """A disabled bar: accepts every call, prints nothing."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def progress_bar(iterable=None, *, total=None, desc="", unit="it", enabled=True, leave=False,
                 initial=0):
    """A tqdm bar on a terminal, :class:`LogProgress` lines elsewhere, nothing when not enabled."""
    if not enabled:
        return _Off(iterable)
    if not interactive():
        return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial,
                dynamic_ncols=True)


@contextmanager
def third_party_bars(enabled: bool):
    """transformers', datasets' and huggingface_hub's progress bars on (as they were) or off."""
    restore = []
    if not enabled:
        try:
            from transformers.utils import logging as hf_logging
            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                restore.append(hf_logging.enable_progress_bar)
        except ImportError:
            pass
        try:
            import datasets
            if datasets.is_progress_bar_enabled():
                datasets.disable_progress_bars()
                restore.append(datasets.enable_progress_bars)
        except (ImportError, AttributeError):
            pass
        try:
            from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                               enable_progress_bars)
            if not are_progress_bars_disabled():
                disable_progress_bars()
                restore.append(enable_progress_bars)
        except ImportError:
            pass
    try:
        yield
    finally:
        for undo in restore:
            undo()
