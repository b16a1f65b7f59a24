"""Packed against padded micro-batches: tokens/s and peak memory, and the memory planner's check.

One training micro-step (backbone forward, fused log-prob loss over every real token, backward)
on the same sequences two ways:

``packed``  one row of concatenated sequences, position ids restarting per sequence,
            ``altpo.model.packed_attention`` (flash / torch-varlen on CUDA, segment SDPA on the CPU).
``padded``  a [B, L_max] batch padded to its longest sequence with an attention mask, stock
            transformers SDPA attention (what a plain HF training loop does).

Workloads (lengths of the sequences in one micro-batch):

``tofu``  TOFU forget10/retain90 rows under the Llama-3 chat template (benchmarks/tofu_lengths.json),
          filling 4096 tokens.
``2k``    lengths uniform in [256, 2048], filling 8192 tokens (layer checkpointing on).
``8k``    lengths uniform in [1024, 8192], filling 16384 tokens (layer checkpointing on).

tokens/s counts real tokens only (the same for both ways). Peak memory: CUDA
``torch.cuda.max_memory_allocated`` above the level at the start of the step; on the CPU the
resident-set high-water mark (coarser). On CUDA, the memory planner's prediction for each packed
run (weights, gradients, activations and the largest transient workspace of
``altpo.plan.memory_plan``; no optimizer state exists in this benchmark) is set against
``max_memory_allocated`` of the whole step, gradients allocated before it starts as in gradient
accumulation.

    python -m benchmarks.packed_vs_padded --quick --out r.json     # tiny model on the CPU, < 60 s
    python -m benchmarks.packed_vs_padded --out results/packed_vs_padded.json   # a GPU: Llama-3.2-1B shape

``--quick`` divides every length by 8 (so "8k" means sequences up to 1024 tokens) and uses a
model with hidden size 64; its numbers check the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.packed_vs_padded --help")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from altpo.model.activation_checkpointing import enable_activation_checkpointing
from altpo.plan.memory_plan import NAMED_SHAPES, plan_memory, shape_from_config
from altpo.model.packed_attention import enable_packed_attention, packed_attention_kwargs, packed_position_ids
from altpo_kernels import linear_logprobs
from benchmarks.common import (
    MiB,
    PeakMemory,
    eprint,
    format_table,
    free_memory,
    pick_device,
    run_metadata,
    time_fn,
    write_json,
)
from benchmarks.tofu_lengths import load_table

# name -> (length range or None for TOFU, tokens per micro-batch, layer checkpointing)
WORKLOADS = {
    "tofu": (None, 4096, False),
    "2k": ((256, 2048), 8192, True),
    "8k": ((1024, 8192), 16384, True),
}
QUICK_SCALE = 8


def _lengths(name: str, scale: int, rng: random.Random) -> list[int]:
    spec, budget, _ = WORKLOADS[name]
    budget //= scale
    if spec is None:
        table = load_table()
        pool = [p + a for part in ("retain90", "forget10")
                for p, a in zip(table[part]["prompt"], table[part]["answer"])]
        draw = lambda: max(1, rng.choice(pool) // scale)  # noqa: E731
    else:
        lo, hi = spec[0] // scale, spec[1] // scale
        draw = lambda: rng.randint(lo, hi)  # noqa: E731
    lens = []
    while True:
        n = draw()
        if sum(lens) + n > budget:
            break
        lens.append(n)
    return lens or [budget]


def _model(device, quick: bool):
    if quick:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=2048, max_position_embeddings=16384)
        dtype = torch.float32
    else:
        s = NAMED_SHAPES["llama-3.2-1b"]
        cfg = LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                          num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                          num_key_value_heads=s.num_kv_heads, vocab_size=s.vocab_size, head_dim=s.head_dim,
                          tie_word_embeddings=s.tie_word_embeddings, max_position_embeddings=131072)
        dtype = torch.bfloat16
    cfg.use_cache = False
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.train()


def _step_fn(model, ids, lens, mode, loss_backend):
    device = ids.device
    weight = model.lm_head.weight
    if mode == "packed":
        kw = packed_attention_kwargs(lens, device)
        pos = packed_position_ids(lens, device)
        labels = torch.roll(ids, -1)

        def step():
            hidden = model.model(input_ids=ids[None], position_ids=pos[None], **kw).last_hidden_state[0]
            linear_logprobs(hidden, weight, labels, backend=loss_backend).sum().backward()
    else:
        width = max(lens)
        batch = torch.zeros(len(lens), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(lens), width, dtype=torch.long, device=device)
        start = 0
        for i, n in enumerate(lens):
            batch[i, :n] = ids[start:start + n]
            mask[i, :n] = 1
            start += n
        real = mask.bool()
        labels = torch.roll(batch, -1, dims=1)[real]

        def step():
            hidden = model.model(input_ids=batch, attention_mask=mask, use_cache=False).last_hidden_state
            linear_logprobs(hidden[real], weight, labels, backend=loss_backend).sum().backward()

    return step


def _planned_bytes(model, lens, checkpointing: bool, dtype: str) -> dict:
    """The planner's components that exist in this benchmark (no optimizer, no master weights)."""
    shape = shape_from_config(model.config)
    plan = plan_memory(shape, 1 << 50, tokens_per_microbatch=sum(lens), max_seq_len=max(lens),
                       checkpointing="layers" if checkpointing else "none", master_weights="none",
                       optimizer_in_backward=False, tokens_per_step=sum(lens), weight_dtype=dtype)
    c = plan.components
    transients = {k: v for k, v in {**c, **plan.not_at_peak}.items()
                  if k.endswith("workspace") and k != "optimizer_step_workspace"}
    parts = {"weights": c["weights"], "gradients": c["gradients"], "activations": c["activations"],
             "largest_workspace": max(transients.values())}
    parts["total"] = sum(parts.values())
    return parts


