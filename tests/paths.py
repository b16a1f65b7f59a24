"""Where the tests find the repository and its TOFU fixture (kept for ``from paths import``;
the definitions live in helpers.py)."""

from helpers import REPO_ROOT, TOFU_FIXTURE  # noqa: F401
