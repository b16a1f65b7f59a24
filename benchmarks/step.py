"""Step benchmark: one AltPO optimizer step, altpo-fast against the recipes users would run instead.

The workload is one step of the seed run (docs/design.md section 2) on a Llama-3.2-1B-shaped model
built from a ``LlamaConfig`` with random weights (nothing is downloaded): 32 forget rows, each an
(alternate, true answer) pair, and 32 retain rows, with TOFU's token lengths under the Llama-3
chat template (``benchmarks/tofu_lengths.json``, measured by ``benchmarks/tofu_lengths.py``; token
ids are random, only the lengths matter for speed). Three ways of computing the same step run side
by side in one process:

``altpo-fast``
    The project's trainer step, ``altpo.train.step.altpo_step``: packed micro-batches (no
    padding, each forget answer once however many of its alternates the step has), the fused
    loss (no logits), reference log-probs precomputed once for the data, fp32 master weights.
``open-unlearning``
    open-unlearning's published AltPO recipe written out here: HF forward with labels returning
    full logits, per-sequence NLL from those logits, a resident reference model, five forward
    passes per micro-batch (policy and reference on alternates and answers, policy on retain),
    padded micro-batches of 8 with gradient accumulation 4, bf16 weights, AdamW on them.
    (Its configs ask for flash-attention 2 and bitsandbytes' paged 32-bit AdamW; without those
    packages this uses SDPA with the padding mask and torch's AdamW, whose bf16 states understate
    its optimizer memory by 4 bytes per parameter.)
``trl-style``
    TRL's DPO trainer with ``precompute_ref_log_probs``: reference log-probs computed in a pass
    over the data before training; alternates and answers concatenated into one padded forward
    with full logits and a row-by-row log-softmax, the retain rows in a second forward; the same
    micro-batches, bf16 weights and AdamW.

Reported per variant: median step time, workload tokens per second (the real tokens of the
step's 96 sequences, the same count for every variant), MFU = the FLOPs each recipe executes per
step (6 x parameters per policy token it runs, padding included, plus 2 x parameters per
reference-model token it runs inside the step) over step time and the dense matmul rate measured
in the same run, peak memory, and the ratios against altpo-fast; also
the seed run's estimate: 310 steps plus whatever reference pass the variant needs (altpo-fast:
every alternate and forget answer once, packed; trl-style: every (alternate, answer) row,
padded; open-unlearning: none, its reference runs inside every step).

    python -m benchmarks.step --quick --out s.json     # tiny model on the CPU, seconds
    python -m benchmarks.step --out results/step.json  # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.step --help")

import torch
import torch.nn.functional as F

from benchmarks.common import (
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    MiB,
    PeakMemory,
    eprint,
    format_table,
    free_memory,
    matmul_tflops,
    pick_device,
    run_metadata,
    synchronize,
    time_fn,
    write_json,
)
from benchmarks.tofu_lengths import TABLE_PATH, load_table, measure

VARIANTS = ("altpo-fast", "open-unlearning", "trl-style")
SEED_STEPS = 310
BETA, ALPHA, GAMMA, LR = 0.5, 2.0, 1.0, 1e-5
FORGET_ROWS = RETAIN_ROWS = 32
MICRO_BATCH, ACCUMULATION = 8, 4

# meta-llama/Llama-3.2-1B-Instruct's config (public), minus the weights.
LLAMA_3_2_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
)
# --quick: the same architecture, tiny.
# The vocabulary stays large next to the hidden size, so logits weigh in memory as they do at 1B.
TINY_LLAMA = dict(LLAMA_3_2_1B, vocab_size=8192, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  rope_scaling=dict(LLAMA_3_2_1B["rope_scaling"], original_max_position_embeddings=1024))


# ----------------------------------------------------------------------------------------------
# the workload: lengths from TOFU, random token ids


def _seq(gen: torch.Generator, vocab: int, prompt_ids: list[int], answer_len: int):
    answer = torch.randint(4, vocab, (answer_len,), generator=gen).tolist()
    ids = prompt_ids + answer
    return ids, [-100] * len(prompt_ids) + answer


class Workload:
    """One step's sequences: 32 (alternate, forget answer) pairs and 32 retain rows.

    Sequences are ``(input_ids, labels)`` with unshifted labels, -100 on the prompt.
    """

    def __init__(self, table: dict, vocab: int, *, seed: int = 0, length_scale: float = 1.0):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)

        def scaled(n: int) -> int:
            return max(2, round(n * length_scale))

        self.length_scale = length_scale
        forget_t, alt_t, retain_t = table["forget10"], table["alternates"], table["retain90"]
        alt_rows = rng.sample(range(len(alt_t["answer"])), FORGET_ROWS)
        # drawn order, as the padded recipes' data loader serves rows (altpo-fast groups by question)
        retain_rows = rng.sample(range(len(retain_t["answer"])), RETAIN_ROWS)

        self.forget: dict[int, tuple[list[int], list[int]]] = {}
        self.prompts: dict[int, list[int]] = {}
        self.pairs: list[tuple[int, tuple[list[int], list[int]]]] = []
        for r in alt_rows:
            q = alt_t["question_index"][r]
            if q not in self.prompts:
                self.prompts[q] = torch.randint(4, vocab, (scaled(forget_t["prompt"][q]),), generator=gen).tolist()
                self.forget[q] = _seq(gen, vocab, self.prompts[q], scaled(forget_t["answer"][q]))
            self.pairs.append((q, _seq(gen, vocab, self.prompts[q], scaled(alt_t["answer"][r]))))
        self.retain = []
        for r in retain_rows:
            prompt = torch.randint(4, vocab, (scaled(retain_t["prompt"][r]),), generator=gen).tolist()
            self.retain.append(_seq(gen, vocab, prompt, scaled(retain_t["answer"][r])))

        # Whole-run token counts for the reference passes (seed run: forget10 x 5 alternates).
        n_q = len(forget_t["answer"])
        self.all_forget_tokens = sum(scaled(forget_t["prompt"][q]) + scaled(forget_t["answer"][q])
                                     for q in range(n_q))
        self.all_alternate_tokens = sum(scaled(forget_t["prompt"][q]) + scaled(a)
                                        for q, a in zip(alt_t["question_index"], alt_t["answer"]))
        self.all_alternate_rows = len(alt_t["answer"])

    @property
    def workload_tokens(self) -> int:
        """Real tokens of the step's 96 sequences (answers counted once per pair)."""
        return (sum(len(a[0]) + len(self.forget[q][0]) for q, a in self.pairs)
                + sum(len(s[0]) for s in self.retain))

    def micro_batches(self):
        """The padded recipes' micro-batches: (alternates, forget answers, retain rows) x 4."""
        for k in range(ACCUMULATION):
            sl = slice(k * MICRO_BATCH, (k + 1) * MICRO_BATCH)
            pairs = self.pairs[sl]
            yield ([a for _, a in pairs], [self.forget[q] for q, _ in pairs], self.retain[sl])

    def describe(self) -> dict:
        lens = [len(a[0]) for _, a in self.pairs] + [len(s[0]) for s in self.forget.values()] \
            + [len(s[0]) for s in self.retain]
        return {"forget_rows": len(self.pairs), "retain_rows": len(self.retain),
                "distinct_forget_questions": len(self.forget), "length_scale": self.length_scale,
                "workload_tokens": self.workload_tokens, "mean_sequence_tokens": sum(lens) / len(lens),
                "max_sequence_tokens": max(lens)}


