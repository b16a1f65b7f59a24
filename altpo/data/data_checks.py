"""Checks on the training data that catch a wrong split, a bad cut or repeated rows before the
model loads: each names what is wrong and how to fix it."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from altpo.data.tofu import AltPOData, dropped_alternates_note
from altpo.errors import UserError


def check_retain_overlap(forget_rows: Sequence[dict], retain_rows: Sequence[dict],
                         forget_split: str, retain_split: str) -> None:
    """Refuse a retain split that holds forget questions (it would train them back in)."""
    forget = {r["question"] for r in forget_rows}
    shared = [r["question"] for r in retain_rows if r["question"] in forget]
    if shared:
        hint = forget_split.replace("forget", "retain")
        number = "".join(c for c in forget_split if c.isdigit())
        if number:
            hint = f"retain{100 - int(number):02d}"
        raise UserError(
            f"--retain-split {retain_split} holds {len(set(shared))} of the {len(forget)} questions "
            f"of --forget-split {forget_split} (e.g. {shared[0][:80]!r}); training would keep what "
            f"it should forget. Use the split that complements it (--retain-split {hint})")


def check_answer_tokens(data: AltPOData, max_length: int) -> None:
    """Refuse a ``--max-length`` that cuts away every answer token of some sequence."""
    empty, longest_prompt = {}, 0
    for name, seqs in (("forget", data.forget), ("alternates", data.alternates), ("retain", data.retain)):
        n = sum(1 for s in seqs if s.num_answer_tokens == 0)
        if n:
            empty[name] = (n, len(seqs))
        for s in seqs:
            prompt = next((i for i, x in enumerate(s.labels) if x != -100), len(s.labels))
            longest_prompt = max(longest_prompt, prompt if s.num_answer_tokens else len(s.input_ids))
    if empty:
        parts = ", ".join(f"{n} of {total} {name}" for name, (n, total) in empty.items())
        raise UserError(
            f"--max-length {max_length} leaves no answer tokens in {parts} sequences (the cut keeps "
            f"only the prompt), so those rows would train nothing; raise --max-length above the "
            f"longest prompt (at least {longest_prompt + 1})")
    if data.num_pairs and data.same_tokens == data.num_pairs:
        raise UserError(
            f"--max-length {max_length} cuts every alternate to the same tokens as its forget answer, "
            "so the forget term is 0 with no gradient and the run would unlearn nothing; raise "
            f"--max-length (the longest prompt is {longest_prompt} tokens)")


def duplicate_alternates(data_alternates: Sequence[Sequence[str]]) -> tuple[int, int]:
    """``(repeated alternates, questions with repeats)``: an alternate text given twice for one
    question counts as two pairs."""
    repeats, questions = 0, 0
    for alts in data_alternates:
        extra = sum(n - 1 for n in Counter(alts).values() if n > 1)
        repeats += extra
        questions += extra > 0
    return repeats, questions


def duplicate_alternates_note(alternates: Sequence[Sequence[str]], path) -> str | None:
    """Warnings on the alternates file: alternates dropped for repeating their forget answer, and
    alternates given twice for one question."""
    dropped = dropped_alternates_note(path) if path else None
    note = _repeats_note(alternates, path)
    return "\n".join(n for n in (dropped, note) if n) or None


def _repeats_note(alternates: Sequence[Sequence[str]], path) -> str | None:
    repeats, questions = duplicate_alternates(alternates)
    if not repeats:
        return None
    total = sum(len(a) for a in alternates)
    return (f"warning: alternates file {path}: {repeats} of {total} rows repeat an earlier alternate "
            f"of the same question ({questions} question(s)); each repeat is trained as one more "
            "pair (remove the repeated rows to weigh every alternate once)")
