"""Backend selection: one name in, one module implementing the backend interface out."""

from __future__ import annotations

import os

BACKENDS = ("auto", "reference", "torch", "triton")


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
    return backend


def backend_module(name: str):
    """The module implementing the backend interface (see ``torch_chunked``'s docstring)."""
    if name == "torch":
        from . import torch_chunked

        return torch_chunked
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend
    raise ValueError(f"no fused implementation for backend {name!r}")
