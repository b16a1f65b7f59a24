"""The numbers of docs/open-unlearning.md: what each open-unlearning compatibility flag changes, on a
tiny TOFU model made on the spot, and the published full-model log's MIA AUCs recomputed.

    python -m benchmarks.open_unlearning_parity --data fixtures/tofu [--rows 20] [--steps 10]

Runs on a CPU in a few minutes. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.open_unlearning_parity --help")

import torch  # noqa: E402

FULL_LOG = "eval_logs/tofu_Llama-3.2-1B-Instruct_full/evals_forget10/TOFU_EVAL.json"
ALTERNATES = "alternates/llama2-7b/forget01/alt5_seed_0.json"
SHOWN = ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "retain_Q_A_Prob", "retain_Q_A_ROUGE",
         "retain_Truth_Ratio", "mia_loss", "mia_min_k", "mia_gradnorm", "extraction_strength")


def published_aucs(data: Path) -> None:
    from altpo.eval import metrics as M

    log = json.loads((data / FULL_LOG).read_text())
    print("| attack | published auc | recomputed from its rows | difference | with -score (old gradnorm sign) |")
    print("|---|---|---|---|---|")
    for attack in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm", "mia_reference"):
        rows = {s: [v["score"] for v in log[attack][s]["value_by_index"].values()] for s in ("forget", "holdout")}
        auc = M.mia_auc(rows["forget"], rows["holdout"])
        flipped = M.mia_auc([-x for x in rows["forget"]], [-x for x in rows["holdout"]])
        print(f"| {attack} | {log[attack]['auc']:.10f} | {auc:.10f} | {abs(auc - log[attack]['auc']):.1e} | "
              f"{flipped:.10f} |")


def tiny_model(data: Path, folder: Path, epochs: int) -> None:
    from altpo.data.tofu import load_alternates, load_tofu_split, texts_for_tokenizer
    from altpo.model.tiny_finetune import finetune_qa
    from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

    forget = load_tofu_split(data, "forget01")
    retain = load_tofu_split(data, "retain99")[:60]
    texts = texts_for_tokenizer(forget + retain, load_alternates(data / ALTERNATES, forget))
    for split in ("forget01_perturbed", "retain_perturbed", "holdout01"):
        for row in load_tofu_split(data, split, fields=("question", "answer")):
            texts += [v for v in row.values() if isinstance(v, str)] + list(row.get("perturbed_answer", []))
    tok = build_tiny_tokenizer(texts, vocab_size=1024)
    model = build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    finetune_qa(model, tok, forget + retain, epochs=epochs, batch_size=16, lr=3e-3)
    save_tiny_model(model, tok, folder)


def eval_numerics(data: Path, folder: Path, rows: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from altpo.eval.tofu import evaluate_tofu

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    tok.pad_token = tok.eos_token  # open-unlearning's setting for Llama-3 tokenizers (no pad token)
    out = {}
    for numerics in ("altpo-fast", "open-unlearning"):
        t0 = time.perf_counter()
        out[numerics] = evaluate_tofu(model, tok, data, "forget01", splits=("forget", "retain", "mia", "gradnorm",
                                                                             "memorization"),
                                      max_rows=rows, progress=False, verbose=False, numerics=numerics,
                                      batch_size=16, max_new_tokens=64)
        print(f"<!-- eval {numerics}: {time.perf_counter() - t0:.0f} s -->")
    print("| metric | --numerics altpo-fast | --numerics open-unlearning | relative change |")
    print("|---|---|---|---|")
    for name in SHOWN:
        a, b = out["altpo-fast"].get(name), out["open-unlearning"].get(name)
        if a is None or b is None:
            continue
        rel = abs(b - a) / abs(a) if a else float("inf")
        print(f"| {name} | {a:.4f} | {b:.4f} | {100 * rel:.1f}% |")


def train_numerics(data: Path, folder: Path, steps: int, work: Path) -> None:
    from altpo.data.step_sampling import StepSampler
    from altpo.data.packing import forget_units, pack_micro_batches, retain_units
    from altpo.data.tofu import build_altpo_data, load_alternates, load_tofu_split
    from altpo.model.packed_attention import enable_packed_attention
    from altpo.train import train
    from altpo.train.config import TrainConfig
    from altpo.train.numerics import grouped_forward_backward, grouped_micro_batches
    from altpo.train.step import PackedAltPOLoss, forward_backward, sequence_logprobs, step_normalisers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    forget = load_tofu_split(data, "forget01")
    alts = load_alternates(data / ALTERNATES, forget)
    d = build_altpo_data(tok, forget, alts, load_tofu_split(data, "retain99")[:60])

    def one_step(numerics):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        enable_packed_attention(model, "sdpa")
        ref_alt = sequence_logprobs(model, [(a.input_ids, a.labels) for a in d.alternates], tokens_per_microbatch=4096)
        ref_fgt = sequence_logprobs(model, [(f.input_ids, f.labels) for f in d.forget], tokens_per_microbatch=4096)
        torch.manual_seed(1)  # the same perturbation in both modes
        with torch.no_grad():  # one small update, so the pairs have a Delta
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        module = PackedAltPOLoss(model, beta=0.5, alpha=2.0, loss_backend="torch")
        rows = StepSampler(d.num_pairs, len(d.retain), 32, 0, None if numerics == "open-unlearning"
                           else d.pair_question).rows(0)
        if numerics == "open-unlearning":
            items = grouped_micro_batches(d, rows.pairs, rows.retain, per_device_batch_size=8, num_groups=4,
                                          tokens_per_microbatch=4096, alpha=2.0, ref_alternates=ref_alt,
                                          ref_forget=ref_fgt)
            stats = grouped_forward_backward(module, items)
        else:
            units = forget_units(d, rows.pairs, ref_alt, ref_fgt) + retain_units(d, rows.retain)
            pairs, retain = step_normalisers(units)
            stats = forward_backward(module, pack_micro_batches(units, 4096), num_pairs=pairs, num_retain_tokens=retain)
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        return stats.loss, grad

    loss_a, grad_a = one_step("altpo-fast")
    loss_b, grad_b = one_step("open-unlearning")
    print("| one step (batch 32 = 4 loader micro-batches of 8) | value |")
    print("|---|---|")
    print(f"| loss, altpo-fast | {loss_a:.6f} |")
    print(f"| loss, open-unlearning | {loss_b:.6f} |")
    print(f"| loss relative difference | {abs(loss_b - loss_a) / abs(loss_a):.2e} |")
    print(f"| gradient relative difference (L2) | {float((grad_b - grad_a).norm() / grad_a.norm()):.2e} |")

    base = dict(model=str(folder), data=str(data), forget_split="forget01", retain_split="retain99",
                alternates=str(data / ALTERNATES), max_retain_rows=60, batch_size=32, max_steps=steps, lr=1e-3,
                warmup_epochs=0.0, tokens_per_microbatch="4096", quiet=True, loss_backend="torch", attention="sdpa",
                device="cpu", eval_every_epoch="forget", eval_max_rows=20)
    print(f"| after {steps} steps | altpo-fast | open-unlearning |")
    print("|---|---|---|")
    results = {}
    for numerics in ("altpo-fast", "open-unlearning"):
        r = train(TrainConfig(**base, output=str(work / numerics), numerics=numerics))
        summary = json.loads(sorted((work / numerics / "evals").glob("epoch-*/TOFU_SUMMARY.json"))[-1].read_text())
        results[numerics] = (r.history[-1]["loss"], summary)
    print(f"| last step loss | {results['altpo-fast'][0]:.4f} | {results['open-unlearning'][0]:.4f} |")
    for name in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio"):
        print(f"| {name} (last epoch) | {results['altpo-fast'][1][name]:.4f} | "
              f"{results['open-unlearning'][1][name]:.4f} |")


def prompts(data: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    from altpo.data.tofu import ChatFormat, load_tofu_split
    from altpo.eval import open_unlearning_prompt as OU
    from altpo.eval.alternates import ALTERNATE_PROMPT
    from altpo.eval.tofu import encode_prompt

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    row = load_tofu_split(data, "forget01")[0]
    ours = encode_prompt(tok, ALTERNATE_PROMPT.format(question=row["question"], answer=row["answer"]), ChatFormat())
    theirs = OU.prompt_ids(tok, row["question"], row["answer"])
    print("| --prompt | prompt tokens (first forget01 row, tiny tokenizer) | begins with |")
    print("|---|---|---|")
    print(f"| altpo-fast | {len(ours)} | {tok.decode(ours[:8])!r} |")
    print(f"| open-unlearning | {len(theirs)} | {tok.decode(theirs[:8])!r} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="TOFU folder (fixtures/tofu has every split and log it reads)")
    parser.add_argument("--rows", type=int, default=20, help="rows per split for the eval comparison")
    parser.add_argument("--steps", type=int, default=10, help="training steps per numerics mode")
    parser.add_argument("--finetune-epochs", type=int, default=30, help="fine-tuning of the tiny model")
    args = parser.parse_args(argv)
    data = Path(args.data)
    torch.manual_seed(0)
    published_aucs(data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        t0 = time.perf_counter()
        tiny_model(data, folder, args.finetune_epochs)
        print(f"<!-- tiny model: {time.perf_counter() - t0:.0f} s -->")
        prompts(data, folder)
        eval_numerics(data, folder, args.rows)
        train_numerics(data, folder, args.steps, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
