"""Test-session setup shared by every test file.

Without a CUDA device the Triton kernels run under Triton's interpreter, which must be switched on
before triton is first imported, so it is set here, ahead of any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import REPO_ROOT, TOFU_FIXTURE, build_model_folder  # noqa: E402,F401  (tests/ is on sys.path)


@pytest.fixture(scope="session")
def tofu_dir():
    """The TOFU fixture in the repository (fixtures/tofu): never absent, so no test skips for data."""
    return TOFU_FIXTURE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The trainer tests' tiny Llama (helpers.build_model_folder), built once per test module; a
    module that needs another model defines its own ``model_dir``."""
    return build_model_folder(TOFU_FIXTURE, tmp_path_factory.mktemp("tiny_tofu_model"))


def kernel_device() -> str:
    """Where kernel tests run: CUDA when present (the GPU suite), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
