"""Microbenchmarks: ``FastRank1Linear`` vs frozen ``nn.Linear``, peft LoRA and an unfused rank-1.

For the linear layers of real models (``W [M, K]``: M = out_features, K = in_features) and token
counts ``N`` (``x [N, K]``), times four operations:

- ``forward``: ``y = layer(x)`` with autograd on (``x`` requires grad, as inside a model).
- ``backward``: ``torch.autograd.grad(y, [x, *adapter], dy)`` on graphs built beforehand.
- ``forward+backward``: both (the training cost of the layer).
- ``merge``: ``W += s b a^T`` in place; its floor is one copy of ``W`` (one read, one write).

Providers (layer operations): ``nn.Linear (frozen)``, the floor every ratio is taken against;
``xgblora-fast[torch]`` (and ``[triton]``, ``[cuda]`` on a CUDA device); ``peft LoRA r=1`` and
``r=8`` (peft's LoRA ``Linear`` with its default fp32 adapters); ``unfused rank-1 (addmm_)``:
``y = x W^T + bias; y.addmm_(x a, b^T, alpha=s)`` in plain autograd, the way unsloth writes it.
Merge providers: ``copy_ (floor)``, ``xf.merge_`` per backend (with its safety pass over ``W``),
the same merge with the bound on ``max |W|`` kept from the previous merge (``..., W bound kept``:
what ``FastRank1Linear.merge_`` runs from a layer's second merge on, hence the one the GPU goal is
held against), peft's ``merge()``, the unfused provider's in-place ``W.addr_`` and a naive
``W += s * torch.outer(b, a)``.

Fairness: every provider shares the same ``W``/``bias`` Parameters; inputs are random (not
zeros) and ``b != 0``; before a provider is timed its outputs and gradients (``y``, ``dx`` and the
adapter's gradients; for the merge the updated rows of ``W``) are checked against a float64
reference, and the run stops (AssertionError) if one disagrees. Providers of one shape are timed
back to back in rounds (the order rotates every round), so their ratios share the conditions of
one stretch of time; ratios are never taken across runs.

Timing. CPU: ``time.perf_counter`` around a batch of calls (at least ``--min-sample-ms``, garbage
collector off, as ``timeit``), one sample per provider per round (5 rounds), after one warm-up
call and one calibration call. CUDA: ``triton.testing.do_bench`` per provider per round (3 rounds
of ``--rep-ms``; CUDA events, warm-up, L2 flushed before every call), all per-call times
pooled. Inputs rotate over several buffers (up to 64 MiB of ``x``) so caches do not flatter.
Reported: p20/p50/p80 of the per-call times, ``ratio_to_floor`` (p50 over the floor's p50), and
achieved TFLOP/s and GB/s of the operation's useful work (``roofline.operation_cost``, the same
for every provider) next to the ceilings of this machine measured in the same run (one large
copy, one large GEMM).

Shapes on CPU (fp32, ``torch.set_num_threads(--threads)``): see ``CPU_SHAPES``; ``N`` is 1, 256
and 2048, except that the largest layers stop at 256 so that the full run stays under 10 minutes
on 2 cores (a 4096x11008 fp32 GEMM at N=2048 is 185 GFLOP, ~1.5 s there, and each (shape, N)
runs ~150 GEMMs of its size: 5 providers x 3 operations x 7 calls, fwd+bwd counting 2). CUDA:
every shape with N = 1, 256, 2048 and 16384, bf16 and fp16 (16k tokens only there).

    python bench/microbench.py             # full run: bench/results/microbench_<device>.*
    python bench/microbench.py --quick     # two small shapes: microbench_<device>_quick.*
    python bench/microbench.py --shape 4096x4096 --tokens 256 2048 --tag _mine

Outputs (under ``--out``, default ``bench/results``): a tidy CSV and a JSON (``{"meta", "rows"}``)
with one row per (operation, provider, shape, N, dtype), a markdown summary (ratio tables and the
goals of issue #5) and PNG plots (fwd+bwd ratio vs N per shape; merge time vs copy).
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import xgblora_fast as xf
from xgblora_fast.ops.checks import abs_max
from xgblora_fast.ops.merge import merge_with_bound_
from xgblora_fast.tools import roofline
from xgblora_fast.tools.roofline import (
    PROVIDER_COPY,
    PROVIDER_FLOOR,
    PROVIDER_PEFT_R1,
    provider_bound_kept,
    provider_fused,
)

RESULTS = Path(__file__).resolve().parent / "results"
LAYER_OPS = ("forward", "backward", "forward+backward")
PROVIDER_PEFT_R8 = "peft LoRA r=8"
PROVIDER_UNFUSED = "unfused rank-1 (addmm_)"
PROVIDER_NAIVE = "naive W += s*outer(b, a)"
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest max|error| / max|reference| accepted in the float64 checks.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
ROTATE_BYTES = 64 << 20  # x buffers rotated per provider: beyond a 32 MiB L3
MAX_ROTATE = 4
CHECK_ROWS_CPU = 64  # the CPU check runs on the first rows of x (rows are independent)
SCALE = 1.0


@dataclass(frozen=True)
class Shape:
    """A linear layer ``W [m, k]`` of a real model and the token counts benchmarked on CPU."""

    m: int
    k: int
    layer: str
    tokens: tuple[int, ...] = (1, 256, 2048)

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}"


CPU_SHAPES = (
    Shape(768, 768, "hidden 768 (BERT-base, GPT-2) attention"),
    Shape(3072, 768, "hidden 768 MLP up"),
    Shape(768, 3072, "hidden 768 MLP down"),
    Shape(2048, 2048, "hidden 2048 (Llama-3.2-1B) attention q/o"),
    Shape(8192, 2048, "hidden 2048 MLP gate/up", (1, 256)),
    Shape(2048, 8192, "hidden 2048 MLP down", (1, 256)),
    Shape(4096, 4096, "hidden 4096 (Llama-2-7B) attention"),
    Shape(11008, 4096, "hidden 4096 MLP gate/up", (1, 256)),
    Shape(4096, 11008, "hidden 4096 MLP down", (1, 256)),
    Shape(1024, 4096, "hidden 4096 GQA k/v (8 kv heads)"),
)
GPU_TOKENS = (1, 256, 2048, 16384)
QUICK_SHAPES = (
    Shape(768, 768, "hidden 768 (BERT-base, GPT-2) attention", (1, 256)),
    Shape(3072, 768, "hidden 768 MLP up", (1, 256)),
)
QUICK_GPU_SHAPES = (Shape(4096, 4096, "hidden 4096 (Llama-2-7B) attention", (256, 2048)),)


# ------------------------------------------------------------------------------------ problem
@dataclass
class Problem:
    """One layer: frozen ``weight [M, K]``/``bias [M]`` and the adapter (fp32) every provider uses.

    ``a [K]``, ``b [M]`` are the rank-1 adapter; ``a8 [8, K]``, ``b8 [M, 8]`` peft r=8's, whose
    first row/column are ``a``/``b``.
    """

    weight: nn.Parameter
    bias: nn.Parameter
    a: torch.Tensor
    b: torch.Tensor
    a8: torch.Tensor
    b8: torch.Tensor
    dtype_name: str

    @property
    def m(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]


def make_problem(m: int, k: int, dtype_name: str, device: str, seed: int = 0) -> Problem:
    """Random frozen layer and adapters; ``b`` is nonzero so no provider can skip its work."""
    torch.manual_seed(seed)
    dtype = DTYPES[dtype_name]
    bound = 1.0 / math.sqrt(k)
    weight = torch.empty(m, k, dtype=dtype, device=device).normal_(0.0, bound)
    bias = torch.empty(m, dtype=dtype, device=device).normal_(0.0, 0.1)
    f32 = {"dtype": torch.float32, "device": device}
    a8 = torch.empty(8, k, **f32).uniform_(-bound, bound)
    b8 = torch.empty(m, 8, **f32).normal_()
    return Problem(
        weight=nn.Parameter(weight, requires_grad=False),
        bias=nn.Parameter(bias, requires_grad=False),
        a=a8[0].clone(),
        b=b8[:, 0].clone(),
        a8=a8,
        b8=b8,
        dtype_name=dtype_name,
    )


def make_inputs(problem: Problem, n: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` pairs ``(x [n, K] requiring grad, dy [n, M])`` in the layer's dtype."""
    w = problem.weight
    return [
        (
            torch.randn(n, problem.k, dtype=w.dtype, device=w.device).requires_grad_(),
            torch.randn(n, problem.m, dtype=w.dtype, device=w.device),
        )
        for _ in range(count)
    ]


