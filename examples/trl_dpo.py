"""TRL's DPOTrainer on this project's kernel: one changed import, the same losses, less memory.

    from altpo_kernels.trl import DPOTrainer          # instead of: from trl import DPOTrainer

Trains a tiny Llama with a Llama-3-sized vocabulary (V = 128256) for two DPO steps, once with
stock ``trl.DPOTrainer`` and once with the drop-in, each in a fresh process from the same
weights, in fp32 on the CPU, and prints both runs' losses, time and peak memory growth (the
process's peak resident memory during training over its peak before it). Needs the ``trl`` extra:

    python examples/trl_dpo.py                 # V = 128256
    python examples/trl_dpo.py --quick         # V = 8192, for the tests

The trainers' output folders go under runs/trl_dpo/ (ignored by git).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [f"Question {i}: what does author {i} write about?" for i in range(16)]
CHOSEN = [f" Author {i} writes quiet novels about rivers, ferries and {i} old towns." for i in range(16)]
REJECTED = [f" I believe author {i} mostly writes loud poems about {i} crowded cities." for i in range(16)]


def _train(variant: str, vocab: int, hidden: int, steps: int, out: str, queue) -> None:
    import torch
    import trl
    from datasets import Dataset

    from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer
    from altpo_kernels.trl import DPOTrainer as KernelDPOTrainer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = build_tiny_tokenizer(PROMPTS + CHOSEN + REJECTED, vocab_size=400, chat_template=False)
    policy = build_tiny_llama(tok, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=2 * hidden, seed=0)
    if vocab > policy.config.vocab_size:   # a real vocabulary's LM head; the text uses its first ids
        policy.resize_token_embeddings(vocab)
        torch.manual_seed(1)
        torch.nn.init.normal_(policy.lm_head.weight, std=0.02)
    reference = build_tiny_llama(tok, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=2 * hidden, seed=0)
    reference.resize_token_embeddings(policy.config.vocab_size)
    reference.load_state_dict(policy.state_dict())
    data = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=8, max_steps=steps,
                         learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                         use_cpu=True, bf16=False, seed=0, lr_scheduler_type="constant",
                         disable_tqdm=True)
    cls = trl.DPOTrainer if variant == "stock TRL" else KernelDPOTrainer
    trainer = cls(model=policy, ref_model=reference, args=args, train_dataset=data,
                  processing_class=tok)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    torch.save(weights, Path(out) / "weights.pt")
    queue.put((variant, losses, seconds, after - before))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="V = 8192 instead of 128256")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "runs" / "trl_dpo"))
    a = parser.parse_args(argv)
    vocab = 8192 if a.quick else 128256
    ctx = mp.get_context("spawn")
    results = {}
    for variant in ("stock TRL", "altpo_kernels.trl"):
        out = Path(a.output) / variant.replace(" ", "_")
        out.mkdir(parents=True, exist_ok=True)
        queue = ctx.Queue()
        proc = ctx.Process(target=_train, args=(variant, vocab, a.hidden, a.steps, str(out), queue))
        proc.start()
        results[variant] = queue.get(timeout=1800)
        proc.join()
        if proc.exitcode != 0:
            print(f"{variant}: the training process failed (exit {proc.exitcode})", file=sys.stderr)
            return 1

    import torch

    w = {v: torch.load(Path(a.output) / v.replace(" ", "_") / "weights.pt", weights_only=True)
         for v in results}
    diff = max(float((w["stock TRL"][n] - w["altpo_kernels.trl"][n]).abs().max()) for n in w["stock TRL"])
    print(f"DPO, tiny Llama with V = {vocab}, H = {a.hidden}, batch 8 pairs, {a.steps} steps, fp32, CPU")
    print(f"{'':20s} {'losses':>28s} {'time':>8s} {'peak memory growth':>20s}")
    for variant, losses, seconds, peak in results.values():
        shown = ", ".join(f"{x:.6f}" for x in losses)
        print(f"{variant:20s} {shown:>28s} {seconds:7.1f}s {peak / 2**20:17.0f} MiB")
    print(f"largest weight difference after {a.steps} steps: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
