"""Kernel microbenchmarks: ``linear_logprobs`` and ``altpo_loss`` against what users would use instead.

For each op, token count N and pass (forward, backward, full = forward + backward) it times every
available variant side by side in one run and measures its peak memory:

    materialised          logits = hidden @ weight.T, fp32 log_softmax, gather (what HF does)
    materialised-compile  torch.compile of the same function
    altpo-torch           altpo_kernels, backend="torch" (chunked, never holds the logits)
    altpo-triton          altpo_kernels, backend="triton" (CUDA; the Triton interpreter on CPU)
    reference             altpo_kernels, backend="reference" (float64; --quick only)
    liger                 Liger-Kernel: LigerFusedLinearCrossEntropyLoss(reduction="none") for
                          linear_logprobs, LigerFusedLinearDPOLoss for the loss (DPO, see below)
    cce                   cut_cross_entropy.linear_cross_entropy(reduction="none"); the AltPO
                          loss is built from its per-token values

Shapes: H=2048, V=128256, N in {4096, 16384, 65536}, bf16 on a GPU; ``--quick`` runs small fp32
shapes on the CPU. Every label is a real token (no ignored rows), so every variant does the same
work. The loss layout is 32 pairs: 32 alternate, 32 forget-answer and 32 retain sequences of
random lengths packed into N tokens. Liger's DPO loss takes [2B, T, H] chosen-then-rejected
blocks, so it gets the same N tokens as 64 sequences of N/64; per token the work is the same (one
log-prob, one gradient coefficient).

Effective TFLOP/s counts model FLOPs, the same for every variant: forward 2NHV, backward 4NHV
(dH and dW), full 6NHV. The fused kernels also recompute the logits in backward (2NHV more), which
is not credited there; the JSON's ``tflops_fused_count`` counts it (forward 2NHV, backward 6NHV,
full 8NHV: what the fused kernels execute). The matmul rate measured in the same run (dense bf16 products on a GPU, fp32 on
the CPU) is the ceiling they are compared with.

Correctness: before timing, each variant's value and both gradients are compared with the float64
reference (``altpo_kernels``' ``reference`` backend) on the same inputs, up to N*V = 4096*128256;
norm-relative error over 1e-3 (fp32) or 2e-2 (bf16) fails the run.

Memory: peak allocated above the inputs (see benchmarks/common.py for how, on CUDA and on the
CPU). ``--quick`` also measures the memory ratio of the torch backend against the materialised
path at N=4096, H=256, V=32000 (forward + backward), each variant in a fresh subprocess.

    python -m benchmarks.kernels --quick --out k.json
    python -m benchmarks.kernels --out results/kernels.json        # on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.kernels --help")

import torch
import torch.nn.functional as F

from benchmarks.common import (
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    MiB,
    PeakMemory,
    REPO_ROOT,
    eprint,
    format_table,
    free_memory,
    matmul_tflops,
    pick_device,
    run_metadata,
    time_fn,
    write_json,
)

OPS = ("linear_logprobs", "altpo_loss")
PASSES = ("forward", "backward", "full")
MODEL_FLOPS = {"forward": 2, "backward": 4, "full": 6}  # times N*H*V
# What the fused kernels execute: backward recomputes the logits (the 6NHV backward).
FUSED_FLOPS = {"forward": 2, "backward": 6, "full": 8}
# Run order: when the suite's deadline cuts a run short, the comparisons that matter most are done.
# The comparisons the goals need come first (torch.compile of the materialised path, Liger), so a
# deadline cuts the less important ones.
VARIANTS = ("altpo-triton", "materialised-compile", "liger", "materialised", "cce", "altpo-torch",
            "reference")
# Ratios printed against these baselines (time of baseline / time of variant).
BASELINES = ("materialised-compile", "liger", "materialised")
GPU_SHAPES = [(n, 2048, 128256) for n in (4096, 16384, 65536)]
# CPU --quick: the first shape is small enough for the Triton interpreter.
QUICK_SHAPES = [(64, 32, 512), (512, 64, 4096)]
INTERPRETER_MAX_WORK = 64 * 32 * 512  # N*H*V above which the interpreter takes minutes
RATIO_SHAPE = (4096, 256, 32000)
NUM_PAIRS = 32
BETA, ALPHA, GAMMA = 0.5, 2.0, 1.0


# ----------------------------------------------------------------------------------------------
# inputs


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
                num_pairs: int = NUM_PAIRS, weight: torch.Tensor | None = None) -> dict:
    """Random hidden states, a 1/sqrt(H)-scaled head (logits of unit scale), labels, a packed layout.

    ``weight`` reuses a head made earlier (the sizes share one [V, H] head).
    """
    gen = torch.Generator(device=device).manual_seed(seed + n)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    if weight is None:
        weight = (torch.randn(v, h, device=device, dtype=torch.float32, generator=gen) * h**-0.5)
        weight = weight.to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    # per-token upstream weights for linear_logprobs: a scalar loss whose gradient is never zero
    token_weights = torch.rand(n, device=device, generator=gen) + 0.5

    pairs = max(1, min(num_pairs, n // 6))
    seqs = 3 * pairs  # alternates, forget answers, retain rows
    cuts = torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[: seqs - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([n])])
    lengths = bounds.diff()
    seq_ids = torch.repeat_interleave(torch.arange(seqs), lengths).to(device)
    ar = torch.arange(pairs, device=device)
    ref = torch.randn(2, pairs, device=device, generator=gen) * 5 - 4.0 * n / seqs
    return {
        "hidden": hidden, "weight": weight, "labels": labels, "token_weights": token_weights,
        "seq_ids": seq_ids, "win": ar, "lose": ar + pairs, "retain": ar + 2 * pairs,
        "ref_win": ref[0].contiguous(), "ref_lose": ref[1].contiguous(), "pairs": pairs,
        "num_seqs": seqs,
    }


def altpo_from_token_logps(token_logp, seq_ids, win, lose, retain, ref_win, ref_lose, num_seqs: int):
    """The AltPO loss (docs/design.md section 2) from per-token log-probs, in plain torch."""
    seq = torch.zeros(num_seqs, device=token_logp.device, dtype=torch.float32)
    seq = seq.index_add(0, seq_ids, token_logp.float())
    delta = (seq[win] - ref_win) - (seq[lose] - ref_lose)
    forget = -(2.0 / BETA) * F.logsigmoid(BETA * delta).mean()
    retain_tokens = torch.isin(seq_ids, retain).sum().clamp(min=1)
    retain_loss = -seq[retain].sum() / retain_tokens
    return GAMMA * forget + ALPHA * retain_loss


def _layout(x: dict) -> tuple:
    # explicit tensors, not the dict: torch.compile guards on its arguments, and the dict gains
    # cached reference entries during the run
    return (x["seq_ids"], x["win"], x["lose"], x["retain"], x["ref_win"], x["ref_lose"], x["num_seqs"])


def materialised_logprobs(hidden, weight, labels):
    """Full [N, V] logits in the input dtype, upcast to fp32 for the log-softmax (as HF does)."""
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)


def materialised_altpo(hidden, weight, labels, seq_ids, win, lose, retain, ref_win, ref_lose, num_seqs):
    return altpo_from_token_logps(materialised_logprobs(hidden, weight, labels), seq_ids, win, lose,
                                  retain, ref_win, ref_lose, num_seqs)


# ----------------------------------------------------------------------------------------------
# variants: each builds a zero-argument forward returning a differentiable scalar


def _triton_backend_ready() -> str | None:
    """None when the Triton backend is importable and complete; else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    try:
        from altpo_kernels import triton as tb
    except Exception as err:  # a half-finished backend must not stop the other variants
        return f"altpo_kernels.triton failed to import: {err}"
    missing = [f for f in ("logprobs_forward", "logprobs_backward", "segment_sum", "gather_segments")
               if not hasattr(tb, f)]
    return f"altpo_kernels.triton lacks {', '.join(missing)}" if missing else None


