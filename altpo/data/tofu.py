"""TOFU data for AltPO: splits, alternate answers, and chat-template tokenisation.

Splits come from a local folder of JSON Lines files in the hub's layout (``<folder>/<split>.json``,
one object per line, as in the repository's ``fixtures/tofu``) or from the hub (``locuslab/TOFU`` through
``datasets``). Alternate answers are JSON Lines rows with ``question``, ``answer`` and the
alternate under ``alternate`` (open-unlearning's name) or ``sub_answer`` (the AltPO authors' name),
K rows per forget question.

Every (question, answer) becomes one token sequence through the tokenizer's own chat template
(system prompt and ``date_string`` as in docs/design.md section 2) with labels only on the answer and
its end-of-turn token. :func:`encode_qa` is the one place that does this, so training, reference
log-probs and evaluation score exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from altpo.errors import UserError
from altpo.sources import looks_like_hub_id

HUB_DATASET = "locuslab/TOFU"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_DATE_STRING = "10 Apr 2025"
IGNORE_INDEX = -100
ALTERNATE_FIELDS = ("alternate", "sub_answer")


# ------------------------------------------------------------------------------------------------
# splits


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """Objects of a JSON Lines file (a JSON array file is accepted too); errors name the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{what} {path}, line {line}, is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); save the file as UTF-8"
        ) from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise UserError(f"{what} {path} is not valid JSON: {err}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{what} {path}, line {number}, is not valid JSON ({err.msg}); the file must "
                    "hold one JSON object per line (JSON Lines)"
                ) from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{what} {path}: row {number} is {type(row).__name__}, expected an object")
    return rows


def split_file(folder: Path, split: str) -> Path | None:
    """The file of TOFU split ``split`` in a local folder (``<split>.json``, else ``.jsonl``), or None."""
    return next((p for p in (folder / f"{split}.json", folder / f"{split}.jsonl") if p.is_file()), None)


def load_tofu_split(data: str, split: str, *, fields: Sequence[str] = ("question", "answer")) -> list[dict]:
    """Rows of one TOFU split, each a dict with at least ``fields`` (non-empty strings).

    ``data`` is a local folder holding ``<split>.json`` (JSON Lines) or a hub dataset id such as
    ``locuslab/TOFU`` (loaded with ``datasets.load_dataset(data, split)``). Raises
    :class:`~altpo.cli.UserError` for a missing folder or split, a bad row, or an empty split.
    """
    data = str(data)
    where = Path(os.path.expanduser(data))
    if where.is_dir():
        path = split_file(where, split)
        if path is None:
            found = sorted(p.stem for p in where.glob("*.json*"))
            raise UserError(
                f"split {split!r} not found in {where}: expected {where / f'{split}.json'}; splits there: "
                f"{', '.join(found[:20]) or 'none'}"
            )
        rows = read_jsonl(path, f"{split} split")
        origin = str(path)
    elif where.exists() or not looks_like_hub_id(data):
        raise UserError(f"data folder {data} does not exist (or is not a folder); pass --data with a "
                        "folder of TOFU split files, or a hub dataset id such as locuslab/TOFU")
    else:
        rows = _load_hub_split(data, split)
        origin = f"{data} (hub), subset {split}"
    if not rows:
        raise UserError(f"split {split!r} from {origin} is empty: choose a split with rows")
    for index, row in enumerate(rows):
        for name in fields:
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                raise UserError(
                    f"split {split!r} from {origin}: row {index} has no {name!r} text "
                    f"(fields present: {', '.join(sorted(row)) or 'none'})"
                )
    return rows


def _load_hub_split(dataset_id: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"loading {dataset_id} from the hub needs the datasets package (pip install datasets); "
            "or pass --data with a local folder of TOFU JSON Lines files"
        ) from None
    try:
        loaded = datasets.load_dataset(dataset_id, split, split="train")
    except Exception as err:  # network, unknown subset, auth: all user-fixable
        raise UserError(
            f"could not load subset {split!r} of {dataset_id} from the hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the name, or pass --data "
            "with a local folder of TOFU JSON Lines files"
        ) from None
    return [dict(row) for row in loaded]


# ------------------------------------------------------------------------------------------------
# alternates


_PUNCT = re.compile(r"[^\w\s]")


