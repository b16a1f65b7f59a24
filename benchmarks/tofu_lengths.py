"""Token lengths of the TOFU rows an AltPO step trains on, under the Llama-3 chat template.

The step benchmark needs realistic sequence lengths, not the text. This module measures them from
a local TOFU folder with a Llama-3 tokenizer and writes a table of integers (prompt and answer
token counts per row, plus summary statistics) to ``benchmarks/tofu_lengths.json``; the table is
committed, so the benchmark runs where neither the data nor the tokenizer is available. No TOFU
text is stored.

    python -m benchmarks.tofu_lengths --tofu PATH/TO/TOFU --tokenizer PATH/tokenizer.json

``--tokenizer`` takes a ``tokenizer.json`` file, a local tokenizer folder, or a hub name such as
``meta-llama/Llama-3.2-1B-Instruct`` (where the hub is reachable). The prompt is the Llama-3 chat
template with the system prompt "You are a helpful assistant." and the date "10 Apr 2025" (the
project's seed setup, docs/design.md section 2) ending in the assistant header; the answer is the
answer text plus ``<|eot_id|>``, which is what the loss is taken on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.exit("run it as a module from the repository root: python -m benchmarks.tofu_lengths --help")

TABLE_PATH = Path(__file__).resolve().parent / "tofu_lengths.json"
ALTERNATES = "alternates/llama3.2-3b-instruct/forget10/alt5_seed_0.json"
SYSTEM_PROMPT = "You are a helpful assistant."
DATE_STRING = "10 Apr 2025"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tokenizer(spec: str):
    """A transformers tokenizer from a tokenizer.json file, a folder, or a hub name."""
    from transformers import PreTrainedTokenizerFast

    from altpo.model.tiny_llama import LLAMA3_CHAT_TEMPLATE

    path = Path(spec)
    if path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>",
                                      eos_token="<|eot_id|>")
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    # The project's copy of the Llama-3 layout, so a tokenizer file without a template (or with
    # an older one lacking the date line) still measures the prompt the trainer builds.
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    for special in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        if tok.convert_tokens_to_ids(special) in (None, tok.unk_token_id):
            raise SystemExit(f"tokenizer {spec} has no {special} token: it is not a Llama-3 tokenizer")
    return tok


def _prompt_len(tok, question: str) -> int:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  date_string=DATE_STRING)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def _answer_len(tok, answer: str) -> int:
    return len(tok(answer, add_special_tokens=False)["input_ids"]) + 1  # + <|eot_id|>


def _stats(values: list[int]) -> dict:
    ordered = sorted(values)
    return {
        "count": len(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "min": ordered[0],
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
    }


def measure(tofu: Path, tokenizer_spec: str) -> dict:
    """Measure the length table from a TOFU folder (forget10, its alternates, retain90)."""
    for name in ("forget10.json", "retain90.json", ALTERNATES):
        if not (tofu / name).exists():
            raise SystemExit(f"{tofu / name} not found: point --tofu at a TOFU folder with it")
    tok = load_tokenizer(tokenizer_spec)
    forget = _read_jsonl(tofu / "forget10.json")
    retain = _read_jsonl(tofu / "retain90.json")
    alternates = _read_jsonl(tofu / ALTERNATES)
    question_index = {row["question"]: i for i, row in enumerate(forget)}

    def table(rows):
        return {"prompt": [_prompt_len(tok, r["question"]) for r in rows],
                "answer": [_answer_len(tok, r["answer"]) for r in rows]}

    forget_t, retain_t = table(forget), table(retain)
    alt_field = "sub_answer" if "sub_answer" in alternates[0] else "alternate"
    missing = [r["question"][:60] for r in alternates if r["question"] not in question_index]
    if missing:
        raise SystemExit(f"{len(missing)} alternates match no forget10 question, e.g. {missing[0]!r}")
    alt_t = {"question_index": [question_index[r["question"]] for r in alternates],
             "answer": [_answer_len(tok, r[alt_field]) for r in alternates]}

    def seq(t):
        return [p + a for p, a in zip(t["prompt"], t["answer"])]

    alt_seq = [forget_t["prompt"][q] + a for q, a in zip(alt_t["question_index"], alt_t["answer"])]
    return {
        "what": "Token counts of TOFU rows (no text): prompt = Llama-3 chat template with system "
                f"prompt {SYSTEM_PROMPT!r}, date {DATE_STRING!r}, ending in the assistant header; "
                "answer = answer tokens + <|eot_id|>.",
        # a local file's path says nothing on another machine: record what it is instead
        "tokenizer": (f"Llama-3 tokenizer.json ({len(tok)} ids)" if Path(tokenizer_spec).is_file()
                      else tokenizer_spec),
        "vocab_size": len(tok),
        "sources": {"forget10": "forget10.json", "retain90": "retain90.json", "alternates": ALTERNATES},
        "forget10": forget_t,
        "alternates": alt_t,
        "retain90": retain_t,
        "stats": {
            "forget10_sequence": _stats(seq(forget_t)),
            "forget10_answer": _stats(forget_t["answer"]),
            "alternate_sequence": _stats(alt_seq),
            "alternate_answer": _stats(alt_t["answer"]),
            "retain90_sequence": _stats(seq(retain_t)),
            "retain90_answer": _stats(retain_t["answer"]),
        },
    }


def load_table(path: Path = TABLE_PATH) -> dict:
    """The committed length table (see the module docstring for how it was made)."""
    if not path.exists():
        raise FileNotFoundError(f"length table {path} is missing: run python -m benchmarks.tofu_lengths")
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    for key in ("forget10", "alternates", "retain90"):
        if key not in table:
            raise ValueError(f"length table {path} has no {key!r} section: regenerate it")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tofu", type=Path, required=True,
                        help="a whole TOFU folder (JSON Lines splits and alternates/ with "
                             f"{ALTERNATES}); the repository's fixtures/tofu is only a part of it")
    parser.add_argument("--tokenizer", required=True,
                        help="a Llama-3 tokenizer: tokenizer.json file, local folder or hub name")
    parser.add_argument("--out", type=Path, default=TABLE_PATH, help="where to write the table")
    args = parser.parse_args(argv)
    table = measure(args.tofu, args.tokenizer)
    args.out.write_text(json.dumps(table, separators=(",", ":")) + "\n", encoding="utf-8")
    for name, s in table["stats"].items():
        print(f"{name:22s} mean {s['mean']:7.1f}  median {s['median']:5}  p90 {s['p90']:5}  max {s['max']:5}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
