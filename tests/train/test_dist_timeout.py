"""A stalled data-parallel rank ends the run after --dist-timeout with a message naming it,
instead of the other ranks hanging for torch's default 30 minutes."""

from datetime import timedelta

import pytest

from altpo.errors import UserError
from altpo.train.config import TrainConfig
from helpers import REPO_ROOT, torchrun


def test_a_stalled_rank_is_named_after_the_timeout():
    proc = torchrun(str(REPO_ROOT / "tests" / "train" / "stall_worker.py"), "4", timeout=240, check=False)
    results = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("RESULT")}
    assert "0" in results, proc.stdout + proc.stderr[-3000:]
    message = results["0"]
    assert "rank 0 of 2: the step's statistics all-reduce did not complete within --dist-timeout 4 s" in message
    assert "4 s: rank 1 stalled or died" in message, message


def test_the_timeout_reaches_init_process_group(monkeypatch):
    import torch.distributed as tdist

    from altpo.train.distributed import Distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: seen.update(init=k["timeout"]))
    monkeypatch.setattr(tdist, "new_group", lambda **k: seen.update(monitor=k["timeout"]))
    Distributed.setup("cpu", timeout_s=42)
    assert seen == {"init": timedelta(seconds=42), "monitor": timedelta(seconds=42)}
    assert TrainConfig().dist_timeout == 600.0


def test_a_non_positive_timeout_is_refused():
    with pytest.raises(UserError, match="--dist-timeout must be positive"):
        TrainConfig(model="m", alternates="a", output="o", dist_timeout=0).validate()
