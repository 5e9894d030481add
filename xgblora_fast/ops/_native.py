"""Loader of the optional CUDA C++ extension (``csrc/``). Never required to import the package.

Where the extension comes from, in order:

1. ``xgblora_fast._C``, built at install time by
   ``XGBLORA_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`` (setup.py).
2. A JIT build on first use (``torch.utils.cpp_extension.load`` with ninja), cached under
   ``$XGBLORA_FAST_CACHE`` (default ``~/.cache/xgblora_fast``). It runs when
   ``XGBLORA_FAST_JIT_CUDA=1``, or, with the variable unset, when a CUDA device and a CUDA toolkit
   are both present; ``XGBLORA_FAST_JIT_CUDA=0`` turns it off. Needs the ``csrc/`` sources:
   a wheel carries them as package data (``xgblora_fast/csrc/``, copied there by setup.py's
   ``build_py``), a source checkout or an editable install has them in ``csrc/`` beside the
   package (``find_csrc()``).
3. Nothing: ``native_module()`` returns None and ``native_status()`` says why.

Loading registers the ops ``torch.ops.xgblora_fast.cuda_rank1_linear_fwd``,
``cuda_rank1_linear_bwd`` and ``cuda_merge_`` (CUDA kernels; CPU tensors raise a clear error).

Command line (used by ``make build-cuda`` and the tests)::

    python -c "import xgblora_fast.ops._native as n; n.main()" build [--arch "8.0;9.0"] \
        [--build-dir DIR] [--verbose]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib
import importlib.util
import logging
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator
from types import ModuleType

logger = logging.getLogger("xgblora_fast")

SOURCES = ("ops.cpp", "xgblora_fast_cuda.cu")
HEADERS = ("rank1_common.h", "launchers.h")
# Where the sources may be, in order: inside the package (an installed wheel) and beside it (a
# source checkout or an editable install).
CSRC_CANDIDATES = (
    pathlib.Path(__file__).resolve().parents[1] / "csrc",
    pathlib.Path(__file__).resolve().parents[2] / "csrc",
)


def find_csrc() -> pathlib.Path | None:
    """The folder holding the CUDA C++ sources and headers (``CSRC_CANDIDATES``), or None."""
    for folder in CSRC_CANDIDATES:
        if all((folder / name).is_file() for name in (*SOURCES, *HEADERS)):
            return folder
    return None


def _missing_sources() -> str:
    looked = " and ".join(str(folder) for folder in CSRC_CANDIDATES)
    return (
        f"the CUDA C++ sources ({', '.join((*SOURCES, *HEADERS))}) were not found (looked in "
        f"{looked}); a wheel of xgblora-fast ships them in xgblora_fast/csrc/: reinstall it "
        "from a source checkout (pip install .) or from a wheel built there"
    )


CSRC = find_csrc() or CSRC_CANDIDATES[0]  # the folder found at import (for callers' messages)
OPS = ("cuda_rank1_linear_fwd", "cuda_rank1_linear_bwd", "cuda_merge_")
JIT_NAME = "xgblora_fast_cuda"
HOST_TEST_NAME = "xgblora_fast_host_test"
ENV_JIT = "XGBLORA_FAST_JIT_CUDA"
ENV_CACHE = "XGBLORA_FAST_CACHE"

# -ffp-contract=off: the merge's multiply and add must round separately on the host too (the
# shared header's host build is what the tests check; the device code uses __fmul_rn/__fadd_rn).
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
# No --use_fast_math: subnormals and IEEE rounding are part of the contract.
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xcompiler", "-ffp-contract=off"]

_status = "not loaded yet"


def native_status() -> str:
    """Why the extension is, or is not, available (for logs and error messages)."""
    return _status


def _set_status(text: str) -> None:
    global _status
    _status = text


def ops_registered() -> bool:
    """True when this process already has the extension's ops (from any copy of it)."""
    import torch

    try:
        return all(hasattr(torch.ops.xgblora_fast, name) for name in OPS)
    except Exception:  # an unusual torch.ops failure must not break the loader
        return False


