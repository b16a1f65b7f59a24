"""examples/trl_dpo.py runs, and the drop-in trains like stock TRL in less memory."""

import re
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

pytest.importorskip("trl", reason="the example needs the trl extra")  # in the test extra


def test_trl_dpo_example_matches_stock_trl_in_less_memory(tmp_path):
    res = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "trl_dpo.py"), "--quick",
                          "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {}
    for line in res.stdout.splitlines():
        m = re.match(r"(stock TRL|altpo_kernels\.trl)\s+([-\d., ]+?)\s+([\d.]+)s\s+(\d+) MiB", line)
        if m:
            rows[m.group(1)] = ([float(x) for x in m.group(2).split(",")], int(m.group(4)))
    assert set(rows) == {"stock TRL", "altpo_kernels.trl"}, res.stdout[-2000:]
    (stock_losses, stock_peak), (our_losses, our_peak) = rows["stock TRL"], rows["altpo_kernels.trl"]
    assert len(our_losses) == len(stock_losses) == 2
    assert our_losses == pytest.approx(stock_losses, rel=1e-4)
    diff = float(re.search(r"largest weight difference after 2 steps: (\S+)", res.stdout).group(1))
    assert diff <= 1e-4
    assert our_peak < stock_peak
