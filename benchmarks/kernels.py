"""Kernel microbenchmarks: ``linear_logprobs`` and ``altpo_loss`` against what users would use instead.

For each op, token count N and pass (forward, backward, full = forward + backward) it times every
available variant side by side in one run and measures its peak memory:

    materialised          logits = hidden @ weight.T, fp32 log_softmax, gather (what HF does)
    materialised-compile  torch.compile of the same function, dynamic shapes (one compile for
                          every N)
    materialised-compile-static  torch.compile of it with static shapes (one compile per N)
    trl                   TRL's fused LM head, trl.kernels.chunked_logprob.ChunkedLogProbFunction
                          (cuBLAS on [4096 x 32768] tiles plus a Triton epilogue on CUDA, torch
                          ops on the CPU), with the vocabulary chunk its DPO trainer passes
    altpo-torch           altpo_kernels, backend="torch" (chunked, never holds the logits)
    altpo-triton          altpo_kernels, backend="triton" (CUDA; the Triton interpreter on CPU)
    reference             altpo_kernels, backend="reference" (float64; --quick only)
    liger                 Liger-Kernel: LigerFusedLinearCrossEntropyLoss(reduction="none")
    cce                   cut_cross_entropy.linear_cross_entropy(reduction="none"): impl "cce"
                          (its Triton kernels) on CUDA, its CPU-capable "torch_compile" impl on
                          the CPU
For the loss, every peer computes the same thing on the same packed batch: its per-token
log-probs (-cross-entropy for Liger and CCE), then the same AltPO assembly (forget pairs and the
retain NLL) in torch.

Shapes: H=2048, V=128256, N in {4096, 16384, 65536}, bf16 on a GPU; ``--quick`` runs small fp32
shapes on the CPU. Every label is a real token (no ignored rows), so every variant does the same
work. The loss layout is 32 pairs: 32 alternate, 32 forget-answer and 32 retain sequences of
random lengths packed into N tokens, the same for every variant.

Effective TFLOP/s counts model FLOPs, the same for every variant: forward 2NHV, backward 4NHV
(dH and dW), full 6NHV. The fused kernels also recompute the logits in backward (2NHV more), which
is not credited there; the JSON's ``tflops_fused_count`` counts it (forward 2NHV, backward 6NHV,
full 8NHV: what the fused kernels execute). The matmul rate measured in the same run (dense bf16 products on a GPU, fp32 on
the CPU) is the ceiling they are compared with.

Correctness: before timing, each variant's value and both gradients are compared with the float64
reference (``altpo_kernels``' ``reference`` backend) on the same inputs, up to N*V = 4096*128256;
norm-relative error over 1e-3 (fp32) or 2e-2 (bf16) fails the run.

Memory: peak allocated above the inputs, measured the same way for every variant (see
benchmarks/common.py for how, on CUDA and on the CPU); that is the ``workspace_mib`` column. The
fused backends' formula (``chunked_backward.workspace_bytes``) is reported beside it as
``workspace_formula_mib``, not instead of it. ``--quick`` also measures the memory ratio of the torch backend against the materialised
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
OWN_VARIANTS = ("altpo-triton", "altpo-torch")  # this project's: an error there fails the run
PASSES = ("forward", "backward", "full")
MODEL_FLOPS = {"forward": 2, "backward": 4, "full": 6}  # times N*H*V
# What the fused kernels execute: backward recomputes the logits (the 6NHV backward).
FUSED_FLOPS = {"forward": 2, "backward": 6, "full": 8}
# Run order: when the suite's deadline cuts a run short, the comparisons that matter most are done.
# The comparisons the goals need come first (torch.compile of the materialised path, Liger), so a
# deadline cuts the less important ones.
VARIANTS = ("altpo-triton", "trl", "materialised-compile", "materialised-compile-static", "liger",
            "cce", "materialised", "altpo-torch", "reference")
# Ratios printed against these baselines (time of baseline / time of variant).
BASELINES = ("trl", "materialised-compile", "materialised-compile-static", "liger", "cce",
             "materialised")
# The vocabulary chunk TRL's DPO trainer hands ChunkedLogProbFunction (trl/trainer/utils.py).
TRL_CHUNK_SIZE = 32768
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
        "materialised-compile-static": None if (cuda or args.with_compile) else
        "skipped on CPU (compile time dominates; --with-compile runs it)",
        "trl": _trl_ready(),
        "altpo-torch": None,
        "altpo-triton": _triton_backend_ready(),
        "reference": None if (not cuda or args.with_reference) else
        "skipped on GPU (float64 logits; --with-reference runs it)",
        "liger": None if importlib.util.find_spec("liger_kernel") else "liger_kernel not installed",
        "cce": None if importlib.util.find_spec("cut_cross_entropy") else "cut_cross_entropy not installed",
    }
    if args.variants:
        for name in VARIANTS:
            if name not in args.variants and why[name] is None:
                why[name] = "not selected (--variants)"
    return why


def _trl_ready() -> str | None:
    if importlib.util.find_spec("trl") is None:
        return "trl not installed"
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401
    except Exception as err:  # noqa: BLE001 - an older TRL without the fused head
        return f"trl has no kernels.chunked_logprob ({type(err).__name__}: {str(err)[:120]})"
    return None


def trl_logprobs(hidden, weight, labels):
    """Per-token log-probs from TRL's fused head: no bias, temperature 1, no extra outputs."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, TRL_CHUNK_SIZE, None, 1.0, ())
    return _first(out).float()


