"""What the Triton kernels need to know about where they run.

``INTERPRET`` is read once, at import, exactly as Triton reads ``TRITON_INTERPRET`` at
``@triton.jit`` time: set the variable before importing ``xgblora_fast`` to run the kernels on
CPU tensors (that is how the tests run them).
"""

from __future__ import annotations

import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_capability() -> int | None:
    """Compute capability of the current CUDA device as an int (80, 90, ...), or None."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what cuBLAS would do for this dtype in PyTorch."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