@functools.cache
def native_module() -> ModuleType | None:
    """The CUDA C++ extension (prebuilt or JIT-built), or None; never raises."""
    if ops_registered():  # loaded by hand (load_built): a second copy would clash
        _set_status("its ops were already registered in this process")
        module = ModuleType("xgblora_fast_cuda_preloaded")
        module.OPS = OPS
        return module
    try:
        prebuilt = importlib.import_module("xgblora_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name != "xgblora_fast._C":
            _set_status(f"xgblora_fast._C failed to import: {exc}")
            return None
    except Exception as exc:  # a broken build (ABI mismatch, missing symbol): say so
        _set_status(f"xgblora_fast._C failed to import: {exc}")
        return None
    else:
        _set_status("prebuilt xgblora_fast._C")
        return prebuilt

    jit, why = _jit_wanted()
    if not jit:
        _set_status(f"xgblora_fast._C is not built and the JIT build is off ({why})")
        return None
    try:
        logger.warning(
            "xgblora_fast: building the CUDA C++ extension (one time; cached in %s)",
            default_build_dir(),
        )
        start = time.perf_counter()
        module = build_extension()
    except Exception as exc:
        _set_status(f"the JIT build of the CUDA C++ extension failed: {exc}")
        logger.warning("xgblora_fast: %s", _status)
        return None
    _set_status(f"JIT-built in {time.perf_counter() - start:.0f} s ({why})")
    return module


def _jit_wanted() -> tuple[bool, str]:
    flag = os.environ.get(ENV_JIT)
    if flag is not None:
        return flag == "1", f"{ENV_JIT}={flag}"
    import torch

    if not torch.cuda.is_available():
        return False, f"no CUDA device; set {ENV_JIT}=1 to build anyway"
    if find_cuda_home() is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if not sources_available():
        return False, _missing_sources()
    return True, "CUDA device and toolkit present"


def sources_available() -> bool:
    return find_csrc() is not None


def find_cuda_home() -> str | None:
    """A CUDA toolkit folder holding ``bin/nvcc`` and ``include/cuda_runtime.h``, or None.

    ``$CUDA_HOME``/``$CUDA_PATH`` first, then the folder of a real ``nvcc`` on PATH (wrapper
    scripts are skipped: their folder has no ``include/``), then ``/usr/local/cuda*``.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(pathlib.Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if not cand:
            continue
        root = pathlib.Path(cand)
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return str(root)
    return None


def default_build_dir() -> pathlib.Path:
    """``$XGBLORA_FAST_CACHE/torch_extensions/<torch+cuda tag>`` (default ``~/.cache/...``)."""
    import torch

    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xgblora_fast"
    )
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda or 'none'}-py{py}"
    return pathlib.Path(root) / "torch_extensions" / tag


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_extension(
    arch_list: str | None = None,
    build_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> ModuleType:
    """Compile (or reuse, ninja is incremental) and import the CUDA extension.

    Args:
        arch_list: ``TORCH_CUDA_ARCH_LIST`` for this build, e.g. ``"8.0;9.0"``; None keeps the
            environment's, or detects the GPU's (without a GPU, one must be given).
        build_dir: where ninja builds; default ``default_build_dir()``.
        verbose: print the compiler commands.
    Raises:
        RuntimeError when no toolkit or sources are found, or the build fails.
    """
    import torch

    csrc = find_csrc()
    if csrc is None:
        raise RuntimeError(_missing_sources())
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to the folder holding bin/nvcc")
    archs = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and not torch.cuda.is_available():
        raise RuntimeError("no GPU to detect the architecture from: pass arch_list='8.0;9.0'")
    out = pathlib.Path(build_dir) if build_dir is not None else default_build_dir()
    out.mkdir(parents=True, exist_ok=True)
    with _env(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=archs):
        from torch.utils import cpp_extension

        # cpp_extension reads CUDA_HOME once, at its import (maybe from a wrapper nvcc on PATH).
        saved_home = cpp_extension.CUDA_HOME
        cpp_extension.CUDA_HOME = cuda_home
        try:
            return cpp_extension.load(
                name=JIT_NAME,
                sources=[str(csrc / s) for s in SOURCES],
                extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=NVCC_FLAGS,
                extra_include_paths=[str(csrc)],
                build_directory=str(out),
                with_cuda=True,
                verbose=verbose,
            )
        finally:
            cpp_extension.CUDA_HOME = saved_home


def load_built(path: str | os.PathLike) -> ModuleType:
    """Import an already built extension library (``.so``) by path; registers its ops.

    Raises RuntimeError when the ops are already registered (two copies cannot be loaded).
    """
    if ops_registered():
        raise RuntimeError(
            f"not loading {path}: the xgblora_fast CUDA ops are already registered in this process"
        )
    path = pathlib.Path(path)
    name = path.name.split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_host_test(build_dir: str | os.PathLike, verbose: bool = False) -> ModuleType:
    """The host (CPU-only) build of ``csrc/rank1_common.h`` used by the tests."""
    from torch.utils import cpp_extension

    csrc = find_csrc()
    if csrc is None:
        raise RuntimeError(_missing_sources())
    out = pathlib.Path(build_dir)
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=HOST_TEST_NAME,
        sources=[str(csrc / "host_test.cpp")],
        extra_cflags=CXX_FLAGS,
        extra_include_paths=[str(csrc)],
        build_directory=str(out),
        with_cuda=False,
        verbose=verbose,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xgblora_fast.ops._native")
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="compile the CUDA extension and print the library path")
    build.add_argument("--arch", default=None, help='TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0"')
    build.add_argument("--build-dir", default=None)
    build.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    module = build_extension(args.arch, args.build_dir, args.verbose)
    print(f"built {module.__file__} in {time.perf_counter() - start:.1f} s")
    print(module.__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
