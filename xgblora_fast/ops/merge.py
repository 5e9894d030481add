"""The in-place rank-1 merge ``W += s * b a^T`` as a mutating custom op.

Rounding: ``"nearest"`` (round-to-nearest-even into W's dtype) or ``"stochastic"`` (unbiased,
counter-based bits from ``seed``: the same seed gives the same bits on every rank and backend).
fp32 weights are always rounded to nearest: an fp32 result needs no stochastic rounding.

Validation (``checks.check_merge_args``) runs first: a merge that would write NaN/Inf raises and
leaves ``W`` untouched.
"""

from __future__ import annotations

import torch

from xgblora_fast.ops import reference
from xgblora_fast.ops._native import native_module
from xgblora_fast.ops.backend import resolve_backend
from xgblora_fast.ops.checks import check_backend, check_merge_args

SEED_BITS = 31


def _merge_triton(weight, a, b, scale, stochastic, seed):
    from xgblora_fast.kernels.merge import rank1_merge_triton_

    rank1_merge_triton_(weight, a, b, scale, stochastic, seed)


def _merge_cuda(weight, a, b, scale, stochastic, seed):
    native_module()  # loads the extension (registering its ops) on first use
    torch.ops.xgblora_fast.cuda_merge_(weight, a, b, scale, stochastic, seed)


_MERGE = {"torch": reference.merge_reference_, "triton": _merge_triton, "cuda": _merge_cuda}


@torch.library.custom_op("xgblora_fast::merge_", mutates_args=("weight",))
def merge_op(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    stochastic: bool,
    seed: int,
    backend: str,
) -> None:
    """In-place ``weight [M, K] += scale * b [M] a [K]^T`` (arguments already validated)."""
    if weight.numel() == 0:
        return
    _MERGE[resolve_backend(backend, weight.device)](weight, a, b, scale, stochastic, seed)


@merge_op.register_fake
def _(weight, a, b, scale, stochastic, seed, backend):
    return None


def merge_(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    rounding: str = "nearest",
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Merge a rank-1 update into ``weight`` in place: ``weight += scale * outer(b, a)``.

    Args:
        weight: ``[M, K]`` fp32/fp16/bf16, any strides (a transposed view is fine).
        a: ``[K]``; b: ``[M]``; fp32 or weight's dtype.
        scale: the float ``s``.
        rounding: ``"nearest"`` or ``"stochastic"``.
        seed: for stochastic rounding; None draws one from torch's default generator (so
            ``torch.manual_seed`` makes it reproducible). Only the low 31 bits are used.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``.
    Returns:
        ``weight`` (same object).
    Raises:
        ValueError/TypeError before anything is written, for bad shapes, dtypes or devices, or
        an update that contains NaN/Inf or would overflow ``weight``'s dtype.
    """
    scale = check_merge_args(weight, a, b, scale, rounding)
    check_backend(backend)
    resolve_backend(backend, weight.device)
    stochastic = rounding == "stochastic"
    if seed is None:
        seed = int(torch.randint(0, 2**SEED_BITS, ())) if stochastic else 0
    seed = int(seed) & (2**SEED_BITS - 1)
    with torch.no_grad():
        merge_op(weight, a.detach(), b.detach(), scale, stochastic, seed, backend)
    return weight