def availability(device: torch.device, args) -> dict:
    """variant -> None (available) or the reason it is absent, for this device and these flags."""
    cuda = device.type == "cuda"
    why = {
        "materialised": None,
        "materialised-compile": None if (cuda or args.with_compile) else
        "skipped on CPU (compile time dominates; --with-compile runs it)",
        "altpo-torch": None,
        "altpo-triton": _triton_backend_ready(),
        "reference": None if (not cuda or args.with_reference) else
        "skipped on GPU (float64 logits; --with-reference runs it)",
        "liger": None if importlib.util.find_spec("liger_kernel") else "liger_kernel not installed",
        "cce": None if importlib.util.find_spec("cut_cross_entropy") else "cut_cross_entropy not installed",
    }
    if why["cce"] is None and not cuda:
        why["cce"] = "cut_cross_entropy's kernels need CUDA"
    if args.variants:
        for name in VARIANTS:
            if name not in args.variants and why[name] is None:
                why[name] = "not selected (--variants)"
    return why


_COMPILED = {}


def _compiled(fn):
    if fn not in _COMPILED:
        # one compilation serves every N (dynamic shapes), so the suite pays for it once per op
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _liger_dpo_module():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    params = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
    kw = {"beta": BETA}
    if "use_ref_model" in params:
        kw["use_ref_model"] = False  # reference log-probs are constants: ours are cached too
    if "compute_nll_loss" in params:
        kw["compute_nll_loss"] = False
    if "average_log_prob" in params:
        kw["average_log_prob"] = False  # summed sequence log-probs, as AltPO uses
    if "compiled" in params:
        kw["compiled"] = torch.cuda.is_available()
    return LigerFusedLinearDPOLoss(**kw)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def liger_layout(x: dict):
    """The first N' = 64*T tokens as [2B, T] chosen-then-rejected blocks (B = 32 pairs)."""
    n, h = x["hidden"].shape
    rows = 2 * NUM_PAIRS
    t = n // rows
    return rows, t


