"""The README's drop-in example runs as written."""

import subprocess
import sys

from helpers import REPO_ROOT

ROOT = REPO_ROOT


def test_drop_in_example_runs():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "drop_in_loss.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "loss" in res.stdout and "grad norm" in res.stdout


def test_replace_batch_nll_example_agrees_and_saves_memory():
    """The open-unlearning-style helper and its fused replacement give the same per-row NLL, and
    the fused one's peak memory (forward + backward, fresh processes) is a fraction of the other's."""
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "replace_batch_nll.py"), "--quick"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("peak memory growth"))
    ratio = float(line.split("ratio ")[1].split()[0])
    assert ratio < 0.5, line