def rotation_count(problem: Problem, n: int) -> int:
    """How many input buffers to rotate: enough for ``ROTATE_BYTES`` of ``x``, at most 4."""
    x_bytes = n * problem.k * problem.weight.element_size()
    return max(1, min(MAX_ROTATE, math.ceil(ROTATE_BYTES / max(x_bytes, 1))))


# ---------------------------------------------------------------------------------- providers
@dataclass
class Provider:
    """A layer under test, as ``y = x W^T + bias + scale * (x A^T) B^T`` with rank ``rank``.

    ``adapter`` holds the trainable tensors ``(A-like, B-like)`` (shapes ``[K]``/``[M]`` or
    ``[r, K]``/``[M, r]``), None for the floor. ``merge`` folds the adapter into ``W`` in place
    (None when the provider has no merge); ``merge_target`` is the tensor it writes when that is
    not ``W`` (the copy floor's destination).
    """

    name: str
    module: nn.Module | None
    adapter: tuple[torch.Tensor, torch.Tensor] | None
    rank: int
    merge: Callable[[], Any] | None = None
    merge_target: torch.Tensor | None = None

    def trainable(self) -> list[torch.Tensor]:
        return list(self.adapter) if self.adapter is not None else []


class _Holder(nn.Module):
    """A one-layer model for ``peft.get_peft_model`` (peft targets modules by name)."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj


class UnfusedRank1(nn.Module):
    """The unsloth-style unfused rank-1 layer in plain PyTorch autograd.

    ``y = x W^T + bias`` then ``y.addmm_(x a, b^T, alpha=s)`` in place; the fp32 adapter is cast
    to ``x``'s dtype first (as unsloth casts ``A``/``B``).
    """

    def __init__(self, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.linear = linear
        self.lora_a = nn.Parameter(a.clone())
        self.lora_b = nn.Parameter(b.clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        a = self.lora_a.to(x.dtype)
        b = self.lora_b.to(x.dtype)
        return y.addmm_(x @ a[:, None], b[None, :], alpha=self.scale)


def _linear(problem: Problem) -> nn.Linear:
    """An ``nn.Linear`` holding the problem's Parameters (shared, not copied)."""
    linear = nn.Linear(problem.k, problem.m, device="meta")
    linear.weight = problem.weight
    linear.bias = problem.bias
    return linear


