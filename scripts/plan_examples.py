"""Regenerate the `altpo-fast plan` outputs quoted in docs/memory-plan.md from the code.

Every fenced block that follows a marker line

    <!-- altpo-fast plan ARGS -->            the whole output
    <!-- altpo-fast plan ARGS (verdict) -->  the output from its "fits:" line on

is replaced with what ``altpo-fast plan ARGS`` prints now. ``--check`` changes nothing and exits 1
when a block is out of date (the tests run it).

    python scripts/plan_examples.py            # rewrite docs/memory-plan.md
    python scripts/plan_examples.py --check
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "memory-plan.md"
MARKER = re.compile(r"^<!-- altpo-fast plan (.*?)( \(verdict\))? -->\n```\n(.*?)```\n", re.M | re.S)


def plan_output(args: str, verdict_only: bool) -> str:
    from altpo import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli.main(["plan", *shlex.split(args)])
    text = buf.getvalue()
    if verdict_only:
        text = text[text.index("\nfits:") + 1:]
    return text if text.endswith("\n") else text + "\n"


def render(doc: str) -> str:
    def block(m):
        args, verdict = m.group(1), bool(m.group(2))
        return f"<!-- altpo-fast plan {args}{m.group(2) or ''} -->\n```\n{plan_output(args, verdict)}```\n"

    return MARKER.sub(block, doc)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doc = DOC.read_text()
    new = render(doc)
    if "--check" in argv:
        if new != doc:
            print(f"{DOC} quotes plans the code no longer gives: run python scripts/plan_examples.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