def build_forward(variant: str, op: str, x: dict):
    """A zero-argument callable computing the op's scalar with ``variant``."""
    hidden, weight, labels, tw = x["hidden"], x["weight"], x["labels"], x["token_weights"]
    if variant in ("altpo-torch", "altpo-triton", "reference"):
        from altpo_kernels import altpo_loss, linear_logprobs

        backend = {"altpo-torch": "torch", "altpo-triton": "triton", "reference": "reference"}[variant]
        if op == "linear_logprobs":
            return lambda: (linear_logprobs(hidden, weight, labels, backend=backend) * tw).sum()
        return lambda: altpo_loss(hidden, weight, labels, x["seq_ids"], x["win"], x["lose"],
                                  x["retain"], x["ref_win"], x["ref_lose"], beta=BETA, alpha=ALPHA,
                                  gamma=GAMMA, backend=backend).loss
    if variant in ("materialised", "materialised-compile"):
        if op == "linear_logprobs":
            fn = materialised_logprobs if variant == "materialised" else _compiled(materialised_logprobs)
            return lambda: (fn(hidden, weight, labels) * tw).sum()
        fn = materialised_altpo if variant == "materialised" else _compiled(materialised_altpo)
        layout = _layout(x)
        return lambda: fn(hidden, weight, labels, *layout)
    if variant == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce_logps():
            return -linear_cross_entropy(hidden, weight, labels, reduction="none").float()

        if op == "linear_logprobs":
            return lambda: (cce_logps() * tw).sum()
        return lambda: altpo_from_token_logps(cce_logps(), *_layout(x))
    if variant == "liger":
        if op == "linear_logprobs":
            if hidden.device.type != "cuda":
                raise _Unavailable("Liger's fused linear cross-entropy kernels need CUDA")
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            module = LigerFusedLinearCrossEntropyLoss(reduction="none")
            return lambda: (-_first(module(weight, hidden, labels)).float() * tw).sum()
        module = _liger_dpo_module()
        rows, t = liger_layout(x)
        if t == 0:
            raise _Unavailable(f"N={hidden.shape[0]} is too few tokens for {rows} sequences")

        def liger_dpo():
            h3 = hidden[: rows * t].view(rows, t, -1)
            y = labels[: rows * t].view(rows, t)
            return _first(module(weight, h3, y))

        return liger_dpo
    raise ValueError(f"unknown variant {variant!r}")


class _Unavailable(Exception):
    pass


class _DeriveBackward(Exception):
    pass


# Largest N*V whose float64 reference (logits, their gradient) is computed: 4096 x 128256 on a
# GPU is about 17 GB at peak; larger shapes are checked through the smaller ones.
REFERENCE_MAX_NV = 4096 * 128256
# Norm-relative error allowed against the float64 reference (docs/design.md section 3).
TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 1e-2}