def normalise_answer(text: str) -> str:
    """Lower-case, punctuation dropped, whitespace collapsed: the key for "is this alternate just
    the true answer again"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def is_rejected(alternate: str, answer: str) -> bool:
    """An alternate is unusable when it is empty or repeats the true answer."""
    alt = normalise_answer(alternate)
    return not alt or alt == normalise_answer(answer)


def load_alternates(path: str | Path, forget_rows: Sequence[dict]) -> list[list[str]]:
    """Alternate answers per forget row (same order as ``forget_rows``), in file order.

    Rows match forget rows by question (and by answer where the split repeats a question). Every
    forget question needs at least one alternate; rows whose question is not in the forget split
    are an error that names a few of them.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(
            f"alternates file {path} not found; make one with `altpo-fast generate-alternates` "
            "(JSON Lines with question, answer and alternate)"
        )
    rows = read_jsonl(path, "alternates file")
    if not rows:
        raise UserError(f"alternates file {path} is empty")

    by_question: dict[str, list[int]] = {}
    for index, row in enumerate(forget_rows):
        by_question.setdefault(row["question"], []).append(index)
    for question, indices in by_question.items():
        same = [i for i in indices if forget_rows[i]["answer"] == forget_rows[indices[0]]["answer"]]
        if len(same) > 1:
            raise UserError(
                f"the forget split repeats a row (question and answer) in rows "
                f"{', '.join(str(i + 1) for i in same)}: {question[:80]!r}; remove the repeated row "
                "from the forget split (the alternates file is not the problem)"
            )

    alternates: list[list[str]] = [[] for _ in forget_rows]
    unknown: list[str] = []
    repeats: list[int] = []
    for number, row in enumerate(rows, 1):
        question = row.get("question")
        text = next((row[k] for k in ALTERNATE_FIELDS if isinstance(row.get(k), str)), None)
        if not isinstance(question, str) or text is None:
            raise UserError(
                f"alternates file {path}, row {number}: needs a 'question' and an 'alternate' (or "
                f"'sub_answer') string; fields present: {', '.join(sorted(row)) or 'none'}"
            )
        if not text.strip():
            raise UserError(f"alternates file {path}, row {number}: the alternate answer is empty")
        bad = next((c for c in text if c in _HIDDEN_CHARACTERS), None)
        if bad is not None:
            raise UserError(f"alternates file {path}, row {number}: the alternate holds the control "
                            f"character U+{ord(bad):04X} ({_HIDDEN_CHARACTERS[bad]}), which no answer "
                            "should contain and which hides what is trained; remove it from the file")
        matches = by_question.get(question)
        if not matches:
            unknown.append(question)
            continue
        if len(matches) > 1 and isinstance(row.get("answer"), str):
            same_answer = [i for i in matches if forget_rows[i]["answer"] == row["answer"]]
            matches = same_answer or matches
        if is_rejected(text, forget_rows[matches[0]]["answer"]):
            repeats.append(matches[0])  # Δ = 0 by construction: the pair trains nothing
            continue
        alternates[matches[0]].append(text)

    if unknown:
        shown = "; ".join(repr(q[:80]) for q in list(dict.fromkeys(unknown))[:3])
        raise UserError(
            f"alternates file {path} has {len(unknown)} row(s) whose question is not in the forget "
            f"split, e.g. {shown}; use the alternates made for this forget split (--forget-split)"
        )
    missing = [i for i, alts in enumerate(alternates) if not alts]
    if missing:
        shown = "; ".join(repr(forget_rows[i]["question"][:80]) for i in missing[:3])
        only_repeats = sum(1 for i in missing if i in set(repeats))
        why = (f" ({only_repeats} of them had only alternates that repeat the forget answer, which "
               "train nothing and were dropped)" if only_repeats else "")
        raise UserError(
            f"alternates file {path} has no usable alternate for {len(missing)} of "
            f"{len(forget_rows)} forget questions{why}, e.g. {shown}; every forget question needs "
            "at least one alternate that differs from its answer (make them with "
            "`altpo-fast generate-alternates`)"
        )
    _DROPPED_NOTES.pop(str(path), None)
    if repeats:
        _DROPPED_NOTES[str(path)] = (
            f"alternates file {path}: dropped {len(repeats)} of {len(rows)} alternates that repeat "
            f"their forget answer ({len(set(repeats))} question(s)); such a pair trains nothing")
    return alternates


