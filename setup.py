"""Build script: metadata lives in pyproject.toml; this file is for native extensions.

``XGBLORA_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`` also compiles the CUDA C++
fallback in ``csrc/`` into ``xgblora_fast._C`` (torch's ``CUDAExtension``, built with ninja). It
needs torch in the build environment (hence ``--no-build-isolation``) and a CUDA toolkit
(``CUDA_HOME``; without a GPU also ``TORCH_CUDA_ARCH_LIST``, e.g. ``"8.0;9.0"``). Without the
variable the package is pure Python and installs with no toolkit at all.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent


def _native_config():
    """``xgblora_fast/ops/_native.py`` loaded on its own (sources, flags, toolkit lookup)."""
    spec = importlib.util.spec_from_file_location(
        "_xgblora_native", HERE / "xgblora_fast/ops/_native.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension() -> dict:
    if os.environ.get("XGBLORA_FAST_BUILD_CUDA", "0") != "1":
        return {}
    native = _native_config()
    cuda_home = native.find_cuda_home()
    if cuda_home is None:
        raise SystemExit("XGBLORA_FAST_BUILD_CUDA=1: no CUDA toolkit found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home  # before torch guesses it from a wrapper nvcc on PATH
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            "XGBLORA_FAST_BUILD_CUDA=1 needs torch in the build environment: "
            "pip install --no-build-isolation -e ."
        ) from exc
    ext = CUDAExtension(
        name="xgblora_fast._C",
        sources=[f"csrc/{name}" for name in native.SOURCES],
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": native.CXX_FLAGS, "nvcc": native.NVCC_FLAGS},
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(**_cuda_extension())
