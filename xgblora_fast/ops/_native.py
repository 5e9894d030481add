"""Loader of the optional CUDA C++ extension (``csrc/``). Never required to import the package."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def native_module() -> ModuleType | None:
    """The built ``xgblora_fast._C`` extension, or None when it was not built."""
    try:
        from xgblora_fast import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C
