"""Swap an open-unlearning-style per-batch log-prob helper for the fused one, and see the memory.

Codebases written like open-unlearning score a padded batch with a helper of this shape:

    def compute_batch_nll(model, inputs):
        logits = model(**inputs).logits                      # [B, T, V]: the whole vocabulary
        shifted_labels = inputs["labels"][..., 1:]
        loss = cross_entropy(logits[..., :-1, :].transpose(-1, -2), shifted_labels, reduction="none")
        return loss.sum(-1), outputs

Every method (NPO, SimNPO, DPO, ...) then works on those per-row sums. The drop-in replacement
keeps the signature's meaning (per-row summed answer NLL, differentiable) and never holds the
[B, T, V] logits:

    from altpo_kernels.hf import batch_answer_logprobs
    def compute_batch_nll(model, inputs):
        out = batch_answer_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        return -out.logps, None

This script runs both on the same batch of a tiny Llama with a real vocabulary (Llama-3's 128256),
checks that they agree, and measures each one's peak memory (forward + backward) in a fresh
process on the CPU:

    python examples/replace_batch_nll.py            # batch 8 x 256 tokens
    python examples/replace_batch_nll.py --quick    # smaller, for the tests
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource

import torch

VOCAB = 128256


def _model_and_batch(batch: int, length: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).float()
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones_like(ids)
    lengths = torch.randint(length // 2, length + 1, (batch,))
    labels = ids.clone()
    for r, n in enumerate(lengths.tolist()):
        mask[r, n:] = 0
        labels[r, n:] = -100
        labels[r, : n // 3] = -100  # the prompt
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def materialised_batch_nll(model, inputs):
    """The helper as open-unlearning-style code writes it: full logits, per-token cross-entropy."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    shifted = inputs["labels"][..., 1:]
    loss = torch.nn.functional.cross_entropy(logits[..., :-1, :].transpose(-1, -2), shifted,
                                             ignore_index=-100, reduction="none")
    return loss.sum(-1)


def fused_batch_nll(model, inputs):
    """The drop-in: the same per-row sums through the fused kernel."""
    from altpo_kernels.hf import batch_answer_logprobs

    out = batch_answer_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    return -out.logps


def _peak_child(variant: str, batch: int, length: int, vocab: int, queue) -> None:
    torch.set_num_threads(1)
    model, inputs = _model_and_batch(batch, length, vocab)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = materialised_batch_nll if variant == "materialised" else fused_batch_nll
    nll = fn(model, inputs)
    nll.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((variant, (after - before) * 1024, nll.detach().tolist()))


def measure(batch: int, length: int, vocab: int) -> dict:
    """Peak resident-memory growth of forward + backward per variant, each in a fresh process."""
    ctx = mp.get_context("spawn")
    results = {}
    for variant in ("materialised", "fused"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_child, args=(variant, batch, length, vocab, queue))
        proc.start()
        name, peak, nll = queue.get(timeout=600)
        proc.join()
        results[name] = {"peak_bytes": peak, "nll": nll}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 x 96 tokens")
    args = parser.parse_args(argv)
    batch, length = (4, 96) if args.quick else (8, 256)
    res = measure(batch, length, VOCAB)
    a, b = res["materialised"]["nll"], res["fused"]["nll"]
    worst = max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b))
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"batch {batch} x {length} tokens, vocabulary {VOCAB}, forward + backward on the CPU")
    print(f"per-row NLL: materialised {[round(x, 3) for x in a]}")
    print(f"             fused        {[round(x, 3) for x in b]}  (largest relative difference {worst:.1e})")
    m, f = res["materialised"]["peak_bytes"], res["fused"]["peak_bytes"]
    print(f"peak memory growth: materialised {mib(m)}, fused {mib(f)}, ratio {f / max(m, 1):.3f} "
          f"({mib(m - f)} saved)")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