def reference_result(variant: str, op: str, x: dict) -> dict | None:
    """Float64 value and gradients (dH, dW) of what ``variant`` computes; cached per layout."""
    n, v = x["hidden"].shape[0], x["weight"].shape[0]
    if n * v > REFERENCE_MAX_NV:
        return None
    key = ("ref", op, variant == "liger")
    if key in x:
        return x[key]
    from altpo_kernels import altpo_loss, linear_logprobs

    # the reference backend takes fp32 inputs (the same rounded values) and computes in float64
    hidden = x["hidden"].detach().float().requires_grad_()
    weight = x["weight"].detach().float().requires_grad_()
    labels = x["labels"]
    if op == "linear_logprobs":
        value = (linear_logprobs(hidden, weight, labels, backend="reference").double()
                 * x["token_weights"].double()).sum()
    elif variant == "liger":
        # Liger computes plain DPO: AltPO with alpha=0, gamma=beta/2 on its layout
        rows, t = liger_layout(x)
        ids = torch.arange(rows, device=hidden.device).repeat_interleave(t)
        ar = torch.arange(rows // 2, device=hidden.device)
        zero = torch.zeros(rows // 2, device=hidden.device)
        value = altpo_loss(hidden[: rows * t], weight, labels[: rows * t], ids, ar, ar + rows // 2,
                           ar[:0], zero, zero, beta=BETA, alpha=0.0, gamma=BETA / 2,
                           backend="reference").loss
    else:
        value = altpo_loss(hidden, weight, labels, x["seq_ids"], x["win"], x["lose"], x["retain"],
                           x["ref_win"], x["ref_lose"], beta=BETA, alpha=ALPHA, gamma=GAMMA,
                           backend="reference").loss
    value.backward()
    x[key] = {"value": float(value.detach()), "dh": hidden.grad, "dw": weight.grad}
    del value, hidden, weight
    free_memory(x["hidden"].device)
    return x[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))


def compare_with_reference(variant: str, op: str, x: dict, value: torch.Tensor) -> dict:
    """Norm-relative errors of the value and of hidden.grad / weight.grad against float64."""
    ref = reference_result(variant, op, x)
    if ref is None:
        return {"check": "skipped at this size (checked at smaller N)"}
    errs = {"err_value": abs(float(value) - ref["value"]) / max(abs(ref["value"]), 1e-30),
            "err_dh": _rel(x["hidden"].grad, ref["dh"]) if x["hidden"].grad is not None else None,
            "err_dw": _rel(x["weight"].grad, ref["dw"]) if x["weight"].grad is not None else None}
    tol = TOLERANCE.get(str(x["hidden"].dtype).replace("torch.", ""), 1e-3)
    worst = max(e for e in errs.values() if e is not None)
    errs["check"] = "ok" if worst <= tol else f"FAILED: error {worst:.2e} > tolerance {tol:g}"
    return errs


# ----------------------------------------------------------------------------------------------
# measuring one variant


def workspace_mib(variant: str, pass_name: str, n: int, h: int, v: int, x: dict,
                  peak: int | None) -> float | None:
    """Scratch memory of a variant's pass beyond inputs and outputs: for the fused backends'
    backward the chunked loop's formula (``chunked_backward.workspace_bytes``), for everything
    else the measured peak above the inputs (which there is the workspace plus the outputs)."""
    if variant in ("altpo-triton", "altpo-torch") and pass_name in ("backward", "full"):
        from altpo_kernels.chunked_backward import workspace_bytes

        backend = "torch" if variant == "altpo-torch" else "triton"
        return workspace_bytes(n, h, v, x["hidden"].dtype, backend=backend,
                               device=x["hidden"].device.type) / MiB
    return None if peak is None else peak / MiB


def materialised_too_big(variant: str, n: int, v: int, dtype, device) -> str | None:
    """Why a materialised variant cannot fit this device at this size (None when it can).

    Forward and backward hold the logits in the input dtype, their fp32 log-softmax and the fp32
    gradient of the logits: about ``N V (b + 8)`` bytes, plus the gradient cast back (``N V b``).
    An out-of-memory crash would lose the run's other numbers, so such rows are recorded as skipped.
    """
    if not variant.startswith("materialised") or device.type != "cuda":
        return None
    b = torch.empty(0, dtype=dtype).element_size()
    need = n * v * (2 * b + 8)
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.9 * free:
        return f"needs about {need / 2**30:.0f} GiB for the [N, V] logits, {free / 2**30:.0f} GiB free"
    return None


def _zero_grads(x):
    x["hidden"].grad = None
    x["weight"].grad = None


def measure_variant(variant: str, op: str, x: dict, device: torch.device, budget_s: float,
                    check: bool) -> list[dict]:
    """Rows for the three passes of one variant (timing, effective rate, peak memory)."""
    n, h = x["hidden"].shape
    v = x["weight"].shape[0]
    base = {"op": op, "variant": variant, "n": n, "h": h, "v": v,
            "dtype": str(x["hidden"].dtype).replace("torch.", "")}
    rows = []
    try:
        fwd = build_forward(variant, op, x)
        # warm-up (compilation, autotuning) and the correctness check, outside every clock
        _zero_grads(x)
        value = fwd()
        value.backward()
        checked = compare_with_reference(variant, op, x, value.detach()) if check else {}
        del value
        _zero_grads(x)

        # Under the Triton interpreter one call takes seconds: time it once, derive backward.
        interp = variant == "altpo-triton" and device.type == "cpu"
        reps = {"warmup": 0, "min_reps": 1, "max_reps": 1} if interp else {"warmup": 1}
        fwd_t = time_fn(fwd, device, budget_s=budget_s, **reps)
        full_t = time_fn(lambda: fwd().backward(), device, setup=lambda: _zero_grads(x),
                         budget_s=budget_s, **reps)
        bwd_note = "backward derived as full - forward"
        try:
            if interp:
                raise _DeriveBackward
            out = fwd()
            bwd_t = time_fn(lambda: out.backward(retain_graph=True), device,
                            setup=lambda: _zero_grads(x), budget_s=budget_s, warmup=1)
            del out
            bwd_note = None
        except (RuntimeError, _DeriveBackward):
            # a graph that cannot be run backward twice: backward = full - forward
            bwd_t = {"median_ms": max(full_t["median_ms"] - fwd_t["median_ms"], 0.0),
                     "min_ms": None, "max_ms": None, "reps": 0}
        _zero_grads(x)
        free_memory(device)

        mem_fwd = None
        if not interp:
            with PeakMemory(device) as mem_fwd:
                out = fwd()
            del out
            _zero_grads(x)
            free_memory(device)
        with PeakMemory(device) as mem_full:
            fwd().backward()
        _zero_grads(x)
        peaks = {"forward": mem_fwd.peak_bytes if mem_fwd else None, "backward": None,
                 "full": mem_full.peak_bytes}
        for name, t in (("forward", fwd_t), ("backward", bwd_t), ("full", full_t)):
            flops = MODEL_FLOPS[name] * n * h * v
            row = dict(base, **{"pass": name, "status": "ok", "median_ms": t["median_ms"],
                                "min_ms": t["min_ms"], "reps": t["reps"],
                                "tflops": flops / (t["median_ms"] * 1e-3) / 1e12 if t["median_ms"] else None,
                                "tflops_fused_count": (FUSED_FLOPS[name] * n * h * v / (t["median_ms"] * 1e-3) / 1e12
                                                       if t["median_ms"] else None),
                                "peak_mib": None if peaks[name] is None else peaks[name] / MiB,
                                "workspace_mib": workspace_mib(variant, name, n, h, v, x, peaks[name]),
                                **checked})
            if name == "backward" and bwd_note:
                row["note"] = bwd_note
            if variant == "liger" and op == "altpo_loss" and name != "full":
                # Liger's chunked loss computes the gradients inside its forward
                row["note"] = "gradients computed in forward: compare the full pass"
            rows.append(row)
    except _Unavailable as why:
        rows = [dict(base, **{"pass": p, "status": f"unavailable: {why}"}) for p in PASSES]
    except torch.cuda.OutOfMemoryError:
        rows = [dict(base, **{"pass": p, "status": "out of memory"}) for p in PASSES]
    except Exception as err:  # one broken variant must not lose the others' numbers
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        # torch.compile and third-party kernels re-raise allocation failures as other types
        status = "out of memory" if "out of memory" in str(err).lower() else f"error: {msg}"
        rows = [dict(base, **{"pass": p, "status": status}) for p in PASSES]
    _zero_grads(x)
    free_memory(device)
    return rows


def add_ratios(results: list[dict]) -> list[dict]:
    """Speed-up and memory of every variant relative to each baseline (materialised, its
    torch.compile, Liger), per op/N/pass: ``speedup_vs_<baseline>`` = baseline time / variant
    time, ``memory_vs_<baseline>`` = variant peak / baseline peak."""
    index = {(r["op"], r["n"], r["pass"], r["variant"]): r for r in results if r["status"] == "ok"}
    ratios = []
    for (op, n, p, variant), r in index.items():
        entry = {"op": op, "n": n, "pass": p, "variant": variant}
        for b in BASELINES:
            base = index.get((op, n, p, b))
            key = b.replace("-", "_")
            entry[f"speedup_vs_{key}"] = entry[f"memory_vs_{key}"] = None
            if base is None or b == variant:
                continue
            if r["median_ms"]:
                entry[f"speedup_vs_{key}"] = base["median_ms"] / r["median_ms"]
            if r.get("peak_mib") is not None and base.get("peak_mib"):
                entry[f"memory_vs_{key}"] = r["peak_mib"] / base["peak_mib"]
        ratios.append(entry)
    return ratios


# ----------------------------------------------------------------------------------------------
# the memory ratio of the torch backend, each variant in a fresh process


def memory_worker(variant: str, op: str, shape: tuple[int, int, int]) -> dict:
    """Runs in a fresh subprocess: one forward + backward, peak memory above the inputs."""
    n, h, v = shape
    device = torch.device("cpu")
    x = make_inputs(n, h, v, torch.float32, device, seed=1)
    fwd = build_forward(variant, op, x)
    with PeakMemory(device) as mem:
        fwd().backward()
    return {"variant": variant, "op": op, "shape": list(shape), "peak_bytes": mem.peak_bytes,
            "grad_checksum": float(x["hidden"].grad.double().abs().sum())}


def memory_ratio(shape: tuple[int, int, int], op: str = "linear_logprobs") -> dict:
    """Torch backend vs materialised peak memory, measured side by side in fresh processes."""
    found = {}
    for variant in ("materialised", "altpo-torch"):
        cmd = [sys.executable, "-m", "benchmarks.kernels", "--memory-worker", variant, "--op", op,
               "--shape", ",".join(map(str, shape))]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            return {"shape": list(shape), "op": op, "error": res.stderr.strip()[-500:]}
        found[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    mat, tor = found["materialised"], found["altpo-torch"]
    same = abs(mat["grad_checksum"] - tor["grad_checksum"]) <= 1e-3 * abs(mat["grad_checksum"])
    return {
        "shape": list(shape), "op": op, "pass": "full",
        "materialised_mib": mat["peak_bytes"] / MiB,
        "altpo_torch_mib": tor["peak_bytes"] / MiB,
        "ratio": tor["peak_bytes"] / mat["peak_bytes"] if mat["peak_bytes"] else None,
        "gradients_agree": same,
        "method": "each variant in a fresh CPU subprocess; " + CPU_MEMORY_METHOD,
    }


def workspace_worker(backend: str, dtype_name: str, shape: tuple[int, int, int], chunk: int,
                     band: int) -> dict:
    """Runs in a fresh subprocess: peak memory of one chunked backward above its inputs, the
    outputs' bytes, and what ``chunked_backward.workspace_bytes`` predicts for it."""
    from altpo_kernels import torch_chunked
    from altpo_kernels.chunked_backward import workspace_bytes

    n, h, v = shape
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    x = make_inputs(n, h, v, dtype, device, seed=2)
    hidden, weight, labels = x["hidden"].detach(), x["weight"].detach(), x["labels"]
    _, lse = torch_chunked.logprobs_forward(hidden, weight, labels)
    grad = x["token_weights"]
    if backend != "torch":
        raise SystemExit("the workspace probe runs the torch backend (the CPU path)")
    with PeakMemory(device) as mem:
        dh, dw = torch_chunked.logprobs_backward(hidden, weight, labels, lse, grad, True, True,
                                                 token_chunk=chunk, vocab_band=band)
    size = hidden.element_size()
    # outputs: the fp32 dH accumulator, its cast to the input dtype (16-bit only), dW
    outputs = n * h * 4 + (n * h * size if size < 4 else 0) + v * h * size
    return {"backend": backend, "dtype": dtype_name, "shape": list(shape), "chunk": chunk,
            "band": band, "peak_bytes": mem.peak_bytes, "output_bytes": outputs,
            "predicted_workspace_bytes": workspace_bytes(n, h, v, dtype, backend=backend,
                                                         device="cpu", token_chunk=chunk,
                                                         vocab_band=band),
            "grad_abs_sum": float(dh.double().abs().sum() + dw.double().abs().sum())}


def workspace_probe(backend: str, dtype_name: str, shape: tuple[int, int, int], chunk: int,
                    band: int) -> dict:
    """``workspace_worker`` in a fresh process (so earlier allocations do not hide its peak)."""
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--workspace-worker",
           f"{backend},{dtype_name},{','.join(map(str, shape))},{chunk},{band}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-800:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def gemm_calibration(device: torch.device, h: int, v: int, n: int, budget_s: float = 0.2) -> dict:
    """cuBLAS (torch) GEMM rates at the chunked backward's shapes, fp32 outputs as it uses them.

    Rows: the logits block of one (chunk, band) [C, H] x [H, Vb] (what the G producer computes),
    ``dH[chunk] += G @ W_band`` and ``dW_band += G^T @ H_chunk`` through ``gemm_into`` (addmm with
    ``out_dtype=float32`` on CUDA), and the same products with 16-bit outputs for comparison. The
    sum gives the backward time these GEMMs alone predict at N tokens.
    """
    from altpo_kernels.chunked_backward import chunk_sizes, gemm_into

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c, vb = chunk_sizes(n, v)
    gen = torch.Generator(device="cpu").manual_seed(7)
    hid = torch.randn(c, h, generator=gen).to(device, dtype)
    w = (torch.randn(vb, h, generator=gen) * h**-0.5).to(device, dtype)
    g = (torch.randn(c, vb, generator=gen) * 1e-3).to(device, dtype)
    dh = torch.zeros(c, h, device=device)
    acc = torch.zeros(vb, h, device=device)
    cases = {
        "logits [C,H]x[H,Vb] input-dtype out": (lambda: hid @ w.T, c * vb * h),
        "dH += G @ W_band (fp32 out)": (lambda: gemm_into(dh, g, w, accumulate=True), c * vb * h),
        "dW_band += G^T @ H_chunk (fp32 out)": (lambda: gemm_into(acc, g.T, hid, accumulate=True),
                                                 c * vb * h),
        "G @ W_band (input-dtype out)": (lambda: g @ w, c * vb * h),
        "G^T @ H_chunk (input-dtype out)": (lambda: g.T @ hid, c * vb * h),
    }
    rows = []
    for name, (fn, mnk) in cases.items():
        t = time_fn(fn, device, budget_s=budget_s, warmup=2)
        rows.append({"gemm": name, "m_n_k": [c, vb, h], "median_ms": t["median_ms"],
                     "tflops": 2 * mnk / (t["median_ms"] * 1e-3) / 1e12})
    steps = -(-n // c) * -(-v // vb)
    per_step = sum(r["median_ms"] for r in rows[:3])
    return {"dtype": str(dtype).replace("torch.", ""), "token_chunk": c, "vocab_band": vb,
            "n": n, "h": h, "v": v, "rows": rows, "steps": steps,
            "predicted_backward_ms": steps * per_step,
            "note": "predicted_backward_ms: (chunks x bands) x (logits + dH + dW GEMM times); the "
                    "fused producer also does the exp/epilogue, so this is a floor"}


# ----------------------------------------------------------------------------------------------
# driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small fp32 shapes on the CPU (seconds), plus the torch-backend memory ratio")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--tokens", type=int, nargs="+",
                   help="token counts N to run (default 4096 16384 65536 on a GPU)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size H (default 2048)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size V (default 128256)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops to time")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="run only these variants")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of repeats per measurement (default 0.3 GPU, 0.1 --quick)")
    p.add_argument("--deadline", type=float, default=None,
                   help="stop starting new measurements after this many seconds (the rest are "
                        "recorded as skipped); keeps the GPU suite inside its time box")
    p.add_argument("--with-compile", action="store_true", help="also run torch.compile on the CPU")
    p.add_argument("--with-reference", action="store_true", help="also run the float64 reference on a GPU")
    p.add_argument("--no-memory-ratio", action="store_true",
                   help="skip the torch-backend memory ratio (run by --quick)")
    p.add_argument("--ratio-shape", default=",".join(map(str, RATIO_SHAPE)),
                   help="N,H,V of the memory-ratio measurement (default 4096,256,32000)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the float64 check of each variant's value and gradients")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--workspace-worker", help=argparse.SUPPRESS)
    p.add_argument("--calibrate", action="store_true",
                   help="only time the cuBLAS GEMMs at the chunked backward's shapes (fp32 outputs), "
                        "at each --tokens N (default 4096 16384; --quick: small CPU shapes)")
    p.add_argument("--op", default="linear_logprobs", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _parse_shape(text: str, flag: str) -> tuple[int, int, int]:
    try:
        n, h, v = (int(s) for s in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} must be N,H,V (three integers), got {text!r}")
    if min(n, h, v) <= 0:
        raise SystemExit(f"{flag} values must be positive, got {text!r}")
    return n, h, v


def run(args) -> dict:
    device = torch.device("cpu") if args.quick else pick_device(args.device)
    if device.type == "cpu":
        # the Triton kernels run on CPU tensors only under the interpreter, switched on before
        # the kernels' module is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.quick:
        shapes = QUICK_SHAPES
        dtype = torch.float32
    else:
        tokens = args.tokens or [s[0] for s in GPU_SHAPES]
        shapes = [(n, args.hidden, args.vocab) for n in tokens]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.3)
    started = time.perf_counter()
    why_absent = availability(device, args)

    meta = run_metadata(device)
    eprint(f"[kernels] {meta['card']}  torch {meta['torch']}  triton {meta['triton']}")
    matmul = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                           size=None if device.type == "cuda" else 512, budget_s=min(budget * 2, 1.0))
    eprint(f"[kernels] measured {matmul['dtype']} matmul rate: {matmul['tflops']:.3g} TFLOP/s")

    payload = {
        "benchmark": "kernels", "quick": bool(args.quick), "meta": meta, "matmul": matmul,
        "flop_convention": "model FLOPs: forward 2NHV, backward 4NHV, full 6NHV (recompute not credited)",
        "flop_convention_fused_count": "tflops_fused_count: forward 2NHV, backward 6NHV, full 8NHV "
                                       "(what the fused kernels execute, recompute included)",
        "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        "absent": {k: v for k, v in why_absent.items() if v},
        "results": [], "ratios": [],
    }
    # Size-major order, N=4096 and 16384 first and the goals' comparisons first within a size
    # (VARIANTS), so a deadline cuts what matters least; one set of inputs lives at a time.
    weights = {}
    for n, h, v in shapes:
        x = None
        for variant in VARIANTS:
            if why_absent[variant]:
                continue
            for op in args.ops:
                base = {"op": op, "variant": variant, "n": n, "h": h, "v": v,
                        "dtype": str(dtype).replace("torch.", "")}
                if variant == "altpo-triton" and device.type == "cpu" and n * h * v > INTERPRETER_MAX_WORK:
                    payload["results"] += [dict(base, **{"pass": p, "status": "skipped: interpreter too slow at this size"}) for p in PASSES]
                    continue
                if args.deadline is not None and time.perf_counter() - started > args.deadline:
                    payload["results"] += [dict(base, **{"pass": p, "status": "skipped: deadline"}) for p in PASSES]
                    continue
                too_big = materialised_too_big(variant, n, v, dtype, device)
                if too_big:
                    payload["results"] += [dict(base, **{"pass": p, "status": f"skipped: {too_big}"}) for p in PASSES]
                    continue
                if x is None:
                    x = make_inputs(n, h, v, dtype, device, weight=weights.get((h, v)))
                    weights[(h, v)] = x["weight"]
                eprint(f"[kernels] {op} N={n} {variant}")
                payload["results"] += measure_variant(variant, op, x, device, budget,
                                                      check=not args.no_check)
                payload["ratios"] = add_ratios(payload["results"])
                for r in payload["results"]:
                    if r.get("tflops") is not None:
                        r["fraction_of_matmul"] = r["tflops"] / matmul["tflops"]
                if args.out:
                    write_json(args.out, payload)
        del x
        free_memory(device)
    weights.clear()
    free_memory(device)
    payload["results"].sort(key=lambda r: (OPS.index(r["op"]), r["n"], VARIANTS.index(r["variant"]),
                                           PASSES.index(r["pass"])))

    if args.quick and not args.no_memory_ratio:
        shape = _parse_shape(args.ratio_shape, "--ratio-shape")
        eprint(f"[kernels] memory ratio at N,H,V={shape} (fresh subprocesses)")
        payload["memory_ratio"] = memory_ratio(shape)
    payload["elapsed_s"] = time.perf_counter() - started
    if args.out:
        write_json(args.out, payload)
    return payload


