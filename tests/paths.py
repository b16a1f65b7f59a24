"""Where the tests find the repository and the shared TOFU data, from any test folder."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TOFU = REPO_ROOT.parent / "shared" / "data" / "tofu"
