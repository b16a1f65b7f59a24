"""IdkDPO's chosen answers: "I don't know" variants, one drawn per forget row.

The file holds one refusal per line (TOFU's ``idontknow.jsonl`` is plain text lines despite its
name; a line that is a JSON string, or an object with an ``answer`` or ``text`` field, is read as
that). open-unlearning's ``QAwithIdkDataset`` draws a fresh variant each time a row is read; here
one variant is drawn per forget row with the run's seed, so the data, and with it the cached
reference log-probs, stay fixed for the whole run.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

from altpo.errors import UserError

IDK_FILE_NAME = "idontknow.jsonl"


def read_idk_answers(path: str | Path) -> list[str]:
    """The refusal texts of ``path``, in file order (empty lines skipped)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(f"\"I don't know\" answers file {path} not found; pass --idk-answers FILE "
                        "(one refusal per line, e.g. TOFU's idontknow.jsonl)")
    answers = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text[0] in "{\"":
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            if isinstance(value, dict):
                value = value.get("answer", value.get("text"))
            if not isinstance(value, str):
                raise UserError(f"{path}, line {number}: expected a refusal text, a JSON string or "
                                "an object with an 'answer' field")
            text = value.strip()
        if text:
            answers.append(text)
    if not answers:
        raise UserError(f"\"I don't know\" answers file {path} has no answers")
    return answers


def default_idk_path(data: str) -> Path | None:
    """``idontknow.jsonl`` beside the TOFU split files of a local ``--data`` folder, if there."""
    path = Path(os.path.expanduser(str(data))) / IDK_FILE_NAME
    return path if path.is_file() else None


def sample_idk_answers(answers: Sequence[str], num_rows: int, seed: int) -> list[list[str]]:
    """One refusal per forget row, drawn with ``seed``: the chosen answers in alternates' shape."""
    rng = random.Random(f"idk-answers-{seed}")
    return [[rng.choice(list(answers))] for _ in range(num_rows)]
