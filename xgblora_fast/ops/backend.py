"""Which implementation runs an op: ``auto``, ``triton``, ``cuda`` (C++ extension) or ``torch``."""

from __future__ import annotations

import functools
import logging

import torch

from xgblora_fast.ops._native import native_module, native_status

logger = logging.getLogger("xgblora_fast")
_announced = False


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


def _announce(chosen: str, why: str) -> str:
    """Log, once per process, which backend runs the ops on CUDA tensors and why."""
    global _announced
    if not _announced:
        _announced = True
        level = logging.WARNING if chosen == "torch" else logging.INFO
        logger.log(level, "xgblora_fast: backend %r active for CUDA tensors: %s", chosen, why)
    return chosen


def _triton_unusable_reason() -> str | None:
    if not triton_importable():
        return "Triton is not installed"
    if triton_interpreting():
        return "TRITON_INTERPRET=1 is set"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``triton``/``cuda``/``torch``) for tensors on ``device``.

    Raises RuntimeError, before any kernel runs, when the requested backend cannot run there.
    The first choice for CUDA tensors is logged once per process (logger ``xgblora_fast``).
    """
    if backend == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if not on_cuda:
            return "torch"
        no_triton = _triton_unusable_reason()
        if no_triton is None:
            return _announce("triton", "Triton is importable (auto prefers it)")
        if native_module() is not None:
            return _announce("cuda", f"{no_triton}; CUDA C++ extension: {native_status()}")
        return _announce(
            "torch",
            f"{no_triton} and the CUDA C++ extension is unavailable ({native_status()}); "
            "the PyTorch path is correct but slower",
        )
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' requested but Triton is not installed")
        if on_cuda and triton_interpreting():
            raise RuntimeError("backend='triton' on CUDA tensors but TRITON_INTERPRET=1 is set")
        if not on_cuda and device.type != "cpu":
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors in the interpreter), "
                f"got tensors on {device}"
            )
        if not on_cuda and not triton_interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                "before importing xgblora_fast to run the kernels on CPU in the interpreter"
            )
        return _announce("triton", "backend='triton' requested") if on_cuda else "triton"
    # backend == "cuda"
    if native_module() is None:
        raise RuntimeError(
            "backend='cuda' needs the CUDA C++ extension, which is not built: "
            f"{native_status()} (see the README: XGBLORA_FAST_BUILD_CUDA=1 pip install "
            "--no-build-isolation -e ., or XGBLORA_FAST_JIT_CUDA=1 for a build on first use)"
        )
    if not on_cuda:
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    return _announce("cuda", f"backend='cuda' requested; CUDA C++ extension: {native_status()}")
