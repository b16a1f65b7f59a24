"""Plain causal-LM fine-tuning of a tiny model on chat-formatted question/answer pairs.

This is the demo's stand-in for the TOFU fine-tuning that produced the real starting checkpoints
(``open-unlearning/tofu_Llama-3.2-1B-Instruct_full`` and its retain90 twin): it makes a tiny Llama
memorise every answer so that there is something to unlearn. It is not the AltPO trainer.

Sequences are encoded by :func:`altpo.data.tofu.encode_qa`, the one encoder that AltPO training and
evaluation use too (chat template, system prompt, date string, the answer followed by
``<|eot_id|>``), and the loss covers only the answer tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from altpo.data.tofu import ChatFormat, encode_qa_batch
from altpo.progress import progress_bar


def encode_rows(tokenizer, rows: Sequence[dict], fmt: ChatFormat = ChatFormat()
                ) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per ``question``/``answer`` row, exactly as training and eval encode."""
    return [(e.input_ids, e.labels)
            for e in encode_qa_batch(tokenizer, [(r["question"], r["answer"]) for r in rows], fmt=fmt)]


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask`` tensors."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return ids, labels, mask


def _length_bucketed_batches(order: list[int], encoded, batch_size: int, rng: random.Random,
                             bucket_batches: int = 16) -> list[list[int]]:
    """Batches of rows of similar length, in random order.

    Rows of very different lengths (short answers, long changed-facts requests) in one batch
    would be padded to the longest; sorting within windows of ``bucket_batches`` batches of the
    shuffled order keeps batches tight and the data order random.
    """
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(encoded[i][0]))
        batches += [chunk[s:s + batch_size] for s in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class FinetuneResult:
    """Losses of a :func:`finetune_qa` run: one mean answer-token NLL per optimizer step."""

    step_losses: list[float]
    epochs: int
    steps: int


def finetune_qa(model, tokenizer, rows: Sequence[dict], *, epochs: int = 30, batch_size: int = 16,
                lr: float = 3e-3, weight_decay: float = 0.0, warmup_fraction: float = 0.05,
                seed: int = 0, fmt: ChatFormat = ChatFormat(), progress: bool = True,
                desc: str = "fine-tune", on_step: Callable[[int, float], None] | None = None
                ) -> FinetuneResult:
    """Train ``model`` in place on the ``question``/``answer`` ``rows`` with the answer-token NLL.

    A row's ``answer`` may be a list of answers: each epoch then trains on one of them, drawn by
    ``seed`` (so a question with many right answers is not memorised with one). AdamW, a short
    linear warm-up then cosine decay to a tenth of ``lr``, rows shuffled every epoch by ``seed``.
    Returns the loss of every step.
    """
    if not rows:
        raise ValueError("finetune_qa needs at least one question/answer row")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    variants: list[list[tuple[list[int], list[int]]]] = []
    for row in rows:
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        if not answers:
            raise ValueError(f"row {row['question']!r} has an empty list of answers")
        variants.append(encode_rows(tokenizer, [{"question": row["question"], "answer": a}
                                                for a in answers], fmt))
    encoded = [v[0] for v in variants]
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_fraction * total))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98),
                            weight_decay=weight_decay)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = random.Random(seed)
    order = list(range(len(encoded)))
    losses: list[float] = []
    model.train()
    bar = progress_bar(total=total, desc=desc, unit="step", enabled=progress)
    try:
        for _ in range(epochs):
            rng.shuffle(order)
            encoded = [v[rng.randrange(len(v))] if len(v) > 1 else v[0] for v in variants]
            for batch_rows in _length_bucketed_batches(order, encoded, batch_size, rng):
                batch = [encoded[i] for i in batch_rows]
                ids, labels, mask = collate(batch, tokenizer.pad_token_id)
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                loss = float(out.loss.detach())
                losses.append(loss)
                if on_step is not None:
                    on_step(len(losses), loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        bar.close()
    model.eval()
    return FinetuneResult(losses, epochs, total)
