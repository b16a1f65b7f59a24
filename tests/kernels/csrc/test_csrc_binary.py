"""The CUDA library as compiled: SASS for sm_80 and sm_90, PTX for later GPUs, no spills.

Reads build/libaltpo_csrc.so (built by scripts/build_csrc.sh, or here when missing) with cuobjdump.
Needs nvcc; skipped, with that reason, where there is none.
"""

import re
import subprocess

import pytest

import csrc_build

# instantiations per arch: the plain epilogues per logits dtype (x out dtype), the head-transform
# ones (fp32 logits) per out dtype
KERNELS = {"forward_epilogue_kernel": 3, "backward_epilogue_kernel": 9,
           "forward_epilogue_tf_kernel": 1, "backward_epilogue_tf_kernel": 3}


@pytest.fixture(scope="module")
def binary():
    path = csrc_build.cuda_library()
    tool = csrc_build.cuobjdump()
    if tool is None:
        pytest.fail("nvcc is present but no cuobjdump was found (PATH, next to nvcc, triton wheel)")
    return path, tool


def _dump(binary, flag):
    path, tool = binary
    return subprocess.run([tool, flag, str(path)], capture_output=True, text=True, check=True).stdout


def test_sass_for_sm80_and_sm90_and_ptx_for_later_gpus(binary):
    elves = re.findall(r"\.(sm_\d+)\.cubin", _dump(binary, "--list-elf"))
    ptx = re.findall(r"\.(sm_\d+)\.ptx", _dump(binary, "--list-ptx"))
    assert sorted(elves) == ["sm_80", "sm_90"]
    assert ptx == ["sm_90"]


def resource_usage(binary):
    """{(arch, demangled kernel): {REG, STACK, LOCAL, SHARED}} from cuobjdump --dump-resource-usage."""
    rows, arch, name = {}, None, None
    for line in _dump(binary, "--dump-resource-usage").splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            rows[(arch, name)] = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
            name = None
    return rows


def test_every_kernel_is_present_and_nothing_spills(binary):
    rows = resource_usage(binary)
    for arch in ("sm_80", "sm_90"):
        for kernel, count in KERNELS.items():
            found = [k for (a, k) in rows if a == arch and kernel in k]
            assert len(found) == count, (arch, kernel, found)
    for (arch, kernel), usage in rows.items():
        # Spills and stack frames both live in local memory; registers stay far below 255.
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (arch, kernel, usage)
        assert usage["REG"] <= 64, (arch, kernel, usage)


def test_no_atomic_instructions(binary):
    """Deterministic by construction, as the Triton kernels: no ATOM/RED in any epilogue's SASS
    (the transformed forward merges its (max, sum, entropy) state by warp shuffles in fixed order)."""
    from altpo_kernels.triton import sass_check

    sass = _dump(binary, "-sass")
    assert "HGMMA" not in sass and sass.count("Function :") >= 2 * sum(KERNELS.values())
    assert sass_check.atomic_instructions(sass) == []