def peft_provider(problem: Problem, rank: int, name: str) -> Provider:
    """peft's LoRA ``Linear`` of rank ``rank`` (merge only for r=1: the one merge provider)."""
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=rank * SCALE, target_modules=["proj"], lora_dropout=0.0
    )
    lora = peft.get_peft_model(_Holder(_linear(problem)), config).base_model.model.proj
    a_param = lora.lora_A["default"].weight  # [r, K], fp32 (peft's default adapter dtype)
    b_param = lora.lora_B["default"].weight  # [M, r]
    with torch.no_grad():
        a_param.copy_(problem.a8[:rank])
        b_param.copy_(problem.b8[:, :rank])

    def merge() -> None:
        lora.merge()
        lora.merged_adapters.clear()  # so the next call merges again instead of warning

    return Provider(name, lora, (a_param, b_param), rank, merge if rank == 1 else None)


def fused_provider(problem: Problem, backend: str) -> Provider:
    """``FastRank1Linear`` on ``backend``; its merge is ``xf.merge_``."""
    layer = xf.FastRank1Linear.from_linear(_linear(problem), alpha=SCALE, backend=backend)
    with torch.no_grad():
        layer.lora_a.copy_(problem.a)
        layer.lora_b.copy_(problem.b)

    def merge() -> None:
        # xf.merge_, not layer.merge_(): the layer would re-init b = 0 and later merges of a zero
        # update return before the max|W| check, flattering the timing.
        xf.merge_(layer.weight, layer.lora_a, layer.lora_b, SCALE, backend=backend)

    return Provider(provider_fused(backend), layer, (layer.lora_a, layer.lora_b), 1, merge)


def bound_kept_provider(problem: Problem, backend: str) -> Provider:
    """Merge only: ``merge_with_bound_`` fed the bound its last call returned, as
    ``FastRank1Linear.merge_`` does from its second merge on (no safety pass over ``W``)."""
    w = problem.weight
    bound = [abs_max(w)]  # what the layer's first merge reads

    def merge() -> None:
        bound[0] = merge_with_bound_(
            w, problem.a, problem.b, SCALE, backend=backend, weight_abs_max=bound[0]
        )

    return Provider(provider_bound_kept(backend), None, None, 1, merge)


def fused_backends(device: str) -> list[str]:
    """``FastRank1Linear`` backends that run on ``device``: torch on CPU; triton, cuda, torch."""
    if device != "cuda":
        return ["torch"]
    from xgblora_fast.ops._native import native_module

    # native_module() may JIT-build the extension on first use (XGBLORA_FAST_JIT_CUDA=0: off).
    return ["triton", *(["cuda"] if native_module() is not None else []), "torch"]


def unfused_provider(problem: Problem) -> Provider:
    """``UnfusedRank1``; its merge is the in-place ``W.addr_(b, a)`` in W's dtype."""
    unfused = UnfusedRank1(_linear(problem), problem.a, problem.b, SCALE)
    w = problem.weight

    def addr_merge() -> None:
        a, b = unfused.lora_a.detach(), unfused.lora_b.detach()
        w.data.addr_(b.to(w.dtype), a.to(w.dtype), alpha=SCALE)

    return Provider(PROVIDER_UNFUSED, unfused, (unfused.lora_a, unfused.lora_b), 1, addr_merge)


