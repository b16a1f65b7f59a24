"""A built-in method is one registry entry: its name is written in at most three source files.

Those files are the registry (``kernels/altpo_kernels/methods.py``), the open-unlearning presets
(``altpo/train/method_settings.py``) and the demo's recipes (``altpo/demo/methods.py``). Every
other layer (kernel API, trainer, flags, help texts) reads the record, so adding a method does not
reach into them. Tests and docs are not counted: they list methods on purpose.
"""

import ast
from pathlib import Path

import pytest

from altpo_kernels.methods import REGISTRY
from helpers import REPO_ROOT

SOURCE_FOLDERS = ("altpo", "kernels/altpo_kernels", "benchmarks", "scripts", "examples")
MOST_FILES = 3


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
            found.update(node.value.replace(",", " ").split())  # "npo,simnpo" and prose alike
    return found


def _source_files() -> list[Path]:
    files = []
    for folder in SOURCE_FOLDERS:
        root = REPO_ROOT / folder
        if root.is_dir():
            files += sorted(root.rglob("*.py"))
    return files


def test_the_scan_sees_the_registry_itself():
    # the count below means something only if the scan finds the name where it is surely written
    registry_file = REPO_ROOT / "kernels" / "altpo_kernels" / "methods.py"
    assert registry_file in _source_files()
    assert "altpo" in _string_constants(registry_file)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_method_name_is_written_in_at_most_three_source_files(name):
    files = [p.relative_to(REPO_ROOT).as_posix() for p in _source_files()
             if name in _string_constants(p)]
    assert 1 <= len(files) <= MOST_FILES, (
        f"method {name!r} is written in {len(files)} source files: {files}; read it from the "
        "registry (altpo_kernels.methods) instead")