def pad_batch(seqs, pad_id: int, device) -> dict:
    """Right-padded HF inputs: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(y)] = torch.tensor(y)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ----------------------------------------------------------------------------------------------
# models


def build_model(config_kwargs: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised LlamaForCausalLM on ``device`` in ``dtype``, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.train()
    return model


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head counts once


# ----------------------------------------------------------------------------------------------
# the recipes; each returns (step function, reference-pass info)


def sequence_nll(model, batch: dict):
    """open-unlearning's per-sequence NLL: HF forward with labels, then CE over the full logits."""
    outputs = model(**batch)
    logits = outputs.logits[..., :-1, :].contiguous()
    labels = batch["labels"][..., 1:].contiguous()
    nll = F.cross_entropy(logits.transpose(-1, -2), labels, ignore_index=-100, reduction="none")
    return nll.sum(-1)


def open_unlearning_recipe(model, work: Workload, device, pad_id: int):
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    batches = [tuple(pad_batch(s, pad_id, device) for s in mb) for mb in work.micro_batches()]

    def step():
        for win, lose, retain in batches:
            win_nll = sequence_nll(model, win)
            with torch.no_grad():
                win_ref = sequence_nll(ref, win)
            lose_nll = sequence_nll(model, lose)
            with torch.no_grad():
                lose_ref = sequence_nll(ref, lose)
            delta = -(win_nll - win_ref) + (lose_nll - lose_ref)
            forget = -(2.0 / BETA) * F.logsigmoid(BETA * delta).mean()
            retain_loss = model(**retain).loss
            ((GAMMA * forget + ALPHA * retain_loss) / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, None, {"reference": "resident copy, two no-grad forwards per micro-batch",
                        "padded_policy_tokens": sum(b["input_ids"].numel() for mb in batches for b in mb),
                        "reference_forward_tokens": sum(b["input_ids"].numel() for mb in batches
                                                        for b in mb[:2])}


def selective_logps(logits, labels):
    """TRL-style per-token log-probs: one row at a time in the logits' dtype (saves memory)."""
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        logp = F.log_softmax(row_logits, dim=-1)
        rows.append(logp.gather(-1, row_labels.clamp(min=0)[:, None]).squeeze(-1))
    return torch.stack(rows)


def concatenated_logps(model, batch: dict):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    per_token = selective_logps(logits[:, :-1], labels)
    return (per_token.float() * (labels != -100)).sum(-1)


def trl_style_recipe(model, work: Workload, device, pad_id: int):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    batches = []
    for wins, loses, retain in work.micro_batches():
        batches.append((pad_batch(wins + loses, pad_id, device), pad_batch(retain, pad_id, device)))

    # the precompute pass, run here on the step's rows: timed to estimate the whole data's
    model.eval()
    with torch.no_grad():
        concatenated_logps(model, batches[0][0])  # warm-up, as altpo-fast's pass gets one
    synchronize(device)
    t0 = time.perf_counter()
    refs = []
    with torch.no_grad():
        for pair_batch, _ in batches:
            refs.append(concatenated_logps(model, pair_batch))
    synchronize(device)
    ref_s = time.perf_counter() - t0
    model.train()

    def step():
        for (pair_batch, retain), ref in zip(batches, refs):
            logps = concatenated_logps(model, pair_batch)
            b = logps.shape[0] // 2
            delta = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
            forget = -(2.0 / BETA) * F.logsigmoid(BETA * delta).mean()
            retain_loss = model(**retain).loss
            ((GAMMA * forget + ALPHA * retain_loss) / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = len(work.pairs)
    ref_info = {"measured_s": ref_s, "measured_rows": rows,
                "seed_run_s": ref_s / rows * work.all_alternate_rows,
                "how": "padded no-grad forwards of (alternate, answer) rows, scaled to all rows"}
    return step, ref_info, {"reference": "precomputed before training (TRL precompute_ref_log_probs)",
                            "padded_policy_tokens": sum(b[k]["input_ids"].numel() for b in batches for k in range(2))}


def altpo_fast_recipe(model, work: Workload, device, args, attention: str = "auto",
                      loss_backend: str = "auto"):
    from altpo.train.master_weights import MixedPrecisionAdamW
    from altpo.model.packed_attention import enable_packed_attention
    from altpo.data.packing import ROLE_ALTERNATE, ROLE_FORGET, ROLE_RETAIN, PackUnit
    from altpo.train.step import PackedAltPOLoss, altpo_step, sequence_logprobs

    attention = enable_packed_attention(model, backend=attention)
    budget = args.tokens_per_microbatch

    # the reference pass: each forget answer and each alternate of the step once, packed, no grad
    questions = list(work.forget)
    ref_seqs = [work.forget[q] for q in questions] + [a for _, a in work.pairs]
    model.eval()
    sequence_logprobs(model, ref_seqs[:2], tokens_per_microbatch=budget, device=device,
                      loss_backend=loss_backend)  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    ref = sequence_logprobs(model, ref_seqs, tokens_per_microbatch=budget, device=device,
                            loss_backend=loss_backend).tolist()
    synchronize(device)
    ref_s = time.perf_counter() - t0
    model.train()
    ref_forget = dict(zip(questions, ref[: len(questions)]))
    ref_alt = ref[len(questions):]

    units, by_q = [], {}
    for i, (q, alt) in enumerate(work.pairs):
        by_q.setdefault(q, []).append(i)
    for q, idx in by_q.items():
        seqs = [work.forget[q]] + [work.pairs[i][1] for i in idx]
        units.append(PackUnit(seqs, [ROLE_FORGET] + [ROLE_ALTERNATE] * len(idx),
                              pairs=[(k + 1, 0) for k in range(len(idx))],
                              ref_logps=[(ref_alt[i], ref_forget[q]) for i in idx], key=q))
    for r, seq in enumerate(work.retain):
        units.append(PackUnit([seq], [ROLE_RETAIN], retain=[0], key=("retain", r)))

    loss_module = PackedAltPOLoss(model, beta=BETA, alpha=ALPHA, gamma=GAMMA, loss_backend=loss_backend)
    opt = MixedPrecisionAdamW(model.named_parameters(), lr=LR, weight_decay=0.01,
                              master_weights=args.master_weights)

    def step():
        altpo_step(loss_module, opt, units, tokens_per_microbatch=budget, lr=LR, max_grad_norm=1.0,
                   device=device)

    ref_tokens = sum(len(s[0]) for s in ref_seqs)
    ref_info = {"measured_s": ref_s, "measured_tokens": ref_tokens,
                "seed_run_s": ref_s / ref_tokens * (work.all_forget_tokens + work.all_alternate_tokens),
                "how": "packed no-grad forward + fused log-probs of every forget answer and "
                       "alternate once, scaled by tokens to the whole forget10 x 5 data"}
    packed_tokens = sum(u.num_tokens for u in units)
    return step, ref_info, {"reference": "precomputed once (cached log-probs)", "attention": attention,
                            "loss_backend": loss_backend,
                            "master_weights": opt.mode, "tokens_per_microbatch": budget,
                            "packed_policy_tokens": packed_tokens}


# ----------------------------------------------------------------------------------------------
# driver


# Every recipe gets the same number of attempts: a failed attempt is recorded (``fallback_errors``)
# and the next one measured, rather than losing the row. altpo-fast's later attempts take its
# plainer paths (SDPA attention, then the torch loss); the baselines have one path each, so theirs
# rerun it after freeing memory (which is what a transient failure needs).
ATTEMPTS = 3


def run_variant(name: str, args, work: Workload, device, dtype, model_cfg: dict, matmul: dict) -> dict:
    """One recipe, up to ``ATTEMPTS`` tries, the same for every recipe."""
    if name == "altpo-fast":
        attempts = [(args.attention, args.loss_backend), ("sdpa", args.loss_backend), ("sdpa", "torch")]
    else:
        attempts = [("auto", "auto")] * ATTEMPTS
    errors = []
    for attention, loss_backend in attempts[:ATTEMPTS]:
        row = _run_variant(name, args, work, device, dtype, model_cfg, matmul,
                           attention=attention, loss_backend=loss_backend)
        if row["status"] == "ok" or row["status"] == "out of memory":
            break
        errors.append(f"attention={attention} loss={loss_backend}: {row['status']}")
    row["attempts"] = len(errors) + (1 if row["status"] in ("ok", "out of memory") else 0)
    if errors:
        row["fallback_errors"] = errors
    return row


def _run_variant(name: str, args, work: Workload, device, dtype, model_cfg: dict, matmul: dict,
                 attention: str = "auto", loss_backend: str = "auto") -> dict:
    row = {"variant": name, "status": "ok"}
    free_memory(device)
    try:
        with PeakMemory(device) as mem:
            model = build_model(model_cfg, device, dtype)
            params = param_count(model)
            if name == "altpo-fast":
                step, ref_info, info = altpo_fast_recipe(model, work, device, args, attention, loss_backend)
            elif name == "open-unlearning":
                step, ref_info, info = open_unlearning_recipe(model, work, device, model_cfg["pad_token_id"])
            else:
                step, ref_info, info = trl_style_recipe(model, work, device, model_cfg["pad_token_id"])
            timing = time_fn(step, device, warmup=args.warmup, min_reps=args.steps,
                             max_reps=args.steps, budget_s=0.0)
        step_s = timing["median_ms"] / 1e3
        tokens_per_s = work.workload_tokens / step_s
        ref_s = ref_info["seed_run_s"] if ref_info else 0.0
        row.update(info)
        # MFU counts what ran: every policy token (padding included) forward and backward
        # (6 x params each), every reference-model token inside the step forward only (2 x params)
        executed = info.get("packed_policy_tokens", info.get("padded_policy_tokens", 0))
        executed_flops = 6 * params * executed + 2 * params * info.get("reference_forward_tokens", 0)
        row.update({
            "step_s": step_s, "step_min_s": timing["min_ms"] / 1e3, "steps_timed": timing["reps"],
            "tokens_per_s": tokens_per_s, "params": params,
            "executed_policy_tokens": executed,
            "executed_flops_per_step": executed_flops,
            "mfu": executed_flops / step_s / (matmul["tflops"] * 1e12),
            "peak_gib": None if mem.peak_bytes is None else mem.peak_bytes / (1024 * MiB),
            "reference_pass": ref_info,
            "seed_run_estimate_s": SEED_STEPS * step_s + ref_s,
        })
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as err:  # one broken recipe must not lose the others' numbers
        import traceback

        row["status"] = f"error: {type(err).__name__}: {err}"[:400]
        row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        model = step = None  # noqa: F841 - drop every reference before the next variant
        free_memory(device)
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each baseline against altpo-fast: how much slower, how much more memory, whole-run time."""
    fast = next((r for r in rows if r["variant"] == "altpo-fast" and r["status"] == "ok"), None)
    ratios = []
    for r in rows:
        if r["variant"] == "altpo-fast" or r["status"] != "ok" or fast is None:
            continue
        ratios.append({
            "baseline": r["variant"],
            "step_time_vs_altpo_fast": r["step_s"] / fast["step_s"],
            "peak_memory_vs_altpo_fast": (r["peak_gib"] / fast["peak_gib"]
                                          if r.get("peak_gib") and fast.get("peak_gib") else None),
            "seed_run_vs_altpo_fast": r["seed_run_estimate_s"] / fast["seed_run_estimate_s"],
        })
    return ratios


def _without_out(argv: list[str]) -> list[str]:
    """The command line minus ``--out FILE`` (workers print their row instead)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny Llama on the CPU with quarter-length sequences (seconds)")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which recipes to run (default: all three)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant; the median is reported (default 3; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator)")
    p.add_argument("--tokens-per-microbatch", type=int, default=None,
                   help="altpo-fast's packed micro-batch budget (default 16384; 512 with --quick)")
    p.add_argument("--master-weights", default="fp32", choices=("fp32", "kahan", "none"),
                   help="altpo-fast's exact-update mode for bf16 weights (default fp32)")
    p.add_argument("--loss-backend", default="auto", help="altpo_kernels backend for altpo-fast (default auto)")
    p.add_argument("--attention", default="auto", choices=("auto", "flash", "torch-varlen", "sdpa"),
                   help="altpo-fast's packed attention backend (default auto)")
    p.add_argument("--lengths", type=Path, default=TABLE_PATH,
                   help="length table (default: the committed benchmarks/tofu_lengths.json)")
    p.add_argument("--tokenizer", help="measure lengths afresh from --tofu with this Llama-3 tokenizer "
                                       "(tokenizer.json, folder or hub name) instead of the table")
    p.add_argument("--tofu", type=Path, help="a whole TOFU folder (JSON Lines) for --tokenizer")
    p.add_argument("--seed", type=int, default=0, help="which rows the step draws")
    p.add_argument("--worker-variant", help=argparse.SUPPRESS)
    p.add_argument("--worker-matmul-tflops", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokenizer and args.tofu is None:
        p.error("--tokenizer measures lengths from a whole TOFU folder: pass --tofu DIR too")
    if args.steps is None:
        args.steps = 5 if args.quick else 3
    if args.tokens_per_microbatch is None:
        args.tokens_per_microbatch = 512 if args.quick else 16384
    for flag in ("steps", "tokens_per_microbatch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def _import_everything() -> None:
    """Load every module the recipes use, so no variant's memory counts a first import."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    import altpo.train.master_weights  # noqa: F401
    import altpo.model.packed_attention  # noqa: F401
    import altpo.train.step  # noqa: F401


def run_in_subprocess(name: str, argv: list[str], matmul: dict) -> dict:
    """CPU: one fresh process per variant, so resident-memory peaks do not share a heap."""
    import json
    import subprocess

    from benchmarks.common import REPO_ROOT

    cmd = [sys.executable, "-m", "benchmarks.step", *argv, "--worker-variant", name,
           "--worker-matmul-tflops", repr(matmul["tflops"])]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0 or not res.stdout.strip():
        return {"variant": name, "status": f"error: worker exited {res.returncode}",
                "traceback": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(args, argv: list[str] | None = None) -> dict:
    device = torch.device("cpu") if args.quick else pick_device(args.device)
    dtype = torch.float32 if args.quick or device.type == "cpu" else torch.bfloat16
    model_cfg = TINY_LLAMA if args.quick else LLAMA_3_2_1B
    if args.tokenizer:
        table, source = measure(args.tofu, args.tokenizer), f"measured from {args.tofu}"
    else:
        table, source = load_table(args.lengths), f"table {args.lengths.name}"
    work = Workload(table, model_cfg["vocab_size"], seed=args.seed,
                    length_scale=0.25 if args.quick else 1.0)
    _import_everything()
    if args.worker_variant:
        row = run_variant(args.worker_variant, args, work, device, dtype, model_cfg,
                          {"tflops": args.worker_matmul_tflops})
        return {"worker_row": row}
    meta = run_metadata(device)
    eprint(f"[step] {meta['card']}: {work.describe()}")
    matmul = matmul_tflops(device, dtype, size=None if device.type == "cuda" else 512,
                           budget_s=1.0 if device.type == "cuda" else 0.2)
    eprint(f"[step] measured {matmul['dtype']} matmul rate: {matmul['tflops']:.3g} TFLOP/s")
    payload = {
        "benchmark": "step", "quick": bool(args.quick), "meta": meta, "matmul": matmul,
        "model": {k: v for k, v in model_cfg.items() if k != "rope_scaling"},
        "dtype": str(dtype).replace("torch.", ""), "lengths": source, "workload": work.describe(),
        "seed_run_steps": SEED_STEPS,
        "mfu_definition": "(6 x parameters x policy tokens executed (padding included) + 2 x "
                          "parameters x reference-model tokens run inside the step) / step time / "
                          "measured dense matmul rate",
        "memory_method": (CUDA_MEMORY_METHOD + ", all variants in one process, each after the "
                          "previous one's memory is freed") if device.type == "cuda" else
                         ("each variant in a fresh process; " + CPU_MEMORY_METHOD),
        "rows": [], "ratios": [],
    }
    for name in args.variants:
        eprint(f"[step] {name}")
        if device.type == "cuda":
            row = run_variant(name, args, work, device, dtype, model_cfg, matmul)
        else:
            row = run_in_subprocess(name, argv if argv is not None else sys.argv[1:], matmul)
        payload["rows"].append(row)
        payload["ratios"] = add_ratios(payload["rows"])
        if args.out:
            write_json(args.out, payload)
    return payload


def _status(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    if row.get("fallback_errors"):
        return f"ok after fallback to attention {row.get('attention')}, loss {row.get('loss_backend')}"
    return ""


def summary(payload: dict) -> str:
    m = payload["matmul"]
    head = (f"AltPO step on {payload['meta']['card']} (commit {payload['meta']['commit']}), "
            f"{payload['dtype']}, {payload['workload']['workload_tokens']} workload tokens; "
            f"{m['dtype']} matmul {m['tflops']:.3g} TFLOP/s")
    if payload["quick"]:
        head += "\n[CPU --quick: tiny model, quarter-length sequences; not a performance claim]"
    rows = []
    for r in payload["rows"]:
        rows.append(dict(r, ref_s=(r.get("reference_pass") or {}).get("seed_run_s"),
                         run_min=None if r.get("seed_run_estimate_s") is None else r["seed_run_estimate_s"] / 60,
                         status=_status(r)[:60]))
    cols = [("variant", "variant", ""), ("step_s", "step s", ".3g"), ("tokens_per_s", "tokens/s", ".4g"),
            ("mfu", "MFU", ".3f"), ("peak_gib", "peak GiB", ".3g"), ("ref_s", "ref pass s", ".3g"),
            ("run_min", "seed run min", ".3g"), ("status", "status", "")]
    lines = [head, format_table(rows, cols)]
    for r in payload["ratios"]:
        mem = r["peak_memory_vs_altpo_fast"]
        lines.append(f"{r['baseline']}: {r['step_time_vs_altpo_fast']:.2f}x altpo-fast's step time, "
                     f"{'-' if mem is None else f'{mem:.2f}x'} its peak memory, "
                     f"{r['seed_run_vs_altpo_fast']:.2f}x its seed-run time")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker_variant:
        import json

        print(json.dumps(run(args)["worker_row"], default=str))
        return 0
    payload = run(args, _without_out(argv))
    print(summary(payload))
    return 0 if all(r["status"] == "ok" for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
