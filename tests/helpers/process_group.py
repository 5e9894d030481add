"""Helpers for tests that spawn a gloo process group on this machine."""

from __future__ import annotations

import socket

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group() -> None:
    """Wait for every rank, then destroy the group.

    A rank that tears gloo down while its peer is still working makes the peer's gloo threads
    abort at exit (SIGABRT, in about 1 run in 5 of the DDP test without the barrier)."""
    dist.barrier()
    dist.destroy_process_group()
