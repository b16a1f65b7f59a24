"""Compile report: every Triton kernel configuration compiled for sm_80 and sm_90 without a GPU.

For each configuration (kernel x dtype x gradient flags, with the tile shapes the launchers pick)
it prints registers per thread, spill bytes, shared memory per block, resident blocks per SM and
the tensor-core instructions used, and says whether the sm_90 matmul kernels use ``wgmma``
(Hopper's warpgroup MMA) rather than the older ``mma.sync``. The compiling and measuring is
``altpo_kernels.triton.aot_compile``; this wraps it as a benchmark (summary, JSON, exit status).

    python -m benchmarks.compile_report                 # sm_80 and sm_90
    python -m benchmarks.compile_report --quick --out c.json   # sm_90 only

Exit status 1 when a configuration spills registers or exceeds the shared-memory limit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import eprint, git_commit, write_json

MATMUL_KERNELS = ("forward", "backward")  # name fragments of the kernels that run tl.dot


def wgmma_summary(rows: list[dict]) -> dict:
    """Per sm_90 matmul configuration: does its PTX use wgmma."""
    out = {}
    for r in rows:
        if r["arch"] != "sm_90" or not any(k in r["kernel"] for k in MATMUL_KERNELS):
            continue
        if "lse_combine" in r["kernel"]:
            continue  # no matmul in it
        out[r["kernel"]] = "wgmma" in str(r.get("ptx_mma", ""))
    return out


def run(archs: tuple[str, ...]) -> dict:
    from altpo_kernels.triton import aot_compile

    started = time.perf_counter()
    rows = aot_compile.compile_report(archs)
    problems = aot_compile.problems(rows)
    import triton

    return {
        "benchmark": "compile_report",
        "meta": {"commit": git_commit(), "triton": triton.__version__, "archs": list(archs),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "rows": rows,
        "problems": problems,
        "sm90_wgmma": wgmma_summary(rows),
        "elapsed_s": time.perf_counter() - started,
    }


def summary(payload: dict) -> str:
    from altpo_kernels.triton.aot_compile import format_table

    lines = [f"Triton {payload['meta']['triton']} ahead-of-time compile, commit {payload['meta']['commit']}",
             format_table(payload["rows"])]
    wg = payload["sm90_wgmma"]
    if wg:
        using = [k for k, v in wg.items() if v]
        not_using = [k for k, v in wg.items() if not v]
        lines.append(f"sm_90 matmul configurations using wgmma: {len(using)} of {len(wg)}"
                     + (f"; without: {', '.join(not_using)}" if not_using else ""))
    lines += [f"PROBLEM: {p}" for p in payload["problems"]] or ["no spills, shared memory within limits"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="compile for sm_90 only (about half the time)")
    p.add_argument("--arch", nargs="+", choices=("sm_80", "sm_90"),
                   help="architectures (default: sm_80 and sm_90; sm_90 with --quick)")
    p.add_argument("--out", type=Path, help="write the report as JSON to this file")
    args = p.parse_args(argv)
    archs = tuple(args.arch or (("sm_90",) if args.quick else ("sm_80", "sm_90")))
    try:
        payload = run(archs)
    except ImportError as err:
        eprint(f"compile_report: the Triton backend is not importable ({err}); install triton")
        return 2
    if args.out:
        write_json(args.out, payload)
    print(summary(payload))
    return 1 if payload["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
