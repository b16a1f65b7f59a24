"""benchmarks/gpu_suite.sh fails when it should: no GPU (within seconds), a failing part, a bad
argument; and --budget drops the lowest-priority parts first, without counting them as failures.
Run on the CPU with --quick and --parts, so each case takes seconds to a minute."""

import os
import subprocess
import sys
import time

import pytest
import torch

from paths import REPO_ROOT

SUITE = str(REPO_ROOT / "benchmarks" / "gpu_suite.sh")


def _suite(args, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHON=sys.executable, **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.monotonic()
    res = subprocess.run(["bash", SUITE, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    return res, time.monotonic() - t0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_no_gpu_exits_nonzero_within_a_minute():
    res, seconds = _suite([])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no CUDA GPU" in res.stderr
    assert seconds < 60


def test_a_failing_part_fails_the_suite():
    res, _ = _suite(["--quick", "--parts", "gpu-tests"], {"PYTEST_ADDOPTS": "--no-such-option"})
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAILED: gpu-tests" in res.stderr


def test_budget_drops_lowest_priority_parts_first():
    """--quick limits: probe 60 s, determinism 120 s, kernels 400 s; with 200 s (25 s kept for the
    report) the first two fit in turn and kernels, the lowest priority, is dropped, not failed."""
    res, _ = _suite(["--quick", "--parts", "probe,determinism,kernels", "--budget", "200"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr
    assert "in order (--parts probe,determinism,kernels): probe determinism kernels" in err
    assert err.index("end probe: exit 0") < err.index("end determinism: exit 0") < err.index("drop kernels")
    assert "start kernels" not in err
    assert "all parts passed (dropped for the budget: kernels)" in err


def test_bad_arguments_exit_2():
    for args in (["--budget", "ten"], ["--no-such-flag"]):
        res, _ = _suite(args)
        assert res.returncode == 2 and "gpu_suite.sh:" in res.stderr, (args, res.stderr[-500:])
