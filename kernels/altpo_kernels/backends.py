"""Backend selection: one name in, one module implementing the backend interface out."""

from __future__ import annotations

import os

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device) -> str:
    """Turn ``"auto"`` into a concrete backend for tensors on ``device`` and check the choice."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError('backend="triton" needs the triton package: pip install triton')
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f'backend="triton" got tensors on {device}; move them to a CUDA device, set '
                'TRITON_INTERPRET=1 (before importing triton) to run the kernels on the CPU, '
                'or use backend="torch"'
            )
    if backend == "cuda":
        # Never chosen by "auto": it needs the library built from kernels/csrc.
        if device.type != "cuda":
            raise ValueError(
                f'backend="cuda" runs its epilogue kernels on CUDA tensors, got tensors on {device}; '
                'move them to a GPU, or use backend="torch" on the CPU'
            )
        from .cuda_backend import load_library

        load_library("cuda")  # raises an error naming the build command when it is missing
    return backend


def backend_module(name: str):
    """The module implementing the backend interface (see ``torch_chunked``'s docstring)."""
    if name == "torch":
        from . import torch_chunked

        return torch_chunked
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend
    if name == "cuda":
        from . import cuda_backend

        return cuda_backend
    raise ValueError(f"no fused implementation for backend {name!r}")
