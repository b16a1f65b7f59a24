"""A causal LM turned into per-row statistics for the TOFU metrics.

Teacher-forced answer log-probs through the fused ``altpo_kernels.linear_logprobs`` (no [tokens,
vocab] logits except where a metric needs the whole next-token distribution), greedy or sampled
generations, and the attention-mask rule of each numerics mode:

- ``altpo-fast`` (default): padding is masked by position, every real token is attended to;
- ``open-unlearning``: every token equal to the pad token is masked, as open-unlearning's
  collator does (``attention_mask = input_ids != pad_token_id``, with ``pad_token = eos_token``
  for Llama-3 tokenizers): each in-sequence ``<|eot_id|>`` then disappears from attention, and
  its published logs carry that effect.

Work can be split over ``torchrun`` processes (:class:`altpo.eval.sharding.Shards`) in units of
whole batches, so the sharded result equals the single-process one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from altpo_kernels import linear_logprobs
from altpo_kernels.hf import lm_head

from altpo.data.tofu import (
    IGNORE_INDEX,
    ChatFormat,
    chat_prompt_text,
    check_chat_template,
    encode_qa_batch,
)
from altpo.eval.sharding import Shards
from altpo.progress import progress_bar

EVAL_NUMERICS = ("altpo-fast", "open-unlearning")


def check_numerics(numerics: str) -> None:
    if numerics not in EVAL_NUMERICS:
        raise ValueError(f"numerics must be one of {', '.join(EVAL_NUMERICS)}, got {numerics!r}")


def pad_token_id(tokenizer) -> int:
    """The pad id for batching: the tokenizer's own, else its eos (open-unlearning's choice)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def attention_mask(ids, real, pad_id: int, numerics: str):
    """The attention mask of a padded batch: ``real`` (1 on real tokens) in the default mode;
    in ``open-unlearning`` mode also 0 on every token equal to ``pad_id`` (its collator's rule)."""
    if numerics == "open-unlearning":
        return real * (ids != pad_id).to(real.dtype)
    return real