def summary(payload: dict) -> str:
    lines = []
    m = payload["matmul"]
    lines.append(f"kernels on {payload['meta']['card']} (commit {payload['meta']['commit']}); "
                 f"{m['dtype']} matmul {m['tflops']:.3g} TFLOP/s"
                 + ("  [CPU --quick: small shapes, not a performance claim]" if payload["quick"] else ""))
    cols = [("op", "op", ""), ("n", "N", "d"), ("pass", "pass", ""), ("variant", "variant", ""),
            ("median_ms", "ms", ".3g"), ("tflops", "TFLOP/s 6NHV", ".3g"),
            ("tflops_fused_count", "TFLOP/s 8NHV", ".3g"),
            ("fraction_of_matmul", "of matmul", ".2f"), ("peak_mib", "peak MiB", ".4g"),
            ("workspace_mib", "workspace MiB", ".4g"),
            ("speedup", "x materialised", ".2f"), ("vs_compile", "x compile", ".2f"),
            ("vs_liger", "x liger", ".2f"), ("mem_ratio", "mem/compile", ".3f"),
            ("err", "max err", ".1e"), ("status", "status", "")]
    ratio = {(r["op"], r["n"], r["pass"], r["variant"]): r for r in payload["ratios"]}
    rows = []
    for r in payload["results"]:
        rr = ratio.get((r["op"], r["n"], r["pass"], r["variant"]), {})
        errs = [r.get(k) for k in ("err_value", "err_dh", "err_dw") if r.get(k) is not None]
        status = r["status"] if r["status"] != "ok" else (
            r["check"] if str(r.get("check", "")).startswith("FAILED") else "")
        rows.append(dict(r, speedup=rr.get("speedup_vs_materialised"), err=max(errs) if errs else None,
                         vs_compile=rr.get("speedup_vs_materialised_compile"),
                         vs_liger=rr.get("speedup_vs_liger"),
                         mem_ratio=rr.get("memory_vs_materialised_compile"),
                         status=status[:70]))
    lines.append(format_table(rows, cols))
    lines.append("TFLOP/s 6NHV: model FLOPs (forward 2NHV, backward 4NHV); 8NHV: what the fused "
                 "kernels execute (backward recomputes the logits: 6NHV). x <baseline>: baseline "
                 "time / this time. workspace: the chunked backward's formula for altpo, the "
                 "measured peak above inputs for the others.")
    if payload.get("absent"):
        lines.append("absent: " + "; ".join(f"{k}: {v}" for k, v in payload["absent"].items()))
    mr = payload.get("memory_ratio")
    if mr:
        if "error" in mr:
            lines.append(f"memory ratio: failed: {mr['error']}")
        else:
            lines.append(f"memory ratio (N,H,V={tuple(mr['shape'])}, {mr['op']} forward+backward, CPU): "
                         f"altpo-torch {mr['altpo_torch_mib']:.0f} MiB / materialised "
                         f"{mr['materialised_mib']:.0f} MiB = {mr['ratio']:.3f}"
                         f"{'' if mr['gradients_agree'] else '  (gradients DISAGREE)'}")
    return "\n".join(lines)