def run(args) -> dict:
    device = pick_device("cpu" if args.quick else args.device)
    if device.type == "cpu" and args.threads:
        # one thread: on a shared CPU, OpenMP workers waiting on each other turn each small SDPA
        # call from microseconds into milliseconds and the comparison into noise
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    scale = QUICK_SCALE if args.quick else 1
    model = _model(device, args.quick)
    dtype = "fp32" if args.quick else "bf16"
    packed_model = model
    backend = enable_packed_attention(packed_model, args.attention)
    padded_impl = "sdpa"
    rows = []
    for name in args.workloads:
        lens = _lengths(name, scale, rng)
        ckpt = WORKLOADS[name][2]
        ids = torch.randint(0, model.config.vocab_size, (sum(lens),), device=device)
        for mode in ("packed", "padded"):
            model.set_attn_implementation(padded_impl) if mode == "padded" else enable_packed_attention(model, backend)
            enable_activation_checkpointing(model, "layers" if ckpt else "none")
            step = _step_fn(model, ids, lens, mode, args.loss_backend)
            row = {"workload": name, "mode": mode, "sequences": len(lens), "tokens": sum(lens),
                   "max_len": max(lens), "padded_positions": len(lens) * max(lens) if mode == "padded" else sum(lens),
                   "checkpointing": ckpt}
            try:
                step()  # warm-up, and gradients allocated as in accumulation
                model.zero_grad(set_to_none=False)
                with PeakMemory(device) as peak:
                    step()
                if device.type == "cuda":
                    row["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MiB
                timing = time_fn(step, device, setup=lambda: model.zero_grad(set_to_none=False),
                                 warmup=0, min_reps=2, max_reps=20, budget_s=args.budget_s)
                row["ms"] = timing["median_ms"]
                row["tokens_per_s"] = sum(lens) / (timing["median_ms"] / 1e3)
                row["peak_mib"] = None if peak.peak_bytes is None else peak.peak_bytes / MiB
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            if mode == "packed":
                planned = _planned_bytes(model, lens, ckpt, dtype)
                row["planned_mib"] = planned["total"] / MiB
                row["planned_parts_mib"] = {k: v / MiB for k, v in planned.items()}
                if "max_memory_allocated_mib" in row:
                    row["planned_over_measured"] = row["planned_mib"] / row["max_memory_allocated_mib"]
            model.zero_grad(set_to_none=True)
            free_memory(device)
            rows.append(row)
            eprint(f"{name:>5} {mode:>6}: {row.get('tokens_per_s', 0):,.0f} tokens/s, "
                   f"peak {row.get('peak_mib') or 0:.1f} MiB {row.get('error', '')}")
    for name in args.workloads:
        pk, pd = (next(r for r in rows if r["workload"] == name and r["mode"] == m) for m in ("packed", "padded"))
        if pk.get("tokens_per_s") and pd.get("tokens_per_s"):
            pk["speedup_vs_padded"] = pk["tokens_per_s"] / pd["tokens_per_s"]
        if pk.get("peak_mib") and pd.get("peak_mib"):
            pk["memory_vs_padded"] = pk["peak_mib"] / pd["peak_mib"]
    return {"benchmark": "packed_vs_padded", "meta": run_metadata(device), "quick": args.quick,
            "length_scale": 1 / scale, "attention_backend": backend, "padded_attention": padded_impl,
            "model": "tiny (hidden 64, 2 layers)" if args.quick else "llama-3.2-1b shape, random weights, bf16",
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU, lengths / 8 (< 60 s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--attention", default="auto", choices=("auto", "flash", "torch-varlen", "sdpa"),
                        help="packed attention backend (default auto)")
    parser.add_argument("--loss-backend", default="auto", help="altpo_kernels backend for the loss (default auto)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS),
                        help="which workloads to run (default all)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch on the CPU (default 1; 0 keeps torch's default)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 0.3 if args.quick else 2.0
    result = run(args)
    print(format_table(result["rows"], [
        ("workload", "workload", ""), ("mode", "mode", ""), ("sequences", "seqs", "d"),
        ("tokens", "tokens", "d"), ("padded_positions", "positions", "d"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("peak_mib", "peak MiB", ".1f"), ("speedup_vs_padded", "speed x", ".2f"),
        ("memory_vs_padded", "mem x", ".2f"), ("planned_mib", "planned MiB", ".1f"),
        ("max_memory_allocated_mib", "measured MiB", ".1f"),
    ]))
    if args.out:
        write_json(args.out, result)
    failed = failures(result["rows"])
    for msg in failed:
        print(f"packed_vs_padded: FAILED: {msg}", file=sys.stderr)
    return 1 if failed else 0


def failures(rows: list[dict]) -> list[str]:
    """A row that did not measure (an error, out of memory, no timing) fails the run."""
    return [f"{r['workload']} {r['mode']}: {r.get('error', 'no measurement')}"
            for r in rows if r.get("error") or not r.get("tokens_per_s")]


if __name__ == "__main__":
    sys.exit(main())
