"""The chunked backward's workspace formula against the CPU memory probe.

One torch-backend backward per case in a fresh process, measured with the kernel benchmark's
peak-memory probe (resident-set high-water mark, glibc's mmap threshold pinned so freed tensors
leave the resident set). Peak minus the outputs is the workspace; it must stay within the formula
of ``chunked_backward.workspace_bytes`` (plus allocator slack) and be large enough that the probe
clearly saw it.
"""

import pytest

from benchmarks.kernels import workspace_probe

MiB = 2**20
# (N, H, V, chunk, band): three token chunks, several bands, none a multiple of the chunk sizes
SHAPE = (2500, 256, 20000)
CHUNK, BAND = 1000, 4096


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measured_workspace_within_formula(dtype):
    r = workspace_probe("torch", dtype, SHAPE, CHUNK, BAND)
    assert "error" not in r, r.get("error")
    measured = r["peak_bytes"] - r["output_bytes"]
    predicted = r["predicted_workspace_bytes"]
    print(f"\n{dtype}: peak {r['peak_bytes'] / MiB:.1f} MiB, outputs {r['output_bytes'] / MiB:.1f} MiB, "
          f"workspace measured {measured / MiB:.1f} MiB, formula {predicted / MiB:.1f} MiB")
    assert r["grad_abs_sum"] > 0
    assert measured <= predicted * 1.05 + 2 * MiB
    assert measured >= 0.5 * predicted