def calibrate_main(args) -> int:
    device = torch.device("cpu") if args.quick else pick_device(args.device)
    if args.quick:
        shapes = [(512, 128, 4096)]
    else:
        shapes = [(n, args.hidden, args.vocab) for n in (args.tokens or [4096, 16384])]
    payload = {"benchmark": "gemm_calibration", "meta": run_metadata(device), "results": []}
    for n, h, v in shapes:
        r = gemm_calibration(device, h, v, n, budget_s=0.05 if args.quick else 0.2)
        payload["results"].append(r)
        eprint(f"[calibrate] N={n} H={h} V={v}: C={r['token_chunk']} Vb={r['vocab_band']}, "
               f"{r['steps']} steps, GEMM floor {r['predicted_backward_ms']:.3g} ms")
        for row in r["rows"]:
            print(f"  N={n:6d} {row['gemm']:40s} {row['median_ms']:8.3f} ms {row['tflops']:8.1f} TFLOP/s")
        if args.out:
            write_json(args.out, payload)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.calibrate:
        return calibrate_main(args)
    if args.workspace_worker:
        backend, dtype_name, n, h, v, chunk, band = args.workspace_worker.split(",")
        print(json.dumps(workspace_worker(backend, dtype_name, (int(n), int(h), int(v)), int(chunk),
                                          int(band))))
        return 0
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.op, _parse_shape(args.shape, "--shape"))))
        return 0
    payload = run(args)
    print(summary(payload))
    # A wrong number fails the run; an error of a comparison library is reported in its rows
    # (and in "absent"), not allowed to fail the whole part.
    bad = [r for r in payload["results"]
           if str(r.get("check", "")).startswith("FAILED")
           or (r["status"].startswith("error") and r["variant"].startswith("altpo"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
