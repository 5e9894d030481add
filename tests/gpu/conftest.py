"""Fixtures of the GPU tests: exact cuBLAS settings, the backends, the CUDA C++ extension.

The GPU tests need compiled Triton kernels: ``bench/gpu_check.py`` runs them in a subprocess with
``XGBLORA_FAST_GPU_TESTS=1`` (``tests/conftest.py`` then leaves ``TRITON_INTERPRET`` unset). In
the CPU suite they are collected and skipped (no CUDA device, or kernels interpreted).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from xgblora_fast.ops import _native

MATMUL_FLAGS = (
    "allow_tf32",
    "allow_fp16_reduced_precision_reduction",
    "allow_bf16_reduced_precision_reduction",
)


@pytest.fixture(autouse=True)
def exact_cuda_matmul() -> Iterator[None]:
    """IEEE fp32 GEMMs (no TF32) and fp32 split-K reductions in cuBLAS and the Triton dots.

    The tolerances are those of the dtypes (fp32 ~1e-5); TF32 alone would exceed them.
    """
    matmul = torch.backends.cuda.matmul
    saved = {name: getattr(matmul, name) for name in MATMUL_FLAGS}
    for name in MATMUL_FLAGS:
        setattr(matmul, name, False)
    yield
    for name, value in saved.items():
        setattr(matmul, name, value)


@pytest.fixture(scope="session")
def cuda_native() -> ModuleType:
    """The CUDA C++ extension: prebuilt, or built now by the JIT loader (cached, ninja).

    Skips, saying why, when it is not built and there is no CUDA toolkit to build it; fails
    when a toolkit is there and the extension still cannot be loaded.
    """
    module = _native.native_module()
    if module is None:
        why = _native.native_status()
        if _native.find_cuda_home() is None:
            pytest.skip(f"CUDA C++ extension not built and no CUDA toolkit to build it ({why})")
        pytest.fail(f"CUDA C++ extension unavailable: {why}")
    return module


@pytest.fixture(params=["triton", "cuda", "torch"])
def gpu_backend(request: pytest.FixtureRequest) -> str:
    """Each backend on CUDA tensors; ``cuda`` first loads (or builds) the C++ extension."""
    if request.param == "cuda":
        request.getfixturevalue("cuda_native")
    return request.param
