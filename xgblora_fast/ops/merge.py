"""The in-place rank-1 merge ``W += s * b a^T`` as a mutating custom op.

Rounding: ``"nearest"`` (round-to-nearest-even into W's dtype), ``"stochastic"`` (unbiased,
counter-based bits from ``seed`` and the element's global index ``(row_offset + i) * K + j``: the
same seed gives the same bits on every rank and backend, and a row block of W merged alone with
its ``row_offset`` gets the bits of those rows in the whole-W merge, as FSDP shards need) or
``"kahan"`` (compensated: a buffer ``C`` of W's shape and dtype keeps what rounding dropped and
adds it back at the next merge). fp32 weights are rounded to nearest under ``"stochastic"``: an
fp32 result needs no stochastic rounding; ``"kahan"`` on fp32 is classic Kahan summation.

Validation (``checks.check_merge_args``) runs first: a merge that would write NaN/Inf raises and
leaves ``W`` (and ``C``) untouched.
"""

from __future__ import annotations

import torch

from xgblora_fast.ops import reference
from xgblora_fast.ops._native import native_module
from xgblora_fast.ops.autocast import autocast_off
from xgblora_fast.ops.backend import resolve_backend
from xgblora_fast.ops.checks import MergeStats, check_backend, check_merge_args

SEED_BITS = 31


def _merge_triton(weight, a, b, scale, rounding, seed, compensation, row_offset):
    from xgblora_fast.kernels.merge import rank1_merge_triton_

    rank1_merge_triton_(weight, a, b, scale, rounding, seed, compensation, row_offset)


def _merge_cuda(weight, a, b, scale, rounding, seed, compensation, row_offset):
    native_module()  # loads the extension (registering its ops) on first use
    torch.ops.xgblora_fast.cuda_merge_(
        weight, a, b, scale, rounding, seed, compensation, row_offset
    )


_MERGE = {"torch": reference.merge_reference_, "triton": _merge_triton, "cuda": _merge_cuda}


@torch.library.custom_op("xgblora_fast::merge_", mutates_args=("weight", "compensation"))
def merge_op(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    rounding: str,
    seed: int,
    backend: str,
    compensation: torch.Tensor | None,
    row_offset: int = 0,
) -> None:
    """In-place ``weight [M, K] += scale * b [M] a [K]^T`` (arguments already validated);
    ``compensation [M, K]`` (W's dtype) is read and written for ``rounding="kahan"`` only;
    ``row_offset``: global index of W's first row (stochastic bits)."""
    if weight.numel() == 0:
        return
    merge = _MERGE[resolve_backend(backend, weight.device)]
    with autocast_off(weight.device):  # the update is fp32 even when merged inside autocast
        merge(weight, a, b, scale, rounding, seed, compensation, row_offset)


@merge_op.register_fake
def _(weight, a, b, scale, rounding, seed, backend, compensation, row_offset=0):
    return None


def merge_(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    rounding: str = "nearest",
    seed: int | None = None,
    backend: str = "auto",
    compensation: torch.Tensor | None = None,
    row_offset: int = 0,
    weight_abs_max: float | None = None,
) -> torch.Tensor:
    """Merge a rank-1 update into ``weight`` in place: ``weight += scale * outer(b, a)``.

    Args:
        weight: ``[M, K]`` fp32/fp16/bf16, any strides (a transposed view is fine).
        a: ``[K]``; b: ``[M]``; fp32 or weight's dtype.
        scale: the float ``s``.
        rounding: ``"nearest"``, ``"stochastic"`` or ``"kahan"``.
        seed: for stochastic rounding; None draws one from torch's default generator (so
            ``torch.manual_seed`` makes it reproducible). Only the low 31 bits are used.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``.
        compensation: for ``rounding="kahan"`` only (and then required): ``[M, K]`` in
            ``weight``'s dtype and device, any strides, zeros before the first merge and kept
            between merges (``torch.zeros_like(weight)``). Per element, in fp32:
            ``y = s b_i a_j + c``, ``w' = round(w + y)``, ``c' = round(y - (w' - w))``.
        row_offset: int >= 0, the global row index of ``weight``'s first row when ``weight`` is
            rows ``r0:r1`` of a larger matrix (a row shard, as FSDP keeps): stochastic rounding
            draws the bits of element ``(row_offset + i, j)``, so merging every row block with
            its ``b[r0:r1]`` and ``row_offset=r0`` (and, for Kahan, its rows of the buffer) writes
            the bits of the whole-matrix merge. ``K`` stays ``weight``'s row length: the blocks
            must be whole rows. Nearest and Kahan do not depend on it.
        weight_abs_max: a finite float ``>= max |W|`` that the caller guarantees (e.g. the bound
            ``merge_with_bound_`` returned for this ``W``, unwritten since), or None. When it
            proves the merge cannot overflow, the safety check skips its pass over ``W``: the
            merge then reads and writes ``W`` once, a copy's traffic.
    Returns:
        ``weight`` (same object).
    Raises:
        ValueError/TypeError before anything is written, for bad shapes, dtypes or devices, or
        an update that contains NaN/Inf or would overflow ``weight``'s dtype.
    """
    merge_with_bound_(
        weight, a, b, scale, rounding, seed, backend, compensation, row_offset, weight_abs_max
    )
    return weight


def merge_with_bound_(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    rounding: str = "nearest",
    seed: int | None = None,
    backend: str = "auto",
    compensation: torch.Tensor | None = None,
    row_offset: int = 0,
    weight_abs_max: float | None = None,
    stats: MergeStats | None = None,
) -> float | None:
    """``merge_`` that returns an upper bound on ``max |W|`` after the merge (a float), or None
    when a zero update left ``W`` unread. Passed back as ``weight_abs_max`` at the next merge of
    the same ``W`` (nothing else having written it), it spares that merge its pass over ``W``:
    ``FastRank1Linear`` keeps it, keyed by the weight's version counter.

    The safety check reads its values from the device in one transfer (``checks.host_values``);
    ``stats`` (``checks.MergeStats``, measured on these tensors as they are now, e.g. for a
    round's merges in one transfer) spares it that read."""
    scale, bound = check_merge_args(
        weight, a, b, scale, rounding, compensation, row_offset, weight_abs_max, stats
    )
    check_backend(backend)
    resolve_backend(backend, weight.device)
    stochastic = rounding == "stochastic"
    if seed is None:
        seed = int(torch.randint(0, 2**SEED_BITS, ())) if stochastic else 0
    seed = int(seed) & (2**SEED_BITS - 1)
    with torch.no_grad():
        merge_op(
            weight, a.detach(), b.detach(), scale, rounding, seed, backend, compensation, row_offset
        )
    return bound