# characters an answer never holds and that hide what a file says (NUL; bidirectional overrides)
_HIDDEN_CHARACTERS = {"\x00": "NUL", "\u202a": "LEFT-TO-RIGHT EMBEDDING",
                      "\u202b": "RIGHT-TO-LEFT EMBEDDING", "\u202c": "POP DIRECTIONAL FORMATTING",
                      "\u202d": "LEFT-TO-RIGHT OVERRIDE", "\u202e": "RIGHT-TO-LEFT OVERRIDE",
                      "\u2066": "LEFT-TO-RIGHT ISOLATE", "\u2067": "RIGHT-TO-LEFT ISOLATE",
                      "\u2068": "FIRST STRONG ISOLATE", "\u2069": "POP DIRECTIONAL ISOLATE"}

# path -> what load_alternates dropped, for the run's log (dropped_alternates_note)
_DROPPED_NOTES: dict[str, str] = {}


def dropped_alternates_note(path) -> str | None:
    """What the last :func:`load_alternates` of ``path`` dropped (alternates that repeat the answer)."""
    return _DROPPED_NOTES.get(str(Path(os.path.expanduser(str(path)))))


# ------------------------------------------------------------------------------------------------
# chat-template tokenisation


@dataclass(frozen=True)
class ChatFormat:
    """How a question is wrapped: the system prompt (None: no system message) and date string."""

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    date_string: str | None = DEFAULT_DATE_STRING

    def messages(self, question: str, answer: str | None = None) -> list[dict]:
        msgs = []
        if self.system_prompt is not None:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def template_kwargs(self) -> dict:
        return {} if self.date_string is None else {"date_string": self.date_string}


@dataclass
class EncodedQA:
    """One tokenised (question, answer): labels equal ``input_ids`` on answer tokens, else -100."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def check_chat_template(tokenizer, name: str = "the tokenizer") -> None:
    """Raise a clear error when ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{name} has no chat template; AltPO formats every row with the model's chat template. "
            "Use an instruct model's tokenizer (--tokenizer) or set tokenizer.chat_template"
        )


def chat_prompt_text(tokenizer, question: str, fmt: ChatFormat = ChatFormat()) -> str:
    """The chat-formatted prompt, ending where the assistant's answer begins (for generation)."""
    return tokenizer.apply_chat_template(fmt.messages(question), tokenize=False,
                                         add_generation_prompt=True, **fmt.template_kwargs())


def _split_texts(tokenizer, question: str, answer: str, fmt: ChatFormat) -> tuple[str, str]:
    prompt = chat_prompt_text(tokenizer, question, fmt)
    full = tokenizer.apply_chat_template(fmt.messages(question, answer), tokenize=False,
                                         add_generation_prompt=False, **fmt.template_kwargs())
    if not full.startswith(prompt):
        raise UserError(
            "the tokenizer's chat template renders a conversation with an answer differently from "
            "the same conversation's generation prompt, so the answer tokens cannot be located; "
            "use a template whose generation prompt is a prefix of the full conversation"
        )
    return prompt, full[len(prompt):]


def encode_qa(tokenizer, question: str, answer: str, *, fmt: ChatFormat = ChatFormat(),
              max_length: int | None = None) -> EncodedQA:
    """Token ids of the chat-formatted (question, answer) and labels on the answer part only.

    The answer part is everything the template adds after the generation prompt: the answer text
    and the end-of-turn token (``<|eot_id|>`` for Llama-3). Prompt and answer part are tokenised
    separately, so labels cover exactly the answer part's tokens. ``max_length`` cuts the sequence
    (labels included) to that many tokens and sets ``truncated``.
    """
    return encode_qa_batch(tokenizer, [(question, answer)], fmt=fmt, max_length=max_length)[0]


def encode_qa_batch(tokenizer, pairs: Sequence[tuple[str, str]], *, fmt: ChatFormat = ChatFormat(),
                    max_length: int | None = None) -> list[EncodedQA]:
    """:func:`encode_qa` for many pairs with one batched tokenizer call per part."""
    check_chat_template(tokenizer)
    if not pairs:
        return []
    texts = [_split_texts(tokenizer, q, a, fmt) for q, a in pairs]
    prompt_ids = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([a for _, a in texts], add_special_tokens=False)["input_ids"]
    out = []
    for p, a in zip(prompt_ids, answer_ids):
        ids = list(p) + list(a)
        labels = [IGNORE_INDEX] * len(p) + list(a)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(EncodedQA(ids, labels, truncated))
    return out


