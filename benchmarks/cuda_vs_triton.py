"""The ``cuda`` backend beside the ``triton`` backend: each timed, and each checked against the other.

What differs and what is shared: the forward is separate code (``triton``: one Triton kernel with
the logits tile in registers and an online log-sum-exp; ``cuda``: cuBLAS logits tiles folded by
the C++ forward epilogue of ``kernels/csrc``), and so is the backward's G producer (a Triton
kernel against cuBLAS plus the C++ backward epilogue). Both backwards then run the same chunk loop
(``chunked_backward.py``) and the same cuBLAS GEMMs (``gemm_into``) for dH and dW. Agreement at
full size therefore checks the two forwards and the two G producers against each other; a fault
in the shared loop or GEMMs would show in both and is caught only by the float64 comparison
(N = 1024 here, and the kernel tests).

For each shape and dtype, both backends run ``logprobs_forward`` and ``logprobs_backward``
(dH and dW) on the same inputs; the script reports median time, TFLOP/s (executed: forward 2NHV,
backward 6NHV, the logits recompute included), peak memory above the inputs, and the difference
between the two backends: max |logp| difference, and ||a - b|| / ||b|| for dH and dW. Where the
float64 reference fits (N * V <= 1024 * 128256), both are also compared with it. The upstream
gradient is that of a mean over tokens (|g| ~ 1/N), where fp16's range matters.

A disagreement over the bound (logp 1e-3 absolute in fp32 accumulation; gradients 2e-2 relative
for 16-bit inputs, 1e-4 for fp32), or a requested backend that fails to run (no library, an error
in forward or backward), makes the script exit with status 1.

    bash scripts/build_csrc.sh                                    # once: build/libaltpo_csrc.so
    python -m benchmarks.cuda_vs_triton --out cuda_vs_triton.json # on a GPU
    python -m benchmarks.cuda_vs_triton --quick                   # CPU: the host build of the
        # epilogues against the Triton interpreter, tiny shapes (a check of the plumbing and math)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.cuda_vs_triton --help")

import torch

from benchmarks.common import (PeakMemory, eprint, format_table, free_memory, pick_device, run_metadata,
                               time_fn, write_json)

BACKENDS = ("triton", "cuda")
# 1024 tokens first: small enough for the float64 reference, so a disagreement says who is right.
GPU_CASES = [(1024, 2048, 128256, torch.bfloat16), (4096, 2048, 128256, torch.bfloat16),
             (16384, 2048, 128256, torch.bfloat16), (4096, 2048, 128256, torch.float16)]
QUICK_CASES = [(45, 24, 301, torch.float32), (45, 24, 301, torch.float16)]
REFERENCE_MAX_WORK = 1024 * 128256  # N * V of the float64 logits the reference materialises
LOGP_BOUND = 1e-3
GRAD_BOUND = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_inputs(n, h, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * h ** -0.5 * 2.0).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    upstream = (torch.rand(n, device=device, generator=gen) + 0.5) / n
    return hidden, weight, labels, upstream


def _module(name: str):
    from altpo_kernels.backends import backend_module

    return backend_module(name)


def _failure(err) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def run_backend(name, inputs, device, budget_s):
    """Values and timings of one backend's forward and backward; a pass that cannot run (an absent
    library or chunk loop) is reported with its reason instead."""
    hidden, weight, labels, upstream = inputs
    n, h = hidden.shape
    v = weight.shape[0]
    row = {"backend": name}
    values = [None, None, None]
    try:
        mod = _module(name)
        values[0], lse = mod.logprobs_forward(hidden, weight, labels)
    except (ImportError, RuntimeError, ValueError) as err:
        row["status"] = _failure(err)
        return row, values
    passes = [("forward", 2 * n * h * v, lambda: mod.logprobs_forward(hidden, weight, labels))]
    try:
        values[1], values[2] = mod.logprobs_backward(hidden, weight, labels, lse, upstream, True, True)
        passes.append(("backward", 6 * n * h * v,
                       lambda: mod.logprobs_backward(hidden, weight, labels, lse, upstream, True, True)))
        row["status"] = "ok"
    except (ImportError, RuntimeError, ValueError) as err:
        row["status"] = "backward: " + _failure(err)
    for pass_name, flops, fn in passes:
        with PeakMemory(device) as mem:
            t = time_fn(fn, device, budget_s=budget_s, warmup=0 if device.type == "cpu" else 1,
                        min_reps=2 if device.type == "cpu" else 3)
        row[f"{pass_name}_ms"] = t["median_ms"]
        row[f"{pass_name}_tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
        row[f"{pass_name}_peak_mib"] = None if mem.peak_bytes is None else mem.peak_bytes / 2**20
    return row, values


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def reference(inputs):
    from altpo_kernels.reference import linear_logprobs_reference

    hidden, weight, labels, upstream = inputs
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logp = linear_logprobs_reference(h, w, labels)
    (logp * upstream.double()).sum().backward()
    return logp.detach(), h.grad, w.grad


def _differences(got, want) -> dict:
    diff = {}
    if got[0] is not None and want[0] is not None:
        diff["logp_max_abs"] = float((got[0].double() - want[0].double()).abs().max())
    if got[1] is not None and want[1] is not None:
        diff["dh_rel"], diff["dw_rel"] = _rel(got[1], want[1]), _rel(got[2], want[2])
    return diff


def compare(results, ref, dtype) -> dict:
    """Differences between the backends, and of each from the float64 reference when given."""
    check = {"cuda_vs_triton": _differences(results["cuda"], results["triton"])}
    if ref is not None:
        for name, got in results.items():
            check[f"{name}_vs_reference"] = _differences(got, ref)
    check = {name: values for name, values in check.items() if values}
    for values in check.values():
        values["ok"] = (values.get("logp_max_abs", 0.0) <= LOGP_BOUND
                        and values.get("dh_rel", 0.0) <= GRAD_BOUND[dtype]
                        and values.get("dw_rel", 0.0) <= GRAD_BOUND[dtype])
    return check


def run(args) -> dict:
    device = pick_device("cpu" if args.quick else args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from altpo_kernels import cuda_backend

    cases = QUICK_CASES if args.quick else GPU_CASES
    payload = {"meta": run_metadata(device), "library": cuda_backend.library_status(), "cases": []}
    eprint(f"[cuda_vs_triton] {payload['meta']['card']}\n{payload['library']}")
    for n, h, v, dtype in cases:
        inputs = make_inputs(n, h, v, dtype, device)
        rows, values = [], {}
        for name in BACKENDS:
            if name not in args.backends:
                rows.append({"backend": name, "status": "not requested (--backends)"})
                values[name] = [None, None, None]
                continue
            row, got = run_backend(name, inputs, device, args.budget)
            rows.append(row)
            values[name] = got
            free_memory(device)
        ref = reference(inputs) if n * v <= REFERENCE_MAX_WORK else None
        case = {"n": n, "h": h, "v": v, "dtype": str(dtype).replace("torch.", ""), "rows": rows,
                "checks": compare(values, ref, dtype)}
        for r in rows:
            r["status"] = r["status"][:160]
        timed = {r["backend"]: r for r in rows}
        for p in ("forward", "backward"):
            if all(f"{p}_ms" in timed[b] for b in BACKENDS):
                case[f"{p}_cuda_over_triton"] = timed["cuda"][f"{p}_ms"] / timed["triton"][f"{p}_ms"]
        payload["cases"].append(case)
        del inputs, values, ref
        free_memory(device)
        if args.out:
            write_json(args.out, payload)
    return payload


def summary(payload) -> str:
    lines = []
    for case in payload["cases"]:
        lines.append(f"\nN={case['n']} H={case['h']} V={case['v']} {case['dtype']}")
        lines.append(format_table(case["rows"], [
            ("backend", "backend", ""), ("forward_ms", "fwd ms", ".4g"), ("forward_tflops", "fwd TFLOP/s", ".3g"),
            ("forward_peak_mib", "fwd MiB", ".4g"), ("backward_ms", "bwd ms", ".4g"),
            ("backward_tflops", "bwd TFLOP/s", ".3g"), ("backward_peak_mib", "bwd MiB", ".4g"),
            ("status", "status", "")]))
        for p in ("forward", "backward"):
            if f"{p}_cuda_over_triton" in case:
                lines.append(f"{p}: cuda / triton time = {case[f'{p}_cuda_over_triton']:.3g}")
        for name, c in case["checks"].items():
            parts = [f"{label} {c[key]:.3g}" for key, label in
                     (("logp_max_abs", "logp max |diff|"), ("dh_rel", "dH rel"), ("dw_rel", "dW rel")) if key in c]
            lines.append(f"{name}: {', '.join(parts)} -> {'ok' if c['ok'] else 'DISAGREE'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU, tiny shapes: host epilogues vs the Triton interpreter")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of triton,cuda (default both)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BACKENDS)}")
    payload = run(args)
    print(summary(payload))
    bad = [name for case in payload["cases"] for name, c in case["checks"].items() if not c["ok"]]
    failed = failed_backends(payload, args.backends)
    if bad:
        eprint(f"[cuda_vs_triton] disagreement over the bounds: {', '.join(bad)}")
    for msg in failed:
        eprint(f"[cuda_vs_triton] backend failed: {msg}")
    return 1 if bad or failed else 0


def failed_backends(payload, requested) -> list[str]:
    """``"N=.. dtype backend: status"`` for every requested backend whose run was not ``ok``."""
    out = []
    for case in payload["cases"]:
        for r in case["rows"]:
            if r["backend"] in requested and r.get("status") != "ok":
                out.append(f"N={case['n']} {case['dtype']} {r['backend']}: {r.get('status')}")
    return out


if __name__ == "__main__":
    sys.exit(main())
