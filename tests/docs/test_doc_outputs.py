"""The docs show what the commands print today.

Every generated block (``<!-- output of: CMD -->`` followed by a fence) whose command is cheap and
deterministic on a CPU (the memory plans, the ``--help`` excerpts) is rerun and compared with the
docs text, through the same extraction and runner that scripts/refresh_docs.py refreshes them
with. Numbers the docs quote in prose from such commands are checked against the code too.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
import sys

import pytest
from paths import REPO_ROOT


def _refresh_docs():
    spec = importlib.util.spec_from_file_location("refresh_docs", REPO_ROOT / "scripts" / "refresh_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("refresh_docs", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


refresh_docs = _refresh_docs()
CHEAP = [b for b in refresh_docs.find_blocks() if refresh_docs.is_cheap(b)]


def test_the_cheap_blocks_are_found():
    """The extraction sees the blocks the docs have (a changed marker would silently check nothing)."""
    plans = [b for b in CHEAP if b.command.startswith("altpo-fast plan")]
    assert len({b.command for b in plans}) >= 5
    assert {b.path.name for b in plans} == {"memory-plan.md"}
    assert any(b.command.split("|")[0].rstrip().endswith("--help") for b in CHEAP)
    # the demo's runs train models: they are not among the cheap ones (its --help is)
    assert not any(b.command.startswith("altpo-fast demo") and "--help" not in b.command for b in CHEAP)
    assert any(b.command.startswith("altpo-fast demo --help") for b in CHEAP)
    # every marker in the docs is one the extraction reads (no fence-less or misspelled marker)
    for pattern in refresh_docs.DOCS:
        for path in REPO_ROOT.glob(pattern):
            text = path.read_text(encoding="utf-8")
            assert text.count("<!-- output of:") == len(list(refresh_docs.MARK.finditer(text))), path


@pytest.mark.parametrize("block", CHEAP, ids=[f"{b.path.name}:{b.command[:60]}" for b in CHEAP])
def test_documented_output_is_what_the_command_prints(block, tmp_path):
    now = refresh_docs.run_command(block.command, tmp_path)
    if now != block.body:
        diff = "".join(difflib.unified_diff(block.body.splitlines(True), now.splitlines(True),
                                            "documented", "printed now"))
        pytest.fail(f"{block.path.relative_to(REPO_ROOT)}: `{block.command}` prints something else "
                    f"now; run `python scripts/refresh_docs.py --cheap`:\n{diff}")


def _python_api_block() -> str:
    text = (REPO_ROOT / "docs" / "memory-plan.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_memory_plan_python_api_comments_are_what_the_code_gives():
    """docs/memory-plan.md's API example: each `EXPR  # VALUES` line whose comment is a literal
    states what EXPR evaluates to, run here as written."""
    code = _python_api_block()
    scope: dict = {}
    checked = 0
    for line in code.splitlines():
        expr, _, comment = line.partition("#")
        try:
            want = ast.literal_eval(comment.strip()) if comment.strip() else None
        except (ValueError, SyntaxError):
            want = None
        if want is None:
            if not line.lstrip().startswith("print("):
                exec(expr, scope)  # imports and the plan itself
            continue
        got = eval(expr, scope)
        assert got == want, f"docs/memory-plan.md says `{expr.strip()}` is {want!r}; the code gives {got!r}"
        checked += 1
    assert checked >= 2


# Paths the docs name that belong to another project, not this repository.
OTHER_PROJECTS = {"scripts/tofu_unlearn.sh": "open-unlearning's launch script (docs/methods.md)"}
REPO_PATH = re.compile(r"(?<![\w/.-])((?:tests|scripts|benchmarks|examples|altpo|kernels|fixtures)/[\w./-]*\w\.(?:py|sh|json|md))")


def test_every_repository_path_the_docs_name_exists():
    """Test files, scripts and modules named in the docs are where the docs say (tests moved into
    folders once and the docs kept the flat paths)."""
    missing = []
    for pattern in refresh_docs.DOCS:
        for path in sorted(REPO_ROOT.glob(pattern)):
            for m in REPO_PATH.finditer(path.read_text(encoding="utf-8")):
                name = m.group(1)
                if name not in OTHER_PROJECTS and not (REPO_ROOT / name).exists():
                    missing.append(f"{path.relative_to(REPO_ROOT)}: {name}")
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(missing)
