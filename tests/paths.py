"""Where the tests find the repository and its TOFU fixture, from any test folder."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOFU_FIXTURE = REPO_ROOT / "fixtures" / "tofu"   # a small part of TOFU (fixtures/tofu/SOURCES.md)
