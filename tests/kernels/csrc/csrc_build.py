"""Builds kernels/csrc for the tests: the host library always (cmake and a C++ compiler), the CUDA
library where nvcc is found. Incremental: a second call costs about a second."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from paths import REPO_ROOT

HOST_BUILD = REPO_ROOT / "build" / "pytest-host"
CUDA_BUILD = REPO_ROOT / "build"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _build(build_dir: Path, target: str, cuda: str) -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH: the kernels/csrc libraries cannot be built here")
    if not (build_dir / "CMakeCache.txt").exists():
        _run(["cmake", "-S", str(REPO_ROOT), "-B", str(build_dir), f"-DALTPO_CSRC_CUDA={cuda}"])
    _run(["cmake", "--build", str(build_dir), "--target", target, "-j", "2"])


def host_library() -> Path:
    """build/pytest-host/libaltpo_csrc_host.so, built (or brought up to date) now."""
    _build(HOST_BUILD, "altpo_csrc_host", "OFF")
    return HOST_BUILD / "libaltpo_csrc_host.so"


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def cuda_library() -> Path:
    """build/libaltpo_csrc.so (what scripts/build_csrc.sh builds), built now if nvcc is present."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin): the CUDA library cannot be built here")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH: the kernels/csrc libraries cannot be built here")
    # Configured every time (about a second): the tree may have been configured with the CUDA
    # library off, and a CUDA compiler named once stays in the cache.
    _run(["cmake", "-S", str(REPO_ROOT), "-B", str(CUDA_BUILD), "-DALTPO_CSRC_CUDA=ON",
          f"-DCMAKE_CUDA_COMPILER={compiler}"])
    _run(["cmake", "--build", str(CUDA_BUILD), "--target", "altpo_csrc", "-j", "2"])
    return CUDA_BUILD / "libaltpo_csrc.so"


def cuobjdump() -> str | None:
    """cuobjdump from PATH, next to nvcc, or from the triton wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    compiler = nvcc()
    if compiler and (Path(compiler).parent / "cuobjdump").exists():
        return str(Path(compiler).parent / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    wheel = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(wheel) if wheel.exists() else None


@contextlib.contextmanager
def backend_library(device: str):
    """Point altpo_kernels.cuda_backend at the freshly built library for ``device`` (the host build
    on the CPU, the CUDA build on a GPU) and yield it loaded; restores the previous state after."""
    from altpo_kernels import cuda_backend

    kind = "host" if device == "cpu" else "cuda"
    env = cuda_backend.LIBRARY_ENV[kind]
    path = host_library() if kind == "host" else cuda_library()
    saved, saved_loaded = os.environ.get(env), dict(cuda_backend._LOADED)
    os.environ[env] = str(path)
    cuda_backend._LOADED.clear()
    try:
        yield cuda_backend.load_library(kind)
    finally:
        cuda_backend._LOADED.clear()
        cuda_backend._LOADED.update(saved_loaded)
        if saved is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = saved


@pytest.fixture(scope="module", autouse=True)
def backend_library_for_module():
    """For test modules that import it: the backend library of the kernel test device (host build
    on the CPU, CUDA build on a GPU), loaded for the whole module."""
    from conftest import kernel_device

    with backend_library(kernel_device()) as lib:
        yield lib
