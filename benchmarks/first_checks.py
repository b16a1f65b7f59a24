"""The GPU suite's first correctness answers, each in seconds: the addmm probe and determinism.

    python -m benchmarks.first_checks probe          # addmm(out_dtype=fp32), beta=1, vs float64
    python -m benchmarks.first_checks determinism    # every backend twice: bit-identical?
    python -m benchmarks.first_checks all --quick    # both, on the CPU at tiny shapes

``probe`` runs ``chunked_backward.probe_addmm_out_dtype`` on the GPU and exits 1 when it fails (the
backward then upcasts its GEMMs: still correct, but not the fast path the numbers assume).

``determinism`` runs, twice each on the same inputs, ``linear_logprobs`` forward and backward
(bf16, N = 6000 tokens: two token chunks with a ragged last one, so the dW accumulator path runs;
H = 1024, V = 32000) on the triton, torch and (when its library is built) cuda backends, and the
AltPO loss (segment sums and gathers) on triton and torch; it exits 1 unless every output and
gradient is bit-identical between the two runs and finite. ``--quick``: N = 45, H = 24, V = 301 in
fp32 on the CPU (Triton under its interpreter, which cannot show atomics; the point on
the CPU is that the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.first_checks --help")

import torch


def _device(quick: bool) -> torch.device:
    if quick or not torch.cuda.is_available():
        if not quick:
            raise SystemExit("first_checks: no CUDA GPU visible (use --quick for the CPU check)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    return torch.device("cuda")


def probe(device) -> dict:
    from altpo_kernels import chunked_backward as cb

    t0 = time.perf_counter()
    if device.type != "cuda":
        return {"check": "addmm_probe", "ok": True, "skipped": "CPU: torch has no 16-bit out_dtype "
                "GEMM here; the CUDA logic is tested with fake addmms (tests/kernels/test_gemm_safety.py)"}
    ok, reason = cb.probe_addmm_out_dtype(device)
    return {"check": "addmm_probe", "ok": ok, "reason": reason, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 3)}


def _inputs(n, h, v, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * h ** -0.5 * 2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::11] = -100
    upstream = torch.randn(n, generator=gen) / n
    return [t.to(device) for t in (hidden, weight, labels, upstream)]


def _logprobs_run(backend, inputs):
    from altpo_kernels.linear_logprobs import linear_logprobs

    hidden, weight, labels, upstream = inputs
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp = linear_logprobs(h, w, labels, backend=backend)
    (logp * upstream).sum().backward()
    return [logp.detach(), h.grad, w.grad]


def _loss_run(backend, inputs, n_seqs):
    from altpo_kernels.altpo_loss import altpo_loss

    hidden, weight, labels, _ = inputs
    n = hidden.shape[0]
    device = hidden.device
    seq_ids = (torch.arange(n, device=device) * n_seqs) // n
    pairs = n_seqs // 3
    win = torch.arange(pairs, device=device)
    lose = torch.arange(pairs, 2 * pairs, device=device)
    retain = torch.arange(2 * pairs, n_seqs, device=device)
    gen = torch.Generator().manual_seed(7)
    ref_w = (torch.randn(pairs, generator=gen) - 20).to(device)
    ref_l = (torch.randn(pairs, generator=gen) - 20).to(device)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = altpo_loss(h, w, labels, seq_ids, win, lose, retain, ref_w, ref_l, backend=backend)
    out.loss.backward()
    return [out.loss.detach().reshape(1), out.win_logps.detach(), h.grad, w.grad]


def _backends(device) -> list[str]:
    names = ["triton", "torch"]
    if device.type == "cuda":
        try:
            from altpo_kernels import cuda_backend

            cuda_backend.load_library("cuda")
            names.append("cuda")
        except Exception as err:  # noqa: BLE001 - reported, not fatal: the library is optional
            print(f"[first_checks] cuda backend left out: {str(err).splitlines()[0][:200]}",
                  file=sys.stderr)
    return names


def determinism(device, quick: bool) -> list[dict]:
    cases = ([(45, 24, 301, torch.float32)] if quick
             else [(6000, 1024, 32000, torch.bfloat16)])
    rows = []
    for n, h, v, dtype in cases:
        inputs = _inputs(n, h, v, dtype, device, seed=n + h)
        for backend in _backends(device):
            for what, run in (("linear_logprobs", lambda b: _logprobs_run(b, inputs)),
                              ("altpo_loss", lambda b: _loss_run(b, inputs, 9))):
                if what == "altpo_loss" and backend == "cuda":
                    continue  # its segment ops are the torch backend's
                t0 = time.perf_counter()
                row = {"check": "determinism", "what": what, "backend": backend, "n": n, "h": h,
                       "v": v, "dtype": str(dtype).replace("torch.", "")}
                try:
                    first, second = run(backend), run(backend)
                    same = [torch.equal(a, b) for a, b in zip(first, second)]
                    finite = all(bool(torch.isfinite(a.float()).all()) for a in first)
                    row.update(ok=all(same) and finite, identical=same, finite=finite)
                except Exception as err:  # noqa: BLE001 - a backend that fails is a failed check
                    row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                row["seconds"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("probe", "determinism", "all"))
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = _device(args.quick)
    rows = []
    if args.check in ("probe", "all"):
        rows.append(probe(device))
    if args.check in ("determinism", "all"):
        rows.extend(determinism(device, args.quick))
    failed = [r for r in rows if not r["ok"]]
    for r in rows:
        print(("ok    " if r["ok"] else "FAIL  ") + json.dumps(r))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": str(device), "rows": rows}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
