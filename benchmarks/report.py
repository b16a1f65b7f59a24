"""Combine one GPU-suite run into ``results/<date>-<card>.json``, a Markdown summary and a PNG plot.

    python -m benchmarks.report --kernels k.json --step s.json --compile c.json \\
        --pytest-junit gpu-tests.xml --out-dir benchmarks/results
    python -m benchmarks.report --from benchmarks/results/2026-11-25-h100.json --update-readme

Every input is optional (a part that timed out or failed is reported as missing). The second
form regenerates the Markdown and PNG from a committed result and writes its summary into
benchmarks/README.md between the ``results:start`` / ``results:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.report --help")

from benchmarks.common import fmt, write_json

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(path: Path | None):
    if path is None or not Path(path).exists():
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a part killed while writing leaves no usable file


def pytest_summary(junit: Path | None) -> dict | None:
    """Counts and failing test names from a pytest ``--junitxml`` file."""
    if junit is None or not Path(junit).exists():
        return None
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError:
        return {"error": "unreadable junit file (pytest killed?)"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    total["failing"] = failing[:50]
    return total


def combine(args) -> dict:
    kernels, step = _load(args.kernels), _load(args.step)
    meta = (kernels or step or {}).get("meta", {})
    parts = []
    if args.parts and Path(args.parts).exists():
        for line in Path(args.parts).read_text().splitlines():
            bits = line.split()
            if len(bits) == 3:
                parts.append({"part": bits[0], "exit_status": int(bits[1]), "seconds": int(bits[2])})
    return {
        "suite": "altpo-fast GPU suite",
        "date": meta.get("date"), "commit": meta.get("commit"), "card": meta.get("card"),
        "card_slug": meta.get("card_slug"), "quick": bool((kernels or step or {}).get("quick")),
        "parts": parts,
        "gpu_tests": pytest_summary(args.pytest_junit),
        "kernels": kernels, "step": step, "compile_report": _load(args.compile),
        "packed_vs_padded": _load(args.packed),
    }


# ----------------------------------------------------------------------------------------------
# Markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _step_status(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"][:80]
    if r.get("fallback_errors"):
        return (f"ok after fallback to attention {r.get('attention')}, loss {r.get('loss_backend')} "
                f"(first error: {r['fallback_errors'][0][:120]})")
    return "ok"


def markdown(res: dict) -> str:
    lines = [f"### {res.get('card') or 'unknown card'}, commit {res.get('commit')}, {res.get('date')}", ""]
    if res.get("quick"):
        lines += ["**CPU `--quick` run: tiny shapes and model, for checking the tools; not a "
                  "performance result.**", ""]
    if res.get("parts"):
        lines.append("Suite parts: " + ", ".join(
            f"{p['part']} {'ok' if p['exit_status'] == 0 else 'exit ' + str(p['exit_status'])} "
            f"({p['seconds']} s)" for p in res["parts"]))
        lines.append("")
    t = res.get("gpu_tests")
    if t:
        if "error" in t:
            lines += [f"Kernel tests: {t['error']}", ""]
        else:
            lines.append(f"Kernel tests (pytest): {t['passed']} passed, {t['failures'] + t['errors']} "
                         f"failed, {t['skipped']} skipped in {t['seconds']} s")
            lines += [f"- FAILED {name}" for name in t["failing"]]
            lines.append("")

    step = res.get("step")
    if step:
        w = step["workload"]
        lines += [f"**AltPO step** ({step['dtype']}, {w['forget_rows']} forget + {w['retain_rows']} "
                  f"retain rows, {w['workload_tokens']} workload tokens; measured {step['matmul']['dtype']} "
                  f"matmul {step['matmul']['tflops']:.4g} TFLOP/s)", ""]
        rows = []
        for r in step["rows"]:
            ref = (r.get("reference_pass") or {}).get("seed_run_s")
            run_s = r.get("seed_run_estimate_s")
            rows.append([r["variant"], fmt(r.get("step_s"), ".3g"), fmt(r.get("tokens_per_s"), ".4g"),
                         fmt(r.get("mfu"), ".3f"), fmt(r.get("peak_gib"), ".3g"), fmt(ref, ".3g"),
                         fmt(None if run_s is None else run_s / 60, ".3g"),
                         _step_status(r)])
        lines += _table(["variant", "step s", "tokens/s", "MFU", "peak GiB", "reference pass s",
                         "seed run min", "status"], rows)
        lines.append("")
        for r in step.get("ratios", []):
            mem = r["peak_memory_vs_altpo_fast"]
            lines.append(f"- {r['baseline']}: {r['step_time_vs_altpo_fast']:.2f}x the step time, "
                         f"{'-' if mem is None else f'{mem:.2f}x'} the peak memory, "
                         f"{r['seed_run_vs_altpo_fast']:.2f}x the seed-run time of altpo-fast")
        lines.append("")

    k = res.get("kernels")
    if k:
        lines += [f"**Kernels** ({k['flop_convention']}; measured {k['matmul']['dtype']} matmul "
                  f"{k['matmul']['tflops']:.4g} TFLOP/s)", ""]
        ratio = {(r["op"], r["n"], r["pass"], r["variant"]): r for r in k.get("ratios", [])}
        by = {}
        for r in k["results"]:
            by.setdefault((r["op"], r["n"], r["variant"]), {})[r["pass"]] = r
        rows = []
        for (op, n, variant), passes in by.items():
            full = passes.get("full", {})
            if full.get("status") != "ok":
                rows.append([op, str(n), variant] + ["-"] * 8 + [str(full.get("status", "-"))[:60]])
                continue
            rr = ratio.get((op, n, "full", variant), {})
            errs = [full.get(e) for e in ("err_value", "err_dh", "err_dw") if full.get(e) is not None]
            rows.append([op, str(n), variant,
                         fmt(passes.get("forward", {}).get("median_ms"), ".3g"),
                         fmt(passes.get("backward", {}).get("median_ms"), ".3g"),
                         fmt(full.get("median_ms"), ".3g"), fmt(full.get("tflops"), ".3g"),
                         fmt(full.get("fraction_of_matmul"), ".2f"), fmt(full.get("peak_mib"), ".4g"),
                         fmt(rr.get("speedup_vs_materialised"), ".2f"),
                         fmt(max(errs) if errs else None, ".1e"),
                         "ok" if str(full.get("check", "ok")).startswith(("ok", "skipped")) else full["check"][:60]])
        lines += _table(["op", "N", "variant", "fwd ms", "bwd ms", "full ms", "full TFLOP/s",
                         "of matmul", "full peak MiB", "speed-up vs materialised", "max err",
                         "status"], rows)
        lines.append("")
        if k.get("absent"):
            lines.append("Absent: " + "; ".join(f"{a} ({why})" for a, why in k["absent"].items()))
            lines.append("")
        mr = k.get("memory_ratio")
        if mr and "ratio" in mr:
            lines.append(f"Torch-backend memory ratio (CPU, N,H,V={tuple(mr['shape'])}, forward+backward): "
                         f"{mr['altpo_torch_mib']:.0f} MiB / {mr['materialised_mib']:.0f} MiB = {mr['ratio']:.3f}")
            lines.append("")

    pv = res.get("packed_vs_padded")
    if pv and pv.get("rows"):
        lines += [f"**Packed vs padded micro-batches** ({pv.get('model')}, packed attention "
                  f"{pv.get('attention_backend')})", ""]
        rows = [[str(r.get("workload")), str(r.get("mode")), fmt(r.get("tokens"), "d"),
                 fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("peak_mib"), ".4g"),
                 fmt(r.get("speedup_vs_padded"), ".2f"), fmt(r.get("memory_vs_padded"), ".2f"),
                 fmt(r.get("planned_mib"), ".4g"), fmt(r.get("max_memory_allocated_mib"), ".4g"),
                 str(r.get("error", "ok"))] for r in pv["rows"]]
        lines += _table(["workload", "mode", "tokens", "tokens/s", "peak MiB", "speed-up", "memory x",
                         "planned MiB", "measured MiB", "status"], rows)
        lines.append("")

    c = res.get("compile_report")
    if c:
        wg = c.get("sm90_wgmma", {})
        lines.append(f"**Compile report** (Triton {c['meta']['triton']}, {', '.join(c['meta']['archs'])}): "
                     f"{len(c['rows'])} configurations, sm_90 matmul kernels using wgmma: "
                     f"{sum(wg.values())} of {len(wg)}; "
                     + ("no spills, shared memory within limits" if not c["problems"] else
                        "problems: " + "; ".join(c["problems"])))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# plot


def plot(res: dict, path: Path) -> bool:
    """Kernel full-pass time vs N per variant (one panel per op) and the step comparison."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k, step = res.get("kernels"), res.get("step")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, op in zip(axes[:2], ("linear_logprobs", "altpo_loss")):
        series = {}
        for r in (k or {}).get("results", []):
            if r["op"] == op and r["pass"] == "full" and r["status"] == "ok":
                series.setdefault(r["variant"], []).append((r["n"], r["median_ms"]))
        for variant, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("forward + backward, ms")
        shapes = sorted({(r["h"], r["v"]) for r in (k or {}).get("results", []) if r["op"] == op})
        ax.set_title(f"{op} (" + ", ".join(f"H={h} V={v}" for h, v in shapes) + ")")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no kernel results", ha="center", transform=ax.transAxes)
    ax = axes[2]
    rows = [r for r in (step or {}).get("rows", []) if r["status"] == "ok"]
    if rows:
        names = [r["variant"] for r in rows]
        ax.bar(names, [r["step_s"] for r in rows], color=["#2a7", "#c55", "#58c"][: len(rows)])
        for i, r in enumerate(rows):
            label = f"{r['step_s']:.3g} s"
            if r.get("peak_gib") is not None:
                label += f"\n{r['peak_gib']:.3g} GiB"
            ax.text(i, r["step_s"], label, ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("one optimizer step, s")
        ax.set_title("AltPO step, Llama-3.2-1B shape" if not res.get("quick") else "AltPO step (CPU quick)")
    else:
        ax.text(0.5, 0.5, "no step results", ha="center", transform=ax.transAxes)
    fig.suptitle(f"altpo-fast on {res.get('card')} (commit {res.get('commit')})"
                 + ("  [CPU --quick, not a performance result]" if res.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_readme(md: str, name: str, readme: Path = README) -> None:
    """Put ``md`` between the results markers of benchmarks/README.md."""
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block to fill")
    block = f"{START}\nLatest: `benchmarks/results/{name}.json` ({name}.md, {name}.png)\n\n{md}{END}"
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(text, encoding="utf-8")


def result_name(res: dict) -> str:
    date = (res.get("date") or "undated")[:10]
    return f"{date}-{res.get('card_slug') or 'unknown'}" + ("-quick" if res.get("quick") else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", type=Path, help="benchmarks/kernels.py --out file")
    p.add_argument("--step", type=Path, help="benchmarks/step.py --out file")
    p.add_argument("--compile", type=Path, help="benchmarks/compile_report.py --out file")
    p.add_argument("--packed", type=Path, help="benchmarks/packed_vs_padded.py --out file")
    p.add_argument("--pytest-junit", type=Path, help="pytest --junitxml file of the kernel tests")
    p.add_argument("--parts", type=Path, help="the suite's 'part exit-status seconds' lines")
    p.add_argument("--from", dest="from_json", type=Path,
                   help="regenerate .md/.png from an existing combined result instead")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="where <date>-<card>.json/.md/.png go (default benchmarks/results)")
    p.add_argument("--update-readme", action="store_true",
                   help="also write the summary into benchmarks/README.md's results block")
    args = p.parse_args(argv)
    if args.from_json:
        res = _load(args.from_json)
        if res is None:
            raise SystemExit(f"--from {args.from_json}: not a readable JSON result")
        name, out_dir = args.from_json.stem, args.from_json.parent
    else:
        res = combine(args)
        name, out_dir = result_name(res), args.out_dir
        write_json(out_dir / f"{name}.json", res)
    md = markdown(res)
    (out_dir / f"{name}.md").write_text(md, encoding="utf-8")
    made_png = plot(res, out_dir / f"{name}.png")
    if args.update_readme:
        update_readme(md, name)
    print(md)
    print(f"wrote {out_dir / name}.json, .md" + (", .png" if made_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
