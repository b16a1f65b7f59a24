"""benchmarks/cuda_vs_triton.py --quick runs the cuda backend from the host build of the library
and compares it with the float64 reference (the Triton side is left out here: under the
interpreter it takes a minute). Not timed: the check is that it ran and agreed."""

import json
import os
import subprocess
import sys

import csrc_build
from paths import REPO_ROOT


def test_quick_mode_runs_the_host_epilogues(tmp_path):
    out = tmp_path / "q.json"
    env = dict(os.environ, ALTPO_CSRC_HOST_LIB=str(csrc_build.host_library()))
    res = subprocess.run([sys.executable, "-m", "benchmarks.cuda_vs_triton", "--quick", "--backends", "cuda",
                          "--budget", "0.05", "--out", str(out)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert len(payload["cases"]) == 2
    for case in payload["cases"]:
        cuda = next(r for r in case["rows"] if r["backend"] == "cuda")
        assert cuda["forward_ms"] > 0
        check = case["checks"]["cuda_vs_reference"]
        assert check["ok"] and check["logp_max_abs"] < 1e-4
        if cuda["status"] == "ok":  # the backward runs once the shared chunk loop is installed
            assert check["dh_rel"] < 2e-2 and check["dw_rel"] < 2e-2
