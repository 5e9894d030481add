"""The providers of ``bench/microbench.py``: the layers and merges under test, and their checks.

Providers (layer operations): ``nn.Linear (frozen)``, the floor every ratio is taken against;
``xgblora-fast[torch]`` (and ``[triton]``, ``[cuda]`` on a CUDA device); ``peft LoRA r=1`` and
``r=8`` (peft's LoRA ``Linear`` with its default fp32 adapters); ``unfused rank-1 (addmm_)``:
``y = x W^T + bias; y.addmm_(x a, b^T, alpha=s)`` in plain autograd, the way unsloth writes it.
Merge providers: ``copy_ (floor)``, ``xf.merge_`` per backend (with its safety pass over ``W``),
the same merge with the bound on ``max |W|`` kept from the previous merge (``..., W bound kept``:
what ``FastRank1Linear.merge_`` runs from a layer's second merge on, hence the one the GPU goal is
held against), peft's ``merge()``, the unfused provider's in-place ``W.addr_`` and a naive
``W += s * torch.outer(b, a)``. ``op_fn`` turns a provider into the no-argument function that is
timed for one of ``LAYER_OPS``.

Fairness: every provider shares the same ``W``/``bias`` Parameters; inputs are random (not
zeros) and ``b != 0``; before a provider is timed its outputs and gradients (``y``, ``dx`` and the
adapter's gradients; for the merge the updated rows of ``W``) are checked against a float64
reference (``check_provider``, ``check_merge``), which raise AssertionError if one disagrees.
Inputs rotate over several buffers (up to 64 MiB of ``x``) so caches do not flatter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import xgblora_fast as xf
from xgblora_fast.ops.checks import abs_max
from xgblora_fast.ops.merge import merge_with_bound_
from xgblora_fast.tools.roofline import (
    PROVIDER_COPY,
    PROVIDER_FLOOR,
    PROVIDER_PEFT_R1,
    provider_bound_kept,
    provider_fused,
)

LAYER_OPS = ("forward", "backward", "forward+backward")
PROVIDER_PEFT_R8 = "peft LoRA r=8"
PROVIDER_UNFUSED = "unfused rank-1 (addmm_)"
PROVIDER_NAIVE = "naive W += s*outer(b, a)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest max|error| / max|reference| accepted in the float64 checks.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
ROTATE_BYTES = 64 << 20  # x buffers rotated per provider: beyond a 32 MiB L3
MAX_ROTATE = 4
CHECK_ROWS_CPU = 64  # the CPU check runs on the first rows of x (rows are independent)
SCALE = 1.0


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


# --------------------------------------------------------------------------------- operations
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
