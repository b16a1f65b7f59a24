"""A tiny Llama and settings for trainer tests on the TOFU fixture's forget01/retain99 data.

The tokenizer is trained on the rows the tests use; the model is saved and reloaded through
``from_pretrained`` by the trainer, like a real checkpoint.
"""

from pathlib import Path

import torch

from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model
from altpo.data.tofu import load_alternates, load_tofu_split, texts_for_tokenizer

ALTERNATES = "alternates/llama2-7b/forget01/alt5_seed_0.json"
FORGET_ROWS, RETAIN_ROWS = 4, 24


def build_model_folder(tofu_dir: Path, folder: Path, *, chat_template: bool = True) -> Path:
    forget = load_tofu_split(tofu_dir, "forget01")
    retain = load_tofu_split(tofu_dir, "retain99")[:RETAIN_ROWS]
    alts = load_alternates(tofu_dir / ALTERNATES, forget)
    texts = texts_for_tokenizer(forget[:FORGET_ROWS] + retain, alts[:FORGET_ROWS])
    tokenizer = build_tiny_tokenizer(texts, vocab_size=700, chat_template=chat_template)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, seed=5)
    save_tiny_model(model, tokenizer, folder)
    return folder


def base_settings(tofu_dir: Path, model_dir: Path, output: Path, **overrides) -> dict:
    settings = dict(
        model=str(model_dir), data=str(tofu_dir), forget_split="forget01", retain_split="retain99",
        alternates=str(tofu_dir / ALTERNATES), max_forget_rows=FORGET_ROWS,
        max_retain_rows=RETAIN_ROWS, output=str(output), batch_size=4, max_steps=3, lr=3e-3,
        warmup_epochs=0.0, tokens_per_microbatch="1024", quiet=True, loss_backend="torch",
        attention="sdpa", device="cpu",
    )
    settings.update(overrides)
    return settings


def sequence_logprob_float64(model, ids, labels) -> float:
    """Summed answer log-prob of one sequence from a stock forward and float64 log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    target = torch.tensor(labels[1:])
    mask = target != -100
    lp = torch.log_softmax(logits, -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    return float((lp * mask).sum())