def check_chat_tokenizer(tokenizer) -> None:
    """The tokenizer must carry a chat template and an end-of-sequence token."""
    check_chat_template(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token (e.g. <|eot_id|>)")


def encode_prompt(tokenizer, user_message: str, fmt: ChatFormat = ChatFormat()) -> list[int]:
    """Token ids of the chat prompt up to and including the assistant header."""
    text = chat_prompt_text(tokenizer, user_message, fmt)
    # the template already wrote the special tokens (BOS, headers) as text
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def model_device(model):
    return next(model.parameters()).device


@dataclass
class SequenceStats:
    token_logprobs: np.ndarray  # log-probs of every labelled token (answer + end-of-turn)
    labels: np.ndarray
    argmax: np.ndarray | None = None  # teacher-forced greedy predictions at the labelled tokens
    vocab_mean: np.ndarray | None = None  # E_{v~p}[log p(v)] at each labelled token
    vocab_var: np.ndarray | None = None

    @property
    def avg_loss(self) -> float:
        return float(-self.token_logprobs.mean()) if self.token_logprobs.size else float("nan")


def _vocab_statistics(hidden, weight, chunk: int = 256):
    """Argmax and mean / variance of log p over the vocabulary, a few rows of logits at a time.

    Extraction strength, exact memorisation and min-k%++ need the whole next-token distribution,
    which the fused log-prob kernel deliberately never forms; ``chunk`` rows bound the memory.
    """
    am, mu, var = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        logits = (hidden[s:s + chunk] @ weight.T).float()
        lp = torch.log_softmax(logits, dim=-1)
        p = lp.exp()
        m = (p * lp).sum(-1)
        am.append(logits.argmax(-1))
        mu.append(m)
        # centred form: E[lp^2] - E[lp]^2 cancels catastrophically when p is nearly uniform
        var.append((p * (lp - m[:, None]).square()).sum(-1))
    cat = lambda xs: torch.cat(xs).cpu().numpy() if xs else np.zeros(0)  # noqa: E731
    return cat(am), cat(mu).astype(np.float64), cat(var).astype(np.float64)


class Scorer:
    """Teacher-forced statistics of (question, answer) pairs, cached per pair so that splits
    sharing rows (forget10 and forget10_perturbed) are scored once."""

    def __init__(self, model, tokenizer, *, batch_size, fmt: ChatFormat, progress, backend,
                 numerics: str = "altpo-fast", shards: Shards = Shards()):
        check_numerics(numerics)
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.batch_size, self.progress, self.backend = batch_size, progress, backend
        self.numerics, self.shards = numerics, shards
        self.cache: dict[tuple[str, str], SequenceStats] = {}
        self.head = lm_head(model)

    def score(self, pairs: Sequence[tuple[str, str]], desc: str, vocab: bool = False) -> list[SequenceStats]:
        todo = sorted(
            {p for p in pairs if p not in self.cache or (vocab and self.cache[p].argmax is None)}
        )
        encoded = {}
        for p, e in zip(todo, encode_qa_batch(self.tokenizer, todo, fmt=self.fmt)):
            encoded[p] = (e.input_ids, e.labels)
        todo.sort(key=lambda p: len(encoded[p][0]))  # similar lengths share a batch: less padding
        device = model_device(self.model)
        pad = pad_token_id(self.tokenizer)
        batches = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        done: dict = {}
        mine = [b for _, b in self.shards.take(batches)]
        for batch in progress_bar(mine, desc=desc, unit="batch", enabled=self.progress):
            width = max(len(encoded[p][0]) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            lab = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):
                x, y = encoded[p]
                ids[r, : len(x)] = torch.tensor(x)
                lab[r, : len(y)] = torch.tensor(y)
                mask[r, : len(x)] = 1
            mask = attention_mask(ids, mask, pad, self.numerics)
            ids, lab, mask = ids.to(device), lab.to(device), mask.to(device)
            with torch.no_grad():
                out = self.head.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                hidden = self.head.scale_hidden(out.last_hidden_state)
                # hidden[t] predicts token t+1
                target = lab[:, 1:]
                valid = target != IGNORE_INDEX
                rows = hidden[:, :-1][valid]
                labels = target[valid]
                logp = linear_logprobs(rows, self.head.weight, labels, backend=self.backend)
                counts = valid.sum(1).tolist()
                logp = logp.double().cpu().numpy()
                labels_np = labels.cpu().numpy()
                stats = _vocab_statistics(rows, self.head.weight) if vocab else None
            start = 0
            for r, p in enumerate(batch):
                sl = slice(start, start + counts[r])
                start += counts[r]
                s = SequenceStats(logp[sl], labels_np[sl])
                if stats is not None:
                    s.argmax, s.vocab_mean, s.vocab_var = (a[sl] for a in stats)
                done[p] = s
        self.cache.update(self.shards.gather(done))
        return [self.cache[p] for p in pairs]


def answer_probabilities(model, tokenizer, rows: Sequence[Mapping], *, fmt: ChatFormat = ChatFormat(),
                         batch_size: int = 64, backend: str = "auto") -> list[float]:
    """Per row, ``exp(-mean answer-token NLL)`` of its ``answer``: TOFU's Q_A_Prob per row, scored
    exactly as :func:`compute_tofu_metrics` scores it."""
    was_training = model.training
    model.eval()
    try:
        scorer = Scorer(model, tokenizer, batch_size=batch_size, fmt=fmt, progress=False, backend=backend)
        stats = scorer.score([(r["question"], r["answer"]) for r in rows], "Q_A_Prob")
    finally:
        model.train(was_training)
    return [float(np.exp(-s.avg_loss)) for s in stats]


def generate_greedy(model, tokenizer, prompts: Sequence[list[int]], *, batch_size: int,
                    max_new_tokens: int, progress: bool = True, desc: str = "generating",
                    sampling: Mapping[str, Any] | None = None, numerics: str = "altpo-fast",
                    shards: Shards = Shards()) -> list[str]:
    """Decode continuations of token-id prompts, batched with left padding.

    Greedy unless ``sampling`` gives generation settings (``do_sample``, ``temperature``, ...).
    Each text is cut at the first end-of-sequence token, decoded without special tokens and
    stripped. ``numerics`` picks the attention-mask rule (see the module docstring); ``shards``
    splits the batches over processes (every rank returns all texts).
    """
    check_numerics(numerics)
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    cfg = copy.deepcopy(model.generation_config)
    eos = cfg.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    eos.add(tokenizer.eos_token_id)
    cfg.eos_token_id = sorted(eos)
    cfg.pad_token_id = pad
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    if sampling:
        for k, v in sampling.items():
            setattr(cfg, k, v)
    else:
        cfg.do_sample = False
        cfg.temperature = cfg.top_p = cfg.top_k = None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, str] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = list(shards.take(batches))
    for _, batch in progress_bar(mine, desc=desc, unit="batch", enabled=progress):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(prompts[i])
            ids[r, width - n:] = torch.tensor(prompts[i])
            mask[r, width - n:] = 1
        mask = attention_mask(ids, mask, pad, numerics)
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
        for r, i in enumerate(batch):
            new = gen[r, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    out = shards.gather(out)
    return [out[i] for i in range(len(prompts))]

