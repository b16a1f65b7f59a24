"""The README's drop-in example runs as written."""

import subprocess
import sys

from paths import REPO_ROOT

ROOT = REPO_ROOT


def test_drop_in_example_runs():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "drop_in_loss.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "loss" in res.stdout and "grad norm" in res.stdout