def naive_provider(problem: Problem) -> Provider:
    """Merge only: ``W += s * torch.outer(b, a)`` (a full-size temporary)."""
    w = problem.weight

    def naive() -> None:
        w.data.add_(torch.outer(problem.b, problem.a), alpha=SCALE)

    return Provider(PROVIDER_NAIVE, None, None, 1, naive)


def copy_provider(problem: Problem) -> Provider:
    """The merge's floor: one ``copy_`` of ``W`` into a second buffer (one read, one write)."""
    w = problem.weight
    dst = torch.empty_like(w)
    return Provider(PROVIDER_COPY, None, None, 0, lambda: dst.copy_(w.data), dst)


def build_providers(problem: Problem, device: str) -> list[Provider]:
    """Every provider of the layer operations, the floor first; all share ``W`` and ``bias``."""
    return [
        Provider(PROVIDER_FLOOR, _linear(problem), None, 0),
        *(fused_provider(problem, backend) for backend in fused_backends(device)),
        peft_provider(problem, 1, PROVIDER_PEFT_R1),
        peft_provider(problem, 8, PROVIDER_PEFT_R8),
        unfused_provider(problem),
    ]


def merge_providers(problem: Problem, providers: list[Provider], device: str) -> list[Provider]:
    """The merge's providers: the copy floor, every provider with a merge, each backend's
    steady-state booster merge, and the naive one."""
    return [
        copy_provider(problem),
        *(p for p in providers if p.merge is not None),
        *(bound_kept_provider(problem, backend) for backend in fused_backends(device)),
        naive_provider(problem),
    ]


# ---------------------------------------------------------------------------------- checks
def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def check_provider(
    provider: Provider, problem: Problem, x: torch.Tensor, dy: torch.Tensor
) -> dict[str, float]:
    """Forward + backward on ``x [n, K]``, ``dy [n, M]`` against float64; returns the errors.

    Compares ``y``, ``dx`` and the adapter's gradients with ``y = x W^T + bias + s x A^T B^T``
    computed in float64 from the provider's own adapter values. Raises AssertionError (always,
    also under ``python -O``) when an error exceeds ``TOLERANCE`` of the dtype.
    """
    x = x.detach().requires_grad_()
    params = provider.trainable()
    y = provider.module(x)
    grads = torch.autograd.grad(y, [x, *params], dy)
    x64, dy64 = x.detach().double(), dy.double()
    w64, bias64 = problem.weight.detach().double(), problem.bias.detach().double()
    ref_y, ref_dx = x64 @ w64.t() + bias64, dy64 @ w64
    errors = {}
    if provider.adapter is not None:
        r = provider.rank
        a64 = provider.adapter[0].detach().double().reshape(r, problem.k)
        b64 = provider.adapter[1].detach().double().reshape(problem.m, r)
        t, v = x64 @ a64.t(), dy64 @ b64  # [n, r] each
        ref_y = ref_y + SCALE * t @ b64.t()
        ref_dx = ref_dx + SCALE * v @ a64
        errors["da"] = _rel_error(grads[1].reshape(r, problem.k), SCALE * v.t() @ x64)
        errors["db"] = _rel_error(grads[2].reshape(problem.m, r), SCALE * dy64.t() @ t)
    errors["y"] = _rel_error(y.detach(), ref_y)
    errors["dx"] = _rel_error(grads[0], ref_dx)
    tol = TOLERANCE[problem.dtype_name]
    bad = {name: err for name, err in errors.items() if not err <= tol}
    if bad:
        raise AssertionError(
            f"{provider.name} disagrees with the float64 reference on {problem.m}x{problem.k}, "
            f"N={x.shape[0]}, {problem.dtype_name}: relative errors {bad} > {tol}"
        )
    return errors


def check_merge(provider: Provider, problem: Problem, rows: int = CHECK_ROWS_CPU) -> float:
    """One merge against float64 on the first ``rows`` rows of ``W``; AssertionError if off."""
    w = problem.weight.data
    before = w[:rows].double().clone()
    provider.merge()
    if provider.merge_target is not None:  # the copy floor: the destination equals W
        got, ref = provider.merge_target[:rows], before
    else:
        got = w[:rows]
        ref = before + SCALE * torch.outer(problem.b[:rows].double(), problem.a.double())
    err = _rel_error(got, ref)
    tol = TOLERANCE[problem.dtype_name]
    if not err <= tol:
        raise AssertionError(
            f"{provider.name} merge disagrees with the float64 reference on "
            f"{problem.m}x{problem.k} {problem.dtype_name}: relative error {err:.3g} > {tol}"
        )
    return err


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


