"""Build script: metadata lives in pyproject.toml; this file is for native extensions.

``XGBLORA_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`` also compiles the CUDA C++
fallback in ``csrc/`` into ``xgblora_fast._C`` (torch's ``CUDAExtension``, built with ninja). It
needs torch in the build environment (hence ``--no-build-isolation``) and a CUDA toolkit
(``CUDA_HOME``; without a GPU also ``TORCH_CUDA_ARCH_LIST``, e.g. ``"8.0;9.0"``). Without the
variable the package is pure Python and installs with no toolkit at all.

Either way a wheel carries the ``csrc/`` sources as package data (``build_py`` copies them to
``xgblora_fast/csrc/``), so an installed wheel can JIT-build the fallback on first use;
``MANIFEST.in`` puts them in the sdist. An editable install reads them from the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


class BuildPyWithCsrc(build_py):
    """``build_py`` that also copies ``csrc/`` into the built package as ``xgblora_fast/csrc/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # editable: _native.py finds csrc/ in place
            return
        files = sorted(f for f in (HERE / "csrc").glob("*") if f.suffix in CSRC_SUFFIXES)
        if not files:
            raise SystemExit(f"no CUDA C++ sources in {HERE / 'csrc'} to ship with the package")
        target = pathlib.Path(self.build_lib) / "xgblora_fast" / "csrc"
        self.mkpath(str(target))
        for src in files:
            self.copy_file(str(src), str(target / src.name))


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
        return {"cmdclass": {"build_py": BuildPyWithCsrc}}
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
        "cmdclass": {
            "build_py": BuildPyWithCsrc,
            "build_ext": BuildExtension.with_options(use_ninja=True),
        },
    }


setup(**_cuda_extension())
