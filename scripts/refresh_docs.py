"""Regenerate the command outputs that the docs show, from the code as it runs today.

A doc marks each generated block with the command that makes it:

    <!-- output of: altpo-fast plan --model llama-3.2-1b --gpu-memory 16GiB -->
    ```text
    ...what the command printed...
    ```

This script runs every such command (or those whose text contains ``--only``) with bash, from a
scratch folder so that their outputs (``--output demo-out`` and the like) land there, and puts
what the command printed on stdout in the block. A block that quotes part of an output says so in
its command (``altpo-fast plan ... | sed -n '/^fits:/,$p'``). It is the one refresher of every
generated block: the demo's outputs, the memory plans, the ``--help`` texts. Progress bars and notes go to stderr and are left out.
Below each block it writes the versions it ran with (``Made with: torch ..., transformers ...``),
since numbers such as the demo's depend on them; make them with the locked set (constraints.txt,
which scripts/with-env.sh installs).

    bash scripts/with-env.sh python scripts/refresh_docs.py             # every block
    bash scripts/with-env.sh python scripts/refresh_docs.py --only plan # the planner's blocks
    bash scripts/with-env.sh python scripts/refresh_docs.py --check     # fail if a block is stale
    bash scripts/with-env.sh python scripts/refresh_docs.py --check --cheap  # plans and --help only

``--check`` runs the commands and exits 1 listing the blocks whose text differs. ``--cheap`` keeps
the blocks whose output is deterministic and takes seconds on a CPU (the memory plans and the
``--help`` texts: :func:`is_cheap`); tests/docs runs those through :func:`stale_blocks`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- output of: (?P<cmd>.+?) -->\n```(?P<lang>\w*)\n(?P<body>.*?)```\n", re.S)
DOCS = ("README.md", "docs/*.md", "benchmarks/README.md")
VERSIONS_OF = ("torch", "transformers", "tokenizers", "triton", "numpy", "scipy")
VERSIONS_LINE = re.compile(r"\A\n?Made with: [^\n]*\n")


def versions_line() -> str:
    """The versions a block was made with, as the line the docs show under it."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in VERSIONS_OF:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"Made with: {', '.join(parts)}, Python {platform.python_version()}, {platform.machine()}.\n"


@dataclass
class Block:
    path: Path
    command: str
    body: str


def find_blocks(only: str | None = None) -> list[Block]:
    """Every marked block of the docs, in file order."""
    blocks = []
    for pattern in DOCS:
        for path in sorted(ROOT.glob(pattern)):
            for m in MARK.finditer(path.read_text(encoding="utf-8")):
                if only is None or only in m["cmd"]:
                    blocks.append(Block(path, m["cmd"], m["body"]))
    return blocks


def is_cheap(block: Block) -> bool:
    """A block whose command is deterministic and fast on a CPU: a memory plan or a --help text
    (the demo's blocks train models and take minutes)."""
    return block.command.startswith("altpo-fast plan ") or block.command.split("|")[0].rstrip().endswith("--help")


def run_command(command: str, workdir: Path) -> str:
    """What ``command`` prints on stdout, run by bash in ``workdir`` with this Python's tools first
    on PATH; a failing command stops the refresh with its stderr."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="100")
    proc = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode not in (0, 1):  # the demo exits 1 when forgetting did not hold: still output
        raise SystemExit(f"`{command}` failed with exit status {proc.returncode}:\n{proc.stderr[-3000:]}")
    text = proc.stdout
    return text if text.endswith("\n") else text + "\n"


def stale_blocks(blocks: list[Block], workdir: Path) -> list[tuple[Block, str]]:
    """``(block, what its command prints now)`` for each block whose text differs."""
    stale = []
    for block in blocks:
        print(f"running: {block.command}  ({block.path.relative_to(ROOT)})", file=sys.stderr, flush=True)
        new = run_command(block.command, workdir)
        if new != block.body:
            stale.append((block, new))
    return stale


def rewrite(block: Block, new: str) -> None:
    """Put ``new`` in the block's fence, with the versions line under it."""
    text = block.path.read_text(encoding="utf-8")
    old = f"<!-- output of: {block.command} -->\n```"
    start = text.index(old)
    lang_end = text.index("\n", start + len(old)) + 1
    end = text.index("```\n", lang_end) + len("```\n")
    rest = VERSIONS_LINE.sub("", text[end:], count=1)
    block.path.write_text(text[:lang_end] + new + "```\n\n" + versions_line() + rest, encoding="utf-8")


def refresh(only: str | None = None, check: bool = False, cheap: bool = False) -> list[Block]:
    """Run the blocks' commands; rewrite the docs (or, with ``check``, only compare). Returns the
    blocks whose text was out of date."""
    blocks = [b for b in find_blocks(only) if is_cheap(b) or not cheap]
    with tempfile.TemporaryDirectory(prefix="altpo-docs-") as tmp:
        stale = stale_blocks(blocks, Path(tmp))
    if not check:
        for block, new in stale:
            rewrite(block, new)
    return [block for block, _ in stale]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="refresh only the blocks whose command contains this text")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    parser.add_argument("--cheap", action="store_true",
                        help="only the deterministic blocks that take seconds (memory plans, --help texts)")
    args = parser.parse_args(argv)
    stale = refresh(args.only, args.check, args.cheap)
    for block in stale:
        print(f"{'stale' if args.check else 'refreshed'}: {block.path.relative_to(ROOT)}: {block.command}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
