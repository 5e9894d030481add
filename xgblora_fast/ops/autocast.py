"""What the ops need to know about ``torch.autocast``: is it on, in which dtype, and a way out.

The ops cast their inputs once, up front, as autocast would (``ops/rank1_linear.py``); their
implementations then run with autocast off, so it cannot recast the PyTorch ops inside them
(the reference's fp32 rank-1 terms, the cuBLAS GEMMs, the merge's fp32 update), in forward, in a
backward that runs under an autocast region, or in a merge called from one.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes ``nn.Linear`` in on ``device`` right now (None: autocast off)."""
    if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device`` (a no-op when it is off already)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
