"""Which implementation runs an op: ``auto``, ``triton``, ``cuda`` (C++ extension) or ``torch``."""

from __future__ import annotations

import functools
import logging

import torch

from xgblora_fast.ops._native import native_module

logger = logging.getLogger("xgblora_fast")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when the Triton kernels were imported under ``TRITON_INTERPRET=1``."""
    if not triton_importable():
        return False
    from xgblora_fast.kernels.runtime import INTERPRET

    return INTERPRET


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``triton``/``cuda``/``torch``) for tensors on ``device``.

    Raises RuntimeError, before any kernel runs, when the requested backend cannot run there.
    """
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if not on_cuda:
            return "torch"
        if triton_importable() and not triton_interpreting():
            return "triton"
        return "cuda" if native_module() is not None else "torch"
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' requested but Triton is not installed")
        if on_cuda and triton_interpreting():
            raise RuntimeError("backend='triton' on CUDA tensors but TRITON_INTERPRET=1 is set")
        if not on_cuda and not triton_interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                "before importing xgblora_fast to run the kernels on CPU in the interpreter"
            )
        return "triton"
    # backend == "cuda"
    if native_module() is None:
        raise RuntimeError(
            "backend='cuda' needs the CUDA C++ extension, which is not built "
            "(see the README: XGBLORA_FAST_BUILD_CUDA=1 pip install -e .)"
        )
    if not on_cuda:
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    return "cuda"
