"""Test-session setup shared by every test file.

Without a CUDA device the Triton kernels run under Triton's interpreter, which must be switched on
before triton is first imported, so it is set here, ahead of any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paths import REPO_ROOT, TOFU_FIXTURE  # noqa: E402,F401  (tests/ is on sys.path: conftest lives there)


@pytest.fixture
def tofu_dir():
    """The TOFU fixture in the repository (fixtures/tofu): never absent, so no test skips for data."""
    return TOFU_FIXTURE


def kernel_device() -> str:
    """Where kernel tests run: CUDA when present (the GPU suite), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
