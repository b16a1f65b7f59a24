"""Test-session setup shared by every test file.

Without a CUDA device the Triton kernels run under Triton's interpreter, which must be switched on
before triton is first imported, so it is set here, ahead of any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paths import REPO_ROOT, SHARED_TOFU  # noqa: E402,F401  (tests/ is on sys.path: conftest lives there)


@pytest.fixture
def tofu_dir():
    """The shared TOFU folder; tests that need it skip when it is absent."""
    if not (SHARED_TOFU / "forget01.json").exists():
        pytest.skip(f"shared TOFU data not found at {SHARED_TOFU}")
    return SHARED_TOFU


def kernel_device() -> str:
    """Where kernel tests run: CUDA when present (the GPU suite), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
