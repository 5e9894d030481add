"""In-place rank-1 merge ``W += s * b a^T``: one read and one write of ``W``, no temporary.

Bandwidth-bound: each program owns a ``BLOCK_M x BLOCK_K`` tile of ``W``, loads the matching
slices of ``a`` and ``b``, computes ``w + (s * b_i) * a_j`` in fp32 and stores it rounded to
``W``'s dtype, either to nearest-even or stochastically with counter-based bits
(``rng.counter_hash`` of the global element index ``(row_offset + i) * K + j``: a row shard
merged with its offset draws the bits of the whole-W merge), or compensated (Kahan): with
a buffer ``C`` of W's shape and dtype, ``y = (s * b_i) * a_j + c``, ``w' = round(w + y)`` and
``c' = round(y - (w' - w))``, the part of ``y`` that rounding dropped, kept for the next merge
(one more read and write of ``C``; see ``reference.kahan_step`` for why it is exact).

The launcher passes ``enable_fp_fusion=False`` so the multiply and the add round separately,
exactly as in the PyTorch reference: with the same seed every backend writes the same bits.
"""

import torch
import triton
import triton.language as tl

from xgblora_fast.kernels.rng import (
    counter_hash,
    round_nearest,
    round_stochastic,
    to_float32_exact,
)

MERGE_BLOCK_M = 16
MERGE_BLOCK_K = 256
MERGE_NUM_WARPS = 4

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# The JIT turns an int argument equal to 1 into a constexpr (a Python int without ``.to``), and
# each value divisible by 16 (or equal to 0 or 1) would compile anew: the seed and the row offset
# are runtime values, never specialised.
@triton.jit(do_not_specialize=["seed", "row_offset"])
def rank1_merge_kernel(
    w_ptr,
    c_ptr,
    a_ptr,
    b_ptr,
    scale,
    seed,
    row_offset,
    M,
    K,
    stride_wm,
    stride_wk,
    stride_cm,
    stride_ck,
    STOCHASTIC: tl.constexpr,
    KAHAN: tl.constexpr,
    W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_k = rk < K
    mask = mask_m[:, None] & mask_k[None, :]
    ptrs = w_ptr + rm[:, None].to(tl.int64) * stride_wm + rk[None, :].to(tl.int64) * stride_wk

    w = to_float32_exact(tl.load(ptrs, mask=mask, other=0.0))
    a = to_float32_exact(tl.load(a_ptr + rk, mask=mask_k, other=0.0))
    b = to_float32_exact(tl.load(b_ptr + rm, mask=mask_m, other=0.0))
    sb = scale * b
    update = sb[:, None] * a[None, :]

    if KAHAN:
        c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rk[None, :].to(tl.int64) * stride_ck
        y = update + to_float32_exact(tl.load(c_ptrs, mask=mask, other=0.0))
        out = round_nearest(w + y, W_DTYPE)
        # The rounded weight widened back, minus the old one: exact, so y minus it is the
        # part rounding dropped.
        tl.store(c_ptrs, round_nearest(y - (to_float32_exact(out) - w), W_DTYPE), mask=mask)
    elif STOCHASTIC:
        idx = (rm[:, None].to(tl.int64) + row_offset) * K + rk[None, :]
        out = round_stochastic(w + update, counter_hash(seed, idx), W_DTYPE)
    else:
        out = round_nearest(w + update, W_DTYPE)
    tl.store(ptrs, out, mask=mask)


def rank1_merge_triton_(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    rounding: str,
    seed: int,
    compensation: torch.Tensor | None = None,
    row_offset: int = 0,
) -> None:
    """Launch ``rank1_merge_kernel`` on ``weight [M, K]`` (any strides), in place.

    ``a [K]`` and ``b [M]`` are fp32 or ``weight``'s dtype; ``rounding`` is ``"nearest"``,
    ``"stochastic"`` or ``"kahan"``, which also updates ``compensation [M, K]`` (W's dtype, any
    strides) in place; ``row_offset`` is the global index of W's first row (stochastic bits).
    Arguments are validated by the caller.
    """
    M, K = weight.shape
    a, b = a.contiguous(), b.contiguous()  # the kernel reads the vectors with unit stride
    kahan = rounding == "kahan"
    comp = compensation if kahan else weight  # never read without KAHAN: any valid pointer
    grid = (triton.cdiv(M, MERGE_BLOCK_M), triton.cdiv(K, MERGE_BLOCK_K))
    rank1_merge_kernel[grid](
        weight,
        comp,
        a,
        b,
        float(scale),
        int(seed),
        int(row_offset),
        M,
        K,
        weight.stride(0),
        weight.stride(1),
        comp.stride(0),
        comp.stride(1),
        STOCHASTIC=rounding == "stochastic" and weight.dtype != torch.float32,
        KAHAN=kahan,
        W_DTYPE=_TL_DTYPE[weight.dtype],
        BLOCK_M=MERGE_BLOCK_M,
        BLOCK_K=MERGE_BLOCK_K,
        num_warps=MERGE_NUM_WARPS,
        enable_fp_fusion=False,
    )
