"""constraints.txt is the one locked set: exact versions of what the tests and the docs' numbers
depend on, and the docs' generated blocks say they were made with it."""

import re

from paths import REPO_ROOT

KEY_PACKAGES = ("torch", "triton", "transformers", "tokenizers", "peft", "datasets", "numpy", "scipy",
                "safetensors", "pytest")


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_key_package_is_pinned_exactly():
    pins = _locked()
    missing = [p for p in KEY_PACKAGES if p not in pins]
    assert not missing, f"constraints.txt does not lock {missing}"


def test_generated_doc_blocks_name_the_locked_versions():
    pins = _locked()
    lines = []
    for doc in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        lines += [(doc.name, m) for m in re.findall(r"^Made with: (.*)$", doc.read_text(), re.M)]
    assert lines, "no generated block says which versions made it"
    for doc, line in lines:
        for name, version in re.findall(r"([a-z][a-z0-9_-]*) ([0-9][^, ]*)", line):
            if name in pins:
                assert version.split("+")[0] == pins[name], (
                    f"{doc}: made with {name} {version}, but constraints.txt locks {pins[name]}: "
                    "rerun python scripts/refresh_docs.py in the locked environment")
