"""Writes the small TOFU fixture that the tests, the README's tiny training and the examples use
(``fixtures/tofu/``) from a full copy of TOFU in its hub layout (JSON Lines split files).

    python scripts/make_tofu_fixture.py --source PATH/TO/TOFU --logs PATH/TO/eval_logs

The fixture keeps whole splits where they are small (forget01 and forget10 with their perturbed
splits, holdout01/10, real authors, world facts, the idk answers, one alternates file) and cuts the
large ones to their first rows (retain, full). The published open-unlearning logs keep every
per-row number and the first 40 rows of each ROUGE metric (generations are most of their bytes).
What was cut is listed in fixtures/tofu/SOURCES.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "tofu"
WHOLE = ("forget01", "forget01_perturbed", "forget10", "forget10_perturbed", "holdout01", "holdout10",
         "real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed")
RETAIN_ROWS = 200          # retain90 / retain99 prefixes (the same rows: retain is the head of full)
RETAIN_PERTURBED_ROWS = 40
ROUGE_ROWS = 40
ALTERNATES = "alternates/llama2-7b/forget01/alt5_seed_0.json"
LOGS = ("tofu_Llama-3.2-1B-Instruct_retain90/TOFU_EVAL.json",
        "tofu_Llama-3.2-1B-Instruct_retain90/TOFU_SUMMARY.json",
        "tofu_Llama-3.2-1B-Instruct_full/evals_forget10/TOFU_EVAL.json",
        "tofu_Llama-3.2-1B-Instruct_full/evals_forget10/TOFU_SUMMARY.json")


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _trim_log(entry: dict) -> dict:
    rows = entry.get("value_by_index")
    if rows and any("generation" in r for r in rows.values() if isinstance(r, dict)):
        entry = dict(entry, value_by_index={k: rows[k] for k in list(rows)[:ROUGE_ROWS]})
    return entry


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True, help="a full TOFU folder (hub layout, JSON Lines)")
    p.add_argument("--logs", type=Path, help="open-unlearning's published eval_logs folder (default: SOURCE/eval_logs)")
    args = p.parse_args(argv)
    src, logs = args.source, args.logs or args.source / "eval_logs"
    for split in WHOLE:
        _write_lines(OUT / f"{split}.json", _lines(src / f"{split}.json"))
    retain = _lines(src / "retain99.json")[:RETAIN_ROWS]
    _write_lines(OUT / "retain99.json", retain)
    _write_lines(OUT / "retain90.json", retain)
    # full = retain rows then forget rows, as in TOFU (its last rows are forget10, whose last are forget01)
    _write_lines(OUT / "full.json", retain + _lines(src / "forget10.json"))
    _write_lines(OUT / "retain_perturbed.json", _lines(src / "retain_perturbed.json")[:RETAIN_PERTURBED_ROWS])
    shutil.copyfile(src / "idontknow.jsonl", OUT / "idontknow.jsonl")
    _write_lines(OUT / ALTERNATES, _lines(src / ALTERNATES))
    for rel in LOGS:
        data = json.loads((logs / rel).read_text())
        if rel.endswith("TOFU_EVAL.json"):
            data = {k: _trim_log(v) if isinstance(v, dict) else v for k, v in data.items()}
        dest = OUT / "eval_logs" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