def op_fn(
    operation: str, provider: Provider, inputs: list[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[], Any]:
    """A no-argument function running one ``operation`` of ``provider``, rotating ``inputs``."""
    params = provider.trainable()
    module = provider.module
    if operation == "forward":
        xs = itertools.cycle([x for x, _ in inputs])
        return lambda: module(next(xs))
    if operation == "backward":
        graphs = itertools.cycle([(module(x), x, dy) for x, dy in inputs])

        def backward() -> None:
            y, x, dy = next(graphs)
            torch.autograd.grad(y, [x, *params], dy, retain_graph=True)

        return backward
    if operation == "forward+backward":
        pairs = itertools.cycle(inputs)

        def forward_backward() -> None:
            x, dy = next(pairs)
            torch.autograd.grad(module(x), [x, *params], dy)

        return forward_backward
    raise ValueError(f"unknown operation {operation!r}")


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


# ------------------------------------------------------------------------------------ the run
@dataclass
class Settings:
    """What one run measures (built from the command line by ``settings_from_args``)."""

    device: str
    shapes: tuple[Shape, ...]
    dtypes: list[str]
    rounds: int
    min_sample_ms: float
    rep_ms: int
    gpu_tokens: tuple[int, ...] | None  # CUDA: the same N for every shape

    def tokens(self, shape: Shape) -> tuple[int, ...]:
        return self.gpu_tokens if self.gpu_tokens is not None else shape.tokens


def _rows(
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


def bench_shape(
    shape: Shape, dtype_name: str, settings: Settings, timer: Timer, progress: tqdm
) -> list[dict[str, Any]]:
    """Every operation and provider of one layer shape and dtype (token counts, then merge)."""
    device = settings.device
    problem = make_problem(shape.m, shape.k, dtype_name, device)
    providers = build_providers(problem, device)
    rows = []
    for n in settings.tokens(shape):
        progress.set_postfix_str(f"{shape.label} N={n} {dtype_name}")
        inputs = make_inputs(problem, n, rotation_count(problem, n))
        rows_to_check = n if device == "cuda" else min(n, CHECK_ROWS_CPU)
        x, dy = inputs[0]
        for provider in providers:
            check_provider(provider, problem, x[:rows_to_check], dy[:rows_to_check])
        for operation in LAYER_OPS:
            fns = {p.name: op_fn(operation, p, inputs) for p in providers}
            samples = time_interleaved(fns, timer, settings.rounds)
            rows += _rows(operation, samples, PROVIDER_FLOOR, problem, n, device, shape.layer)
            del fns
        del inputs, x, dy
        gc.collect()
        progress.update(1)
    # Merges last: every timed merge adds s b a^T to the shared W (nothing else uses it after).
    mergers = merge_providers(problem, providers, device)
    for provider in mergers:
        check_merge(provider, problem)
    samples = time_interleaved({p.name: p.merge for p in mergers}, timer, settings.rounds)
    rows += _rows("merge", samples, PROVIDER_COPY, problem, 0, device, shape.layer)
    progress.update(1)
    return rows


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run(settings: Settings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All shapes and dtypes: ``(rows, meta)``; meta holds the machine and its ceilings."""
    device = settings.device
    if device == "cuda":
        timer: Timer = CudaTimer(settings.rep_ms)
    else:
        timer = CpuTimer(settings.min_sample_ms / 1e3)
    start = time.perf_counter()
    ceilings = measure_ceilings(device, settings.dtypes, timer)
    items = sum(len(settings.tokens(s)) + 1 for s in settings.shapes) * len(settings.dtypes)
    rows: list[dict[str, Any]] = []
    with tqdm(total=items, desc="microbench", unit="item") as progress:
        for shape in settings.shapes:
            for dtype_name in settings.dtypes:
                rows += bench_shape(shape, dtype_name, settings, timer, progress)
    meta = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "xgblora_fast": xf.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "timer": (
            f"triton do_bench, rep {settings.rep_ms} ms x {settings.rounds} rounds"
            if device == "cuda"
            else f"perf_counter, samples >= {settings.min_sample_ms} ms, {settings.rounds} rounds"
        ),
        "ceilings": ceilings,
        "seconds": time.perf_counter() - start,
    }
    return rows, meta


# ------------------------------------------------------------------------------------ outputs
def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["operation"], r["provider"], r["M"], r["K"], r["N"], r["dtype"]): r for r in rows}


def _fused_backend(rows: list[dict[str, Any]]) -> str:
    """The backend the goals are held against: Triton on CUDA, else torch."""
    return "triton" if provider_fused("triton") in {r["provider"] for r in rows} else "torch"


def _fused_name(rows: list[dict[str, Any]]) -> str:
    """The fused provider the goals are held against."""
    return provider_fused(_fused_backend(rows))


def evaluate_goals(
    rows: list[dict[str, Any]], meta: dict[str, Any], memory: dict[str, Any] | None
) -> list[tuple[str, str, bool | None]]:
    """Issue #5's goals on these rows: ``(goal, evidence, held)``; None when not measured here."""
    index = _index(rows)
    fused = _fused_name(rows)
    fb = [r for r in rows if r["operation"] == "forward+backward"]
    cases = sorted({(r["M"], r["K"], r["N"], r["dtype"]) for r in fb})

    def ratio(provider: str, case: tuple) -> float:
        m, k, n, dtype = case
        return index["forward+backward", provider, m, k, n, dtype]["ratio_to_floor"]

    def worst(values: list[tuple[float, tuple]], largest: bool = True) -> str:
        value, (m, k, n, dtype) = max(values) if largest else min(values)
        return f"worst {value:.3f} at {m}x{k} N={n} {dtype}"

    goals: list[tuple[str, str, bool | None]] = []
    if meta["device"] == "cpu":
        limit = 1.10
        over_floor = [(ratio(fused, c), c) for c in cases]
        big = [c for c in cases if c[2] >= 256]
        over_floor_big = [(ratio(fused, c), c) for c in big]
        goals.append(
            (
                f"{fused} fwd+bwd within {limit:.2f}x of frozen nn.Linear (every shape and N)",
                worst(over_floor)
                + (f"; N >= 256 only: {worst(over_floor_big)}" if over_floor_big else ""),
                all(v <= limit for v, _ in over_floor),
            )
        )
        speedup = [(ratio(PROVIDER_PEFT_R1, c) / ratio(fused, c), c) for c in big]
        goals.append(
            (
                f"{fused} fwd+bwd faster than peft LoRA r=1 at every shape with N >= 256",
                worst(speedup, largest=False) + " (peft time / ours)" if speedup else "no N >= 256",
                bool(speedup) and all(v > 1.0 for v, _ in speedup),
            )
        )
        goals.append(merge_memory_goal(memory))
    else:
        big = [c for c in cases if c[2] >= 2048]
        over_floor = [(ratio(fused, c), c) for c in big]
        speedup = [(ratio(PROVIDER_PEFT_R1, c) / ratio(fused, c), c) for c in big]
        goals.append(
            (
                f"{fused} fwd+bwd within 1.05x of cuBLAS frozen linear for N >= 2048",
                worst(over_floor) if big else "no N >= 2048",
                bool(big) and all(v <= 1.05 for v, _ in over_floor),
            )
        )
        goals.append(
            (
                f"{fused} fwd+bwd at least 1.3x faster than peft LoRA r=1 for N >= 2048",
                worst(speedup, largest=False) if big else "no N >= 2048",
                bool(big) and all(v >= 1.3 for v, _ in speedup),
            )
        )
        copy_gbps = meta["ceilings"]["copy_gbps"]
        # The merge a booster runs in training: from its second merge on, the bound is kept.
        kept = provider_bound_kept(_fused_backend(rows))
        merges = [r for r in rows if r["operation"] == "merge" and r["provider"] == kept]
        shares = [(r["gbps"] / copy_gbps, (r["M"], r["K"], 0, r["dtype"])) for r in merges]
        goals.append(
            (
                f"{kept}: merge at >= 85% of device copy bandwidth ({copy_gbps:.0f} GB/s)",
                worst(shares, largest=False) if shares else "no merge rows",
                bool(shares) and all(v >= 0.85 for v, _ in shares),
            )
        )
    return goals


def merge_memory_goal(memory: dict[str, Any] | None) -> tuple[str, str, bool | None]:
    """The merge-memory goal from ``bench/memory.py``'s JSON (None: not measured yet)."""
    goal = "merge with no full-size temporary (bench/memory.py)"
    rows = [r for r in (memory or {}).get("rows", []) if r.get("kind") == "merge"]
    ours = [r for r in rows if r["provider"].startswith("xgblora-fast[")]
    if not ours:
        return goal, "memory benchmark not run", None
    r = max(ours, key=lambda r: r["weight_mib"])
    evidence = (
        f"extra {r['extra_mib']:.1f} MiB for a {r['weight_mib']:.0f} MiB W "
        f"({r['M']}x{r['K']} {r['dtype']})"
    )
    return goal, evidence, r["extra_mib"] < r["weight_mib"]


def _ratio_table(rows: list[dict[str, Any]], operation: str, providers: list[str]) -> list[str]:
    index = _index(rows)
    fused = _fused_name(rows)
    cases = sorted(
        {
            (r["M"], r["K"], r["N"], r["dtype"], r["layer"])
            for r in rows
            if r["operation"] == operation
        },
        key=lambda c: (c[3], c[1] * c[0], c[0], c[2]),
    )
    head = ["M x K", "layer", "N", "dtype", "floor p50 ms", *providers, "peft r=1 / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, k, n, dtype, layer in cases:
        floor = index[operation, PROVIDER_FLOOR, m, k, n, dtype]
        cells = [f"{m}x{k}", layer, str(n), dtype, f"{floor['p50_ms']:.3f}"]
        for p in providers:
            row = index.get((operation, p, m, k, n, dtype))
            cells.append(f"{row['ratio_to_floor']:.3f}" if row else "-")
        ours, peft = (
            index[operation, fused, m, k, n, dtype],
            index[operation, PROVIDER_PEFT_R1, m, k, n, dtype],
        )
        cells.append(f"{peft['p50_ms'] / ours['p50_ms']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _merge_table(rows: list[dict[str, Any]], copy_gbps: float) -> list[str]:
    merges = [r for r in rows if r["operation"] == "merge"]
    providers = list(dict.fromkeys(r["provider"] for r in merges))
    index = _index(rows)
    cases = sorted(
        {(r["M"], r["K"], r["dtype"]) for r in merges}, key=lambda c: (c[2], c[0] * c[1])
    )
    fused = _fused_name(rows)
    kept = provider_bound_kept(_fused_backend(rows))
    ours = [p for p in (fused, kept) if p in providers]
    head = ["M x K", "dtype", *providers, *(f"{p} GB/s (% of copy ceiling)" for p in ours)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, k, dtype in cases:
        cells = [f"{m}x{k}", dtype]
        for p in providers:
            row = index.get(("merge", p, m, k, 0, dtype))
            cells.append(f"{row['p50_ms']:.2f} ms ({row['ratio_to_floor']:.2f})" if row else "-")
        for p in ours:
            gbps = index["merge", p, m, k, 0, dtype]["gbps"]
            cells.append(f"{gbps:.1f} ({100 * gbps / copy_gbps:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(
    rows: list[dict[str, Any]], meta: dict[str, Any], memory: dict[str, Any] | None, stem: str
) -> str:
    """The markdown summary: set-up, goals, ratio tables per operation, merge table."""
    ceil = meta["ceilings"]
    gemm = ", ".join(f"{d} {v:.2f} TFLOP/s" for d, v in ceil["gemm_tflops"].items())
    layer_providers = [
        p
        for p in dict.fromkeys(r["provider"] for r in rows if r["operation"] == "forward")
        if p != PROVIDER_FLOOR
    ]
    fused = _fused_name(rows)
    fb_ours = [r for r in rows if r["operation"] == "forward+backward" and r["provider"] == fused]
    best = max(fb_ours, key=lambda r: r["tflops"])
    lines = [
        f"# Microbenchmarks on {meta['device']} ({meta['device_name']})",
        "",
        f"{meta['date']}; torch {meta['torch']}, xgblora-fast {meta['xgblora_fast']}, "
        f"{meta['threads']} threads on {meta['cpu_count']} CPUs; timer: {meta['timer']}; "
        f"{meta['seconds'] / 60:.1f} min. Produced by `python bench/microbench.py`; data: "
        f"`{stem}.csv` / `{stem}.json`; plots: `{stem}_fwdbwd.png`, `{stem}_merge.png`.",
        "",
        f"Ceilings measured in this run: copy {ceil['copy_gbps']:.1f} GB/s, GEMM {gemm}. "
        f"Best fwd+bwd of {fused}: {best['tflops']:.2f} TFLOP/s ({best['M']}x{best['K']} "
        f"N={best['N']} {best['dtype']}).",
        "",
        "Ratios are p50 times over the floor's p50 in the same run (floor: frozen `nn.Linear` "
        "for the layer operations, one `copy_` of W for the merge); lower is better. "
        "'peft r=1 / ours' > 1 means we are faster. Every provider was checked against a "
        "float64 reference before it was timed.",
        "",
        "## Goals (issue #5)",
        "",
        "| goal | evidence | held |",
        "|---|---|---|",
    ]
    for goal, evidence, held in evaluate_goals(rows, meta, memory):
        verdict = "not measured" if held is None else ("yes" if held else "**no**")
        lines.append(f"| {goal} | {evidence} | {verdict} |")
    for operation in LAYER_OPS:
        lines += ["", f"## {operation}: time / frozen nn.Linear", ""]
        lines += _ratio_table(rows, operation, layer_providers)
    lines += ["", "## merge: p50 ms (time / one copy of W)", ""]
    lines += _merge_table(rows, ceil["copy_gbps"])
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path_fwdbwd: Path, path_merge: Path) -> None:
    """fwd+bwd ratio to the floor vs N, one panel per shape; merge time / copy per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fb = [r for r in rows if r["operation"] == "forward+backward"]
    shapes = list(dict.fromkeys((r["M"], r["K"]) for r in fb))
    providers = [p for p in dict.fromkeys(r["provider"] for r in fb) if p != PROVIDER_FLOOR]
    dtypes = list(dict.fromkeys(r["dtype"] for r in fb))
    cols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (m, k) in zip(axes.flat, shapes, strict=False):
        for p in providers:
            for style, dtype in zip(("-", "--", ":"), dtypes, strict=False):
                pts = sorted(
                    (r["N"], r["ratio_to_floor"])
                    for r in fb
                    if (r["M"], r["K"], r["provider"], r["dtype"]) == (m, k, p, dtype)
                )
                if pts:
                    label = p if len(dtypes) == 1 else f"{p} {dtype}"
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"W {m}x{k}", fontsize=9)
        ax.set_xlabel("tokens N")
        ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path_fwdbwd, dpi=110)
    plt.close(fig)

    merges = [r for r in rows if r["operation"] == "merge"]
    cases = list(dict.fromkeys((r["M"], r["K"], r["dtype"]) for r in merges))
    names = list(dict.fromkeys(r["provider"] for r in merges))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) + 2), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [
            next(
                (
                    r["ratio_to_floor"]
                    for r in merges
                    if (r["M"], r["K"], r["dtype"]) == c and r["provider"] == name
                ),
                np.nan,
            )
            for c in cases
        ]
        ax.bar(np.arange(len(cases)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{m}x{k}\n{d}" for m, k, d in cases], fontsize=8)
    ax.set_ylabel("merge time / copy of W")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_merge, dpi=110)
    plt.close(fig)


def write_results(
    rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, stem: str, plots: bool = True
) -> list[Path]:
    """CSV, JSON, markdown (and PNG plots) under ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.csv", out / f"{stem}.json", out / f"{stem}.md"]
    with paths[0].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    paths[1].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    memory_path = out / f"{stem.replace('microbench', 'memory', 1)}.json"  # same device and tag
    memory = json.loads(memory_path.read_text()) if memory_path.is_file() else None
    paths[2].write_text(summary_markdown(rows, meta, memory, stem))
    if plots:
        paths += [out / f"{stem}_fwdbwd.png", out / f"{stem}_merge.png"]
        plot(rows, paths[3], paths[4])
    return paths


# ------------------------------------------------------------------------------------ CLI
def _parse_shape(text: str) -> tuple[int, int]:
    m, _, k = text.lower().partition("x")
    return int(m), int(k)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    if args.shape:
        shapes = tuple(
            Shape(m, k, "custom", tuple(args.tokens or (1, 256)))
            for m, k in map(_parse_shape, args.shape)
        )
    elif args.quick:
        shapes = QUICK_GPU_SHAPES if on_gpu else QUICK_SHAPES
    else:
        shapes = CPU_SHAPES
    if args.tokens and not args.shape:
        shapes = tuple(Shape(s.m, s.k, s.layer, tuple(args.tokens)) for s in shapes)
    gpu_tokens = None
    if on_gpu and not args.tokens and not args.quick:
        gpu_tokens = GPU_TOKENS
    dtypes = args.dtype or (["bf16", "fp16"] if on_gpu else ["fp32"])
    if on_gpu and args.quick and not args.dtype:
        dtypes = ["bf16"]
    return Settings(
        device=device,
        shapes=shapes,
        dtypes=dtypes,
        rounds=args.rounds or (3 if args.quick or on_gpu else 5),
        min_sample_ms=args.min_sample_ms or (20.0 if args.quick else 40.0),
        rep_ms=args.rep_ms,
        gpu_tokens=gpu_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes (CPU, < 3 min)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shape", nargs="+", help="layer shapes MxK (out x in) instead")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts N for every shape")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default fp32 on CPU")
    parser.add_argument("--rounds", type=int, help="rounds (default 5 on CPU; 3 on CUDA, quick)")
    parser.add_argument("--min-sample-ms", type=float, help="CPU: ms per sample (default 40)")
    parser.add_argument("--rep-ms", type=int, default=25, help="CUDA: do_bench rep per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--tag", help="file name suffix (default: '_quick' with --quick)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    stem = f"microbench_{settings.device}{tag}"
    rows, meta = run(settings)
    for path in write_results(rows, meta, args.out, stem, plots=not args.no_plots):
        print(f"wrote {path}")
    print((args.out / f"{stem}.md").read_text().split("## forward:")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