def cce_logprobs(hidden, weight, labels):
    """-cross-entropy per token from cut-cross-entropy: its Triton kernels on CUDA, its
    torch.compile implementation (the one that runs on a CPU) elsewhere."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.device.type == "cuda" else "torch_compile"
    return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl).float()


_COMPILED = {}


def _compiled(fn, dynamic: bool = True):
    if (fn, dynamic) not in _COMPILED:
        # dynamic: one compilation serves every N; static: one per N (what a fixed-shape user gets)
        _COMPILED[(fn, dynamic)] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[(fn, dynamic)]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


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
    if variant.startswith("materialised"):
        static = variant == "materialised-compile-static"
        compiled = variant != "materialised"
        if op == "linear_logprobs":
            fn = _compiled(materialised_logprobs, not static) if compiled else materialised_logprobs
            return lambda: (fn(hidden, weight, labels) * tw).sum()
        fn = _compiled(materialised_altpo, not static) if compiled else materialised_altpo
        layout = _layout(x)
        return lambda: fn(hidden, weight, labels, *layout)
    if variant in ("trl", "cce", "liger"):
        if variant == "trl":
            logps = lambda: trl_logprobs(hidden, weight, labels)  # noqa: E731
        elif variant == "cce":
            logps = lambda: cce_logprobs(hidden, weight, labels)  # noqa: E731
        else:
            if hidden.device.type != "cuda":
                raise _Unavailable("Liger's fused linear cross-entropy kernels need CUDA")
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            module = LigerFusedLinearCrossEntropyLoss(reduction="none")
            logps = lambda: -_first(module(weight, hidden, labels)).float()  # noqa: E731
        if op == "linear_logprobs":
            return lambda: (logps() * tw).sum()
        # the same AltPO (pairs and retain NLL) on the same packed batch as every other variant
        layout = _layout(x)
        return lambda: altpo_from_token_logps(logps(), *layout)
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
    key = ("ref", op)
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
    errs = {"value": float(value), "reference_value": ref["value"],
            "err_value": abs(float(value) - ref["value"]) / max(abs(ref["value"]), 1e-30),
            "err_dh": _rel(x["hidden"].grad, ref["dh"]) if x["hidden"].grad is not None else None,
            "err_dw": _rel(x["weight"].grad, ref["dw"]) if x["weight"].grad is not None else None}
    tol = TOLERANCE.get(str(x["hidden"].dtype).replace("torch.", ""), 1e-3)
    worst = max(e for k, e in errs.items() if k.startswith("err_") and e is not None)
    errs["check"] = "ok" if worst <= tol else f"FAILED: error {worst:.2e} > tolerance {tol:g}"
    return errs


# ----------------------------------------------------------------------------------------------
# measuring one variant


def workspace_formula_mib(variant: str, pass_name: str, n: int, h: int, v: int,
                          x: dict) -> float | None:
    """The fused backends' backward workspace by formula (``chunked_backward.workspace_bytes``);
    reported beside the measured peak, never instead of it. None for other variants."""
    if variant in ("altpo-triton", "altpo-torch") and pass_name in ("backward", "full"):
        from altpo_kernels.chunked_backward import workspace_bytes

        backend = "torch" if variant == "altpo-torch" else "triton"
        return workspace_bytes(n, h, v, x["hidden"].dtype, backend=backend,
                               device=x["hidden"].device.type) / MiB
    return None


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
                                # measured the same way for every variant: peak above the inputs
                                "workspace_mib": None if peaks[name] is None else peaks[name] / MiB,
                                "workspace_formula_mib": workspace_formula_mib(variant, name, n, h, v, x),
                                **checked})
            if name == "backward" and bwd_note:
                row["note"] = bwd_note
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


def memory_worker(variant: str, op: str, shape: tuple[int, int, int], grads_out: str | None = None) -> dict:
    """Runs in a fresh subprocess: one forward + backward, peak memory above the inputs.

    ``grads_out``: a file to write dH and dW to (``torch.save``), for the parent's element-wise
    comparison of the two variants' gradients.
    """
    n, h, v = shape
    device = torch.device("cpu")
    x = make_inputs(n, h, v, torch.float32, device, seed=1)
    fwd = build_forward(variant, op, x)
    with PeakMemory(device) as mem:
        fwd().backward()
    if grads_out:
        torch.save({"dh": x["hidden"].grad, "dw": x["weight"].grad}, grads_out)
    return {"variant": variant, "op": op, "shape": list(shape), "peak_bytes": mem.peak_bytes}


# Element-wise agreement of two fp32 gradients of the same op: every element within this relative
# error of the reference element, where elements smaller than GRAD_FLOOR x the largest are judged
# against that floor (their relative error is rounding noise, not a wrong formula).
GRAD_RTOL = 2e-4
GRAD_FLOOR = 1e-2


def compare_gradients(got: dict, want: dict, rtol: float = GRAD_RTOL) -> dict:
    """Max absolute and relative error, element by element, of each gradient in ``want``.

    ``agree`` is True only when every element of every gradient is within ``rtol``; a single
    wrong element (a wrong sign, a missed token) makes it False.
    """
    out = {"rtol": rtol, "floor": GRAD_FLOOR, "agree": True}
    for name, ref in want.items():
        a, b = got[name].double(), ref.double()
        if a.shape != b.shape:
            out.update({f"{name}_max_abs_err": None, f"{name}_max_rel_err": None, "agree": False,
                        f"{name}_error": f"shape {tuple(a.shape)} != {tuple(b.shape)}"})
            continue
        diff = (a - b).abs()
        scale = b.abs().clamp(min=GRAD_FLOOR * float(b.abs().max().clamp(min=1e-30)))
        rel = diff / scale
        worst = int(rel.argmax())
        out[f"{name}_max_abs_err"] = float(diff.max())
        out[f"{name}_max_rel_err"] = float(rel.reshape(-1)[worst])
        out[f"{name}_worst_index"] = [int(i) for i in torch.unravel_index(torch.tensor(worst), b.shape)]
        if not torch.isfinite(a).all() or float(rel.max()) > rtol:
            out["agree"] = False
    return out


def memory_ratio(shape: tuple[int, int, int], op: str = "linear_logprobs") -> dict:
    """Torch backend vs materialised peak memory, measured side by side in fresh processes; the
    two gradients (dH, dW) are compared element by element."""
    import tempfile

    found, grads = {}, {}
    with tempfile.TemporaryDirectory(prefix="altpo-memory-ratio-") as tmp:
        for variant in ("materialised", "altpo-torch"):
            grads_file = os.path.join(tmp, f"{variant}.pt")
            cmd = [sys.executable, "-m", "benchmarks.kernels", "--memory-worker", variant, "--op", op,
                   "--shape", ",".join(map(str, shape)), "--grads-out", grads_file]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                return {"shape": list(shape), "op": op, "error": res.stderr.strip()[-500:]}
            found[variant] = json.loads(res.stdout.strip().splitlines()[-1])
            grads[variant] = torch.load(grads_file, weights_only=True)
    mat, tor = found["materialised"], found["altpo-torch"]
    agreement = compare_gradients(grads["altpo-torch"], grads["materialised"])
    return {
        "shape": list(shape), "op": op, "pass": "full",
        "materialised_mib": mat["peak_bytes"] / MiB,
        "altpo_torch_mib": tor["peak_bytes"] / MiB,
        "ratio": tor["peak_bytes"] / mat["peak_bytes"] if mat["peak_bytes"] else None,
        "gradients_agree": agreement["agree"],
        "gradient_agreement": agreement,
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
    c, vb = chunk_sizes(n, v, h=h, dtype=dtype, device_type=device.type)
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


BAND_SWEEP_GPU = {"tokens": (4096, 16384), "bands": (2048, 4096, 8192)}
BAND_SWEEP_QUICK = {"shape": (512, 64, 4096), "bands": (256, 512, 1024)}


def band_sweep(device: torch.device, n: int, h: int, v: int, bands, budget_s: float,
               backend: str) -> dict:
    """The backward (dH and dW) of one backend at each vocabulary band, side by side on the same
    inputs: median time, 6NHV rate, the workspace formula, and whether the results agree with the
    default band's to the dtype's rounding (a band changes only how the sums are split)."""
    from altpo_kernels.backends import backend_module
    from altpo_kernels.chunked_backward import chunk_sizes, workspace_bytes

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(11)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) * h**-0.5 * 2).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    upstream = ((torch.rand(n, generator=gen) + 0.5) / n).to(device)
    mod = backend_module(backend)
    _, lse = mod.logprobs_forward(hidden, weight, labels)
    default_band = chunk_sizes(n, v, h=h, dtype=dtype, device_type=device.type)[1]
    base = mod.logprobs_backward(hidden, weight, labels, lse, upstream, True, True)
    rows = []
    for band in dict.fromkeys([*bands, default_band]):
        def run():
            return mod.logprobs_backward(hidden, weight, labels, lse, upstream, True, True,
                                         vocab_band=band)
        dh, dw = run()
        agree = max(_rel(dh, base[0]), _rel(dw, base[1]))
        del dh, dw
        t = time_fn(run, device, budget_s=budget_s, warmup=1)
        rows.append({"vocab_band": band, "default": band == default_band, "median_ms": t["median_ms"],
                     "tflops_6nhv": 6 * n * h * v / (t["median_ms"] * 1e-3) / 1e12,
                     "workspace_mib": workspace_bytes(n, h, v, dtype, backend=backend,
                                                      device=device.type, vocab_band=band) / MiB,
                     "rel_diff_vs_default": agree})
    best = min(rows, key=lambda r: r["median_ms"])
    return {"n": n, "h": h, "v": v, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
            "default_band": default_band, "rows": rows, "best_band": best["vocab_band"],
            "best_ms": best["median_ms"], "best_workspace_mib": best["workspace_mib"],
            "default_over_best": next(r for r in rows if r["default"])["median_ms"] / best["median_ms"]}


def band_sweep_main(args) -> int:
    device = torch.device("cpu") if args.quick else pick_device(args.device)
    if args.quick:
        n, h, v = BAND_SWEEP_QUICK["shape"]
        cases, bands, backend = [(n, h, v)], BAND_SWEEP_QUICK["bands"], "torch"
    else:
        tokens = args.tokens or BAND_SWEEP_GPU["tokens"]
        cases = [(n, args.hidden, args.vocab) for n in tokens]
        bands = BAND_SWEEP_GPU["bands"]
        backend = "triton" if device.type == "cuda" else "torch"
    payload = {"benchmark": "band_sweep", "meta": run_metadata(device), "results": []}
    bad = []
    for n, h, v in cases:
        r = band_sweep(device, n, h, v, bands, 0.05 if args.quick else 0.5, backend)
        payload["results"].append(r)
        for row in r["rows"]:
            print(f"  N={n:6d} Vb={row['vocab_band']:5d}{' (default)' if row['default'] else '          '} "
                  f"{row['median_ms']:9.3f} ms {row['tflops_6nhv']:8.3g} TFLOP/s 6NHV  workspace "
                  f"{row['workspace_mib']:7.1f} MiB  diff vs default {row['rel_diff_vs_default']:.1e}")
        print(f"N={n}: best Vb={r['best_band']} ({r['best_ms']:.3f} ms, workspace "
              f"{r['best_workspace_mib']:.1f} MiB); default Vb={r['default_band']} takes "
              f"{r['default_over_best']:.3f}x the best")
        tol = 1e-5 if r["dtype"] == "float32" else 2e-2
        bad += [f"N={n} Vb={row['vocab_band']}: {row['rel_diff_vs_default']:.2e}" for row in r["rows"]
                if not row["rel_diff_vs_default"] <= tol]
        if args.out:
            write_json(args.out, payload)
    for msg in bad:
        eprint(f"[band-sweep] results differ from the default band's: {msg}")
    return 1 if bad else 0


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
    p.add_argument("--band-sweep", action="store_true",
                   help="time the backward at vocabulary bands 2048/4096/8192 (N = 4096, 16384) and "
                        "report the best with its workspace")
    p.add_argument("--calibrate", action="store_true",
                   help="only time the cuBLAS GEMMs at the chunked backward's shapes (fp32 outputs), "
                        "at each --tokens N (default 4096 16384; --quick: small CPU shapes)")
    p.add_argument("--op", default="linear_logprobs", help=argparse.SUPPRESS)
    p.add_argument("--grads-out", help=argparse.SUPPRESS)
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
            ("speedup", "x materialised", ".2f"), ("vs_trl", "x trl", ".2f"),
            ("vs_compile", "x compile", ".2f"), ("vs_static", "x compile-static", ".2f"),
            ("vs_liger", "x liger", ".2f"), ("vs_cce", "x cce", ".2f"),
            ("mem_ratio", "mem/compile", ".3f"), ("mem_trl", "mem/trl", ".3f"),
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
                         vs_static=rr.get("speedup_vs_materialised_compile_static"),
                         vs_trl=rr.get("speedup_vs_trl"), vs_cce=rr.get("speedup_vs_cce"),
                         vs_liger=rr.get("speedup_vs_liger"),
                         mem_ratio=rr.get("memory_vs_materialised_compile"),
                         mem_trl=rr.get("memory_vs_trl"),
                         status=status[:70]))
    lines.append(format_table(rows, cols))
    lines.append("TFLOP/s 6NHV: model FLOPs (forward 2NHV, backward 4NHV); 8NHV: what the fused "
                 "kernels execute (backward recomputes the logits: 6NHV). x <baseline>: baseline "
                 "time / this time. workspace: the measured peak above the inputs, for every variant "
                 "alike (the fused backends' formula is in the JSON as workspace_formula_mib).")
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
                         + _agreement_note(mr))
    return "\n".join(lines)


def _agreement_note(mr: dict) -> str:
    ga = mr.get("gradient_agreement", {})
    worst = max((ga.get(f"{g}_max_rel_err") or 0.0) for g in ("dh", "dw"))
    verdict = "agree" if mr["gradients_agree"] else "DISAGREE"
    return f"; gradients {verdict} element-wise (max rel err {worst:.1e}, tolerance {ga.get('rtol', GRAD_RTOL):g})"


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
    if args.band_sweep:
        return band_sweep_main(args)
    if args.workspace_worker:
        backend, dtype_name, n, h, v, chunk, band = args.workspace_worker.split(",")
        print(json.dumps(workspace_worker(backend, dtype_name, (int(n), int(h), int(v)), int(chunk),
                                          int(band))))
        return 0
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.op, _parse_shape(args.shape, "--shape"),
                                       args.grads_out)))
        return 0
    payload = run(args)
    print(summary(payload))
    # A wrong number fails the run; an error of a comparison library is reported in its rows
    # (and in "absent"), not allowed to fail the whole part.
    bad = [r for r in payload["results"]
           if str(r.get("check", "")).startswith("FAILED")
           or (r["status"].startswith("error") and r["variant"] in OWN_VARIANTS)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
