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
        assert cuda["status"] == "ok", cuda["status"]
        assert check["ok"] and check["logp_max_abs"] < 1e-4
        assert check["dh_rel"] < 2e-2 and check["dw_rel"] < 2e-2


def test_quick_mode_fails_when_a_backend_fails(tmp_path):
    """A backend that cannot run (here: the library path points at nothing) is a failure, not a
    row with a status to overlook: exit 1, naming the backend."""
    env = dict(os.environ, ALTPO_CSRC_HOST_LIB=str(tmp_path / "missing.so"),
               ALTPO_CSRC_LIB=str(tmp_path / "missing.so"))
    res = subprocess.run([sys.executable, "-m", "benchmarks.cuda_vs_triton", "--quick", "--backends", "cuda",
                          "--budget", "0.05"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "backend failed" in res.stderr and "cuda" in res.stderr