# ------------------------------------------------------------------------------------------------
# the AltPO data set


@dataclass
class AltPOData:
    """Tokenised AltPO data: forget answers, alternates (one per pair) and retain rows.

    Pair ``p`` has the alternate ``alternates[p]`` (chosen) and the forget answer
    ``forget[pair_question[p]]`` (rejected). Pairs are ordered by forget question, then by the
    alternates file's order.
    """

    forget: list[EncodedQA]
    alternates: list[EncodedQA]
    pair_question: list[int]
    retain: list[EncodedQA]
    truncated: dict[str, int] = field(default_factory=dict)
    # pairs whose alternate text differs from the forget answer but whose tokens (after the cut to
    # max_length) are the same: their forget term is 0 with zero gradient
    same_tokens: int = 0
    # a token id hidden as an attention key inside every sequence, or None (the default):
    # ``--numerics open-unlearning`` with pad = eos sets the eos id (see open_unlearning_masked_id)
    masked_key_id: int | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.alternates)

    def reference_fingerprint(self) -> str:
        """sha256 of every token and label the reference log-probs depend on (forget, alternates)."""
        h = hashlib.sha256()
        for name, seqs in (("forget", self.forget), ("alternates", self.alternates)):
            h.update(f"{name}:{len(seqs)};".encode())
            for s in seqs:
                h.update(json.dumps([s.input_ids, s.labels], separators=(",", ":")).encode())
        h.update(json.dumps(self.pair_question).encode())
        if self.masked_key_id is not None:  # the reference's attention hides this token
            h.update(f"masked-key:{self.masked_key_id}".encode())
        return h.hexdigest()


def build_altpo_data(tokenizer, forget_rows: Sequence[dict], alternates: Sequence[Sequence[str]],
                     retain_rows: Sequence[dict], *, fmt: ChatFormat = ChatFormat(),
                     max_length: int | None = 512) -> AltPOData:
    """Tokenise forget rows, their alternates (from :func:`load_alternates`) and retain rows."""
    if len(alternates) != len(forget_rows):
        raise ValueError(f"alternates has {len(alternates)} entries for {len(forget_rows)} forget rows")
    forget = encode_qa_batch(tokenizer, [(r["question"], r["answer"]) for r in forget_rows],
                             fmt=fmt, max_length=max_length)
    pair_question = [q for q, alts in enumerate(alternates) for _ in alts]
    alt_pairs = [(forget_rows[q]["question"], a) for q, alts in enumerate(alternates) for a in alts]
    alt = encode_qa_batch(tokenizer, alt_pairs, fmt=fmt, max_length=max_length)
    retain = encode_qa_batch(tokenizer, [(r["question"], r["answer"]) for r in retain_rows],
                             fmt=fmt, max_length=max_length)
    truncated = {
        "forget": sum(s.truncated for s in forget),
        "alternates": sum(s.truncated for s in alt),
        "retain": sum(s.truncated for s in retain),
    }
    same_tokens = sum(1 for p, (_, text) in enumerate(alt_pairs)
                      if text != forget_rows[pair_question[p]]["answer"]
                      and alt[p].input_ids == forget[pair_question[p]].input_ids
                      and alt[p].labels == forget[pair_question[p]].labels)
    return AltPOData(forget, alt, pair_question, retain, truncated, same_tokens)


def truncation_report(data: AltPOData, max_length: int | None) -> str | None:
    """A one-line note on how many sequences ``max_length`` cut, or None when none were cut."""
    if not any(data.truncated.values()):
        return None
    same = (f"; it cuts {data.same_tokens} of {data.num_pairs} alternates to the same tokens as "
            "their forget answer: those pairs carry no gradient (raise --max-length to keep where "
            "they differ)") if data.same_tokens else ""
    sizes = {"forget": len(data.forget), "alternates": len(data.alternates), "retain": len(data.retain)}
    parts = ", ".join(f"{n} of {sizes[k]} {k}" for k, n in data.truncated.items() if n)
    return f"--max-length {max_length} cut {parts} sequences (their answers lose the cut tokens){same}"


def texts_for_tokenizer(rows: Iterable[dict], alternates: Iterable[Iterable[str]] = ()) -> list[str]:
    """All question and answer texts, e.g. to train a tiny tokenizer on the data it will see."""
    out = []
    for row in rows:
        out += [row["question"], row["answer"]]
    for alts in alternates:
        out += list(alts)
    return out
