"""Timing for ``bench/microbench.py``: samplers, interleaved rounds, per-call percentiles, ceilings.

CPU: ``time.perf_counter`` around a batch of calls (at least ``--min-sample-ms``, garbage
collector off, as ``timeit``), one sample per provider per round (5 rounds), after one warm-up
call and one calibration call. CUDA: ``triton.testing.do_bench`` per provider per round (3 rounds
of ``--rep-ms``; CUDA events, warm-up, L2 flushed before every call), all per-call times
pooled. The providers of one operation are timed back to back in rounds (the order rotates every
round), so their ratios share the conditions of one stretch of time; ratios are never taken
across runs.

Reported (``tidy_rows``, one row per provider with the fields of ``COLUMNS``): p20/p50/p80 of the
per-call times, ``ratio_to_floor`` (p50 over the floor's p50), and achieved TFLOP/s and GB/s of
the operation's useful work (``roofline.operation_cost``, the same for every provider) next to the
ceilings of this machine measured in the same run (``measure_ceilings``: one large copy, one
large GEMM).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from microbench_providers import DTYPES, Problem

from xgblora_fast.tools import roofline

COLUMNS = (
    "operation",
    "provider",
    "M",
    "K",
    "N",
    "dtype",
    "device",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "ratio_to_floor",
    "tflops",
    "gbps",
    "samples",
    "layer",
)


# ------------------------------------------------------------------------------------ timing
class CpuTimer:
    """``perf_counter`` around batches of at least ``min_sample_s`` seconds, gc off."""

    def __init__(self, min_sample_s: float) -> None:
        self.min_sample_s = min_sample_s

    def calibrate(self, fn: Callable[[], Any]) -> int:
        """One warm-up call, one timed call; returns the calls per sample."""
        fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        return max(1, math.ceil(self.min_sample_s / max(once, 1e-9)))

    def sample(self, fn: Callable[[], Any], calls: int) -> list[float]:
        """Mean ms per call of one batch of ``calls`` calls (no collection pause inside)."""
        gc.disable()
        try:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        return [elapsed * 1e3 / calls]


class CudaTimer:
    """``triton.testing.do_bench``: CUDA events, warm-up, L2 flushed before every call."""

    def __init__(self, rep_ms: int) -> None:
        self.rep_ms = rep_ms

    def calibrate(self, fn: Callable[[], Any]) -> int:
        fn()
        torch.cuda.synchronize()
        return 1

    def sample(self, fn: Callable[[], Any], calls: int) -> list[float]:
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=10, rep=self.rep_ms, return_mode="all"))


Timer = CpuTimer | CudaTimer


def time_interleaved(
    fns: dict[str, Callable[[], Any]], timer: Timer, rounds: int
) -> dict[str, list[float]]:
    """Per-call times (ms) of every function, sampled back to back in ``rounds`` rounds.

    The order rotates every round, so no provider always runs first (or right after the most
    expensive one).
    """
    calls = {name: timer.calibrate(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name] += timer.sample(fns[name], calls[name])
    return samples


def measure_ceilings(device: str, dtypes: list[str], timer: Timer) -> dict[str, Any]:
    """This machine's copy bandwidth (GB/s) and GEMM rate per dtype (TFLOP/s), measured now.

    Copy: ``dst.copy_(src)`` of 256 MiB (CPU) or 1 GiB (CUDA), counted as one read and one write.
    GEMM: square ``n x n`` matmul, n = 2048 (CPU) or 8192 (CUDA), 2 n^3 FLOPs.
    """
    copy_bytes, n = (256 << 20, 2048) if device == "cpu" else (1 << 30, 8192)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    fns: dict[str, Callable[[], Any]] = {"copy": lambda: dst.copy_(src)}
    for name in dtypes:
        a = torch.randn(n, n, dtype=DTYPES[name], device=device)
        b = torch.randn(n, n, dtype=DTYPES[name], device=device)
        fns[name] = lambda a=a, b=b: a @ b
    samples = time_interleaved(fns, timer, rounds=3)
    p50 = {name: float(np.median(values)) / 1e3 for name, values in samples.items()}
    return {
        "copy_gbps": 2 * copy_bytes / p50["copy"] / 1e9,
        "gemm_tflops": {name: 2 * n**3 / p50[name] / 1e12 for name in dtypes},
        "copy_bytes": copy_bytes,
        "gemm_n": n,
    }


# ------------------------------------------------------------------------------------ rows
def tidy_rows(
    operation: str,
    samples: dict[str, list[float]],
    floor: str,
    problem: Problem,
    n: int,
    device: str,
    layer: str,
) -> list[dict[str, Any]]:
    """Tidy rows (see ``COLUMNS``) from per-call times; ratios against ``floor``'s p50."""
    flops, nbytes = roofline.operation_cost(
        operation, n, problem.k, problem.m, problem.weight.element_size()
    )
    quantiles = {name: np.percentile(values, [20, 50, 80]) for name, values in samples.items()}
    floor_p50 = quantiles[floor][1]
    rows = []
    for name, (p20, p50, p80) in quantiles.items():
        seconds = p50 / 1e3
        rows.append(
            {
                "operation": operation,
                "provider": name,
                "M": problem.m,
                "K": problem.k,
                "N": n,
                "dtype": problem.dtype_name,
                "device": device,
                "p20_ms": float(p20),
                "p50_ms": float(p50),
                "p80_ms": float(p80),
                "ratio_to_floor": float(p50 / floor_p50),
                "tflops": flops / seconds / 1e12,
                "gbps": nbytes / seconds / 1e9,
                "samples": len(samples[name]),
                "layer": layer,
            }
        )
    return rows
