"""Alternate answers for AltPO: K sampled answers per forget question, with the facts changed.

    from altpo.eval.alternates import generate_alternates
    report = generate_alternates(model, tokenizer, [(q, a), ...], k=5, seed=0,
                                 output_path="alternates.jsonl")

The starting model itself answers each question again, prompted to keep the form of the true
answer but change its facts (temperature 1.0, at most 200 new tokens). The output is JSON Lines,
one row per alternate: ``question``, ``answer`` (the true answer) and ``alternate``.

Runs are resumable: the file is rewritten atomically after every batch of questions, so an
interrupted run never leaves a half line, and running again with the same settings continues
where it stopped. The settings are kept beside the output in ``<output>.settings.json``; a file
written with other settings is never overwritten without ``force``. Batches, and the random seed
of each batch, are fixed by the whole question list, so a resumed run writes exactly what an
uninterrupted one would have (on the same device and dtype).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from altpo.data.tofu import DEFAULT_DATE_STRING, DEFAULT_SYSTEM_PROMPT, ChatFormat, is_rejected
from altpo.eval import open_unlearning_prompt as ou_prompt
from altpo.eval.scoring import check_chat_tokenizer, encode_prompt, generate_greedy
from altpo.progress import progress_bar

ALTERNATE_PROMPT = (
    "Below is a question and its true answer.\n\n"
    "Question: {question}\n"
    "True answer: {answer}\n\n"
    "Write a new answer to the same question that keeps the style and length of the true answer "
    "but changes its facts: use different names, places, dates, titles, professions or events, "
    "made up but plausible. Reply with the new answer only."
)

PROMPT_STYLES = ("altpo-fast", "open-unlearning")

class AlternatesOutputExists(FileExistsError):
    """The output file exists and cannot be resumed with these settings."""


@dataclass
class AlternatesReport:
    """What one ``generate_alternates`` call did."""

    output_path: Path
    questions: int
    resumed_questions: int = 0
    written_rows: int = 0
    resampled: int = 0
    short: list[tuple[str, int]] = field(default_factory=list)  # (question, alternates kept) below k

    def describe(self) -> str:
        parts = [f"{self.written_rows} alternates written to {self.output_path}"]
        if self.resumed_questions:
            parts.append(f"{self.resumed_questions} of {self.questions} questions were already done")
        if self.resampled:
            parts.append(f"{self.resampled} samples repeated the true answer and were drawn again")
        if self.short:
            parts.append(f"{len(self.short)} question(s) kept fewer alternates than asked after the retries")
        return "; ".join(parts)


def alternates_settings(pairs, k, seed, *, model_id, batch_size, max_new_tokens, temperature, top_p, top_k,
              max_retries, fmt: ChatFormat, prompt, prompt_style: str = "altpo-fast") -> dict:
    """Everything a resumed run must share with the run that wrote the file."""
    data_hash = hashlib.sha256(json.dumps(list(pairs), ensure_ascii=False).encode()).hexdigest()
    if prompt_style == "open-unlearning":
        # the template replaces the chat format and the user message
        return {
            "model": model_id, "data_sha256": data_hash, "questions": len(pairs), "k": k, "seed": seed,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k, "max_retries": max_retries,
            "prompt_style": prompt_style, "prompt": ou_prompt.TEMPLATE,
            "stop_strings": list(ou_prompt.STOP_STRINGS),
        }
    return {
        "model": model_id, "data_sha256": data_hash, "questions": len(pairs), "k": k, "seed": seed,
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_p": top_p, "top_k": top_k, "max_retries": max_retries,
        "system_prompt": fmt.system_prompt, "date_string": fmt.date_string, "prompt": prompt,
    }


def settings_path(output_path) -> Path:
    p = Path(output_path)
    return p.with_name(p.name + ".settings.json")


def unique_pairs(questions_answers) -> list[tuple[str, str]]:
    """(question, answer) pairs from tuples or row dicts, first occurrence of each kept."""
    seen, out = set(), []
    for i, qa in enumerate(questions_answers):
        if isinstance(qa, dict):
            qa = (qa.get("question"), qa.get("answer"))
        q, a = qa
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise ValueError(f"questions_answers[{i}] needs a non-empty question and answer, got {qa!r}")
        if (q, a) not in seen:
            seen.add((q, a))
            out.append((q, a))
    return out


def _read_done(path: Path) -> tuple[list[str], set[tuple[str, str]]]:
    """Complete lines of an existing output and the (question, answer) pairs they cover."""
    lines, done = [], set()
    text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((row["question"], row["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            # only a torn last line is expected (a copy made mid-write); anything else is not ours
            if number == len(text.split("\n")) and not text.endswith("\n"):
                break
            raise AlternatesOutputExists(
                f"{path} line {number} is not an alternates row; pass force to overwrite it"
            ) from None
        lines.append(line)
    return lines, done


def check_resumable(output_path, settings: dict, force: bool) -> bool:
    """Whether ``output_path`` is resumed (True) or started afresh (False).

    Raises ``AlternatesOutputExists`` when the file exists, ``force`` is off, and it was not
    written by a run with exactly these settings.
    """
    out, meta = Path(output_path), settings_path(output_path)
    if force or not out.exists():
        return False
    if not meta.is_file():
        raise AlternatesOutputExists(
            f"{out} exists and has no {meta.name} to resume from; pass force (--force) to overwrite "
            "it or choose another output"
        )
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        old = {}
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        raise AlternatesOutputExists(
            f"{out} was written with other settings ({', '.join(changed)} differ), so it cannot be "
            "resumed; pass force (--force) to overwrite it or choose another output"
        )
    return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sample_texts(model, tokenizer, prompts, *, batch_size, max_new_tokens, temperature, top_p, top_k,
                  progress, desc) -> list[str]:
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k or None}
    return generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, desc=desc, sampling=sampling)


def generate_alternates(model, tokenizer, questions_answers: Sequence, k: int = 5, seed: int = 0,
                        output_path="alternates.jsonl", *, batch_size: int = 32, max_new_tokens: int = 200,
                        temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                        max_retries: int = 5, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                        date_string: str | None = DEFAULT_DATE_STRING, prompt: str = ALTERNATE_PROMPT,
                        force: bool = False, progress: bool = True, model_id: str | None = None,
                        prompt_style: str = "altpo-fast") -> AlternatesReport:
    """Sample ``k`` alternate answers per (question, answer) and write them as JSON Lines.

    Args:
        questions_answers: (question, answer) pairs or dicts with those keys (a forget split);
            repeated pairs are generated once.
        k: alternates per question.
        seed: base seed; batch ``b`` samples with ``torch.manual_seed(f(seed, b))``.
        output_path: the JSON Lines file (``question``, ``answer``, ``alternate`` per row).
        batch_size: sequences per ``generate`` call; ``batch_size // k`` questions (at least
            one) make a batch, which is also the unit written to disk.
        max_new_tokens, temperature, top_p, top_k: sampling settings (defaults: plain sampling at
            temperature 1.0, no top-p / top-k truncation, at most 200 new tokens).
        max_retries: rounds of resampling for alternates that are empty or repeat the true
            answer (normalised comparison); what still fails is left out and reported.
        system_prompt, date_string: chat template settings; prompt: the user message, with
            ``{question}`` and ``{answer}`` fields.
        force: overwrite an existing output instead of resuming it.
        model_id: names the model in the settings file (default: ``model.config._name_or_path``).
        prompt_style: ``altpo-fast`` (the chat template with ``prompt`` as the user message) or
            ``open-unlearning`` (its generate.py text template and stop strings, see
            :mod:`altpo.eval.open_unlearning_prompt`; ``prompt``, ``system_prompt`` and
            ``date_string`` are then unused).

    Returns an :class:`AlternatesReport`. Raises ``AlternatesOutputExists`` when the output
    exists and cannot be resumed (other settings) and ``force`` is off.
    """
    _check_generation_arguments(k, batch_size, max_new_tokens, max_retries, temperature, prompt_style,
                                prompt)
    check_chat_tokenizer(tokenizer)
    pairs = unique_pairs(questions_answers)
    if not pairs:
        raise ValueError("questions_answers is empty: nothing to generate alternates for")
    fmt = ChatFormat(system_prompt or None, date_string)
    model_id = model_id or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    settings = alternates_settings(pairs, k, seed, model_id=model_id, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         max_retries=max_retries, fmt=fmt, prompt=prompt, prompt_style=prompt_style)
    out = Path(output_path)
    lines, done = _open_output(out, settings, force)

    report = AlternatesReport(out, len(pairs), resumed_questions=sum(p in done for p in pairs))
    per_batch = max(1, batch_size // k)
    batches = [list(range(s, min(s + per_batch, len(pairs)))) for s in range(0, len(pairs), per_batch)]
    todo = [b for b, idx in enumerate(batches) if any(pairs[i] not in done for i in idx)]
    sampling = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=len(pairs) - report.resumed_questions, desc="alternates",
                       unit="question", enabled=progress)
    try:
        for b in todo:
            idx = batches[b]
            # one seed per fixed batch: a resumed run repeats exactly the samples it lost
            torch.manual_seed(seed * 1_000_003 + b)
            if prompt_style == "open-unlearning":
                prompts = {i: ou_prompt.prompt_ids(tokenizer, *pairs[i]) for i in idx}
            else:
                prompts = {i: encode_prompt(tokenizer, prompt.format(question=pairs[i][0], answer=pairs[i][1]),
                                            fmt) for i in idx}
            texts = _sample_batch(model, tokenizer, pairs, idx, prompts, k, max_retries, prompt_style,
                                  sampling, report)
            new = _new_lines(pairs, idx, texts, k, done, report, bar)
            lines += new
            report.written_rows += len(new)
            _atomic_write(out, "".join(line + "\n" for line in lines))
    finally:
        bar.close()
        if was_training:
            model.train()
    return report


def _check_generation_arguments(k, batch_size, max_new_tokens, max_retries, temperature, prompt_style,
                                prompt) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1 or max_new_tokens < 1 or max_retries < 0:
        raise ValueError("batch_size and max_new_tokens must be >= 1 and max_retries >= 0")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
    if "{question}" not in prompt:
        raise ValueError("prompt must contain a {question} field")


def _open_output(out: Path, settings: dict, force: bool) -> tuple[list[str], set[tuple[str, str]]]:
    """Resume ``out`` (its complete lines and the pairs they cover) or start it empty; either way
    write the settings file beside it."""
    resume = check_resumable(out, settings, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines, done = _read_done(out) if resume else ([], set())
    if not resume:
        _atomic_write(out, "")
    _atomic_write(settings_path(out), json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return lines, done


def _sample_batch(model, tokenizer, pairs, idx, prompts, k, max_retries, prompt_style, sampling,
                  report: AlternatesReport) -> dict[tuple[int, int], str]:
    """``k`` samples for each question of one batch, the rejected ones drawn again up to
    ``max_retries`` times; (question index, sample number) -> text for the samples kept."""
    texts: dict[tuple[int, int], str] = {}
    pending = [(i, j) for i in idx for j in range(k)]
    for attempt in range(max_retries + 1):
        samples = _sample_texts(model, tokenizer, [prompts[i] for i, _ in pending], progress=False,
                                desc="sampling", **sampling)
        if prompt_style == "open-unlearning":
            samples = [ou_prompt.cut_at_stop_strings(t) for t in samples]
        retry = []
        for slot, text in zip(pending, samples):
            if is_rejected(text, pairs[slot[0]][1]):
                retry.append(slot)
            else:
                texts[slot] = text
        if attempt:
            report.resampled += len(pending)
        pending = retry
        if not pending:
            break
    return texts


def _new_lines(pairs, idx, texts, k, done: set, report: AlternatesReport, bar) -> list[str]:
    """The JSON Lines of the batch's questions not yet in the file; short questions reported."""
    new = []
    for i in idx:
        if pairs[i] in done:
            continue
        kept = [texts[(i, j)] for j in range(k) if (i, j) in texts]
        if len(kept) < k:
            report.short.append((pairs[i][0], len(kept)))
        for alt in kept:
            new.append(json.dumps({"question": pairs[i][0], "answer": pairs[i][1], "alternate": alt},
                                  ensure_ascii=False))
        done.add(pairs[i])
        bar.update(1)
    return new
