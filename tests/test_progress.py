"""Progress in a log: sparse plain lines with rate and ETA; third-party bars switched off and back."""

import io

from altpo.progress import LogProgress, progress_bar, third_party_bars
from altpo.train.report import _PlainSteps


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_log_progress_prints_at_most_one_line_per_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(total=800, desc="scoring", unit="batch", clock=clock, stream=out)
    for _ in range(799):   # 799 updates over 99.875 s: one line per 10 s, not one per update
        clock.t += 0.125
        bar.update(1)
    bar.set_postfix(loss="0.123")
    clock.t += 0.125
    bar.update(1)
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 9 <= len(lines) <= 11, lines
    assert lines[0].startswith("scoring: 80/800 batch (8.00 batch/s, about 1m30s left)")
    assert lines[-1] == "scoring: 800/800 batch in 1m40s (8.00 batch/s); loss 0.123"


def test_progress_bar_off_a_terminal_is_lines_and_off_when_disabled(capsys):
    items = list(range(7))
    assert list(progress_bar(items, desc="rows", enabled=False)) == items
    assert capsys.readouterr().err == ""
    assert list(progress_bar(items, desc="rows")) == items   # pytest's stderr is not a terminal
    err = capsys.readouterr().err
    assert err.startswith("rows: 7/7 it in ") and err.count("\n") == 1
    assert list(progress_bar([], desc="nothing")) == []
    assert capsys.readouterr().err == ""   # an empty stage prints nothing


def test_plain_steps_keep_first_and_last_and_thin_the_rest(capsys):
    clock = Clock()
    steps = _PlainSteps(total=50, initial=0, clock=clock)
    record = {"loss": 1.0, "forget_loss": 0.5, "retain_loss": 0.25, "tokens_per_s": 10.0,
              "memory_bytes": None}
    for _ in range(50):
        clock.t += 1.0
        steps.update(record)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 1/50: loss 1.0000")
    assert lines[-1].startswith("step 50/50: loss 1.0000")
    assert len(lines) == 2 + 4, lines   # steps 11, 21, 31, 41: one line per 10 s
    assert "steps/s, about" in lines[1]


def test_third_party_bars_off_then_restored():
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    with third_party_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
        assert are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    assert not are_progress_bars_disabled()
