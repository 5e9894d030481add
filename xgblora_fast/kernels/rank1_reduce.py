"""Column reductions for the adapter gradients, with no N x M (or N x K) temporary.

    wsum[c] = sum_n X[n, c] * w[n]       (da = s * x^T v,  db = s * dy^T u)
    csum[c] = sum_n X[n, c]              (dbias = sum_n dy, from the same dy tiles as db)

One streaming pass over ``X``. The row range is split over ``SPLIT`` programs per column block
so small ``C`` still fills the GPU; each split writes its own fp32 partial row and the host sums
the ``[SPLIT, C]`` partials, which keeps the result deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xgblora_fast.kernels import reduce_launch
from xgblora_fast.kernels.rank1_linear_parts import tile_offsets
from xgblora_fast.kernels.runtime import INTERPRET

REDUCE_BLOCK_N = reduce_launch.BLOCK_N
REDUCE_BLOCK_C = 32 if INTERPRET else reduce_launch.BLOCK_C
REDUCE_NUM_WARPS = 4
# The interpreter wants few programs (and small tests still want several splits).
REDUCE_TARGET_PROGRAMS = 4 if INTERPRET else reduce_launch.TARGET_PROGRAMS
REDUCE_MIN_ROWS = REDUCE_BLOCK_N if INTERPRET else reduce_launch.MIN_ROWS_PER_SPLIT


@triton.jit
def weighted_colsum_kernel(
    x_ptr,
    w_ptr,
    wsum_ptr,
    csum_ptr,
    N,
    C,
    rows_per_split,
    stride_xn,
    stride_xc,
    HAS_CSUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = rc < C
    acc_w = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    n_start = pid_s * rows_per_split
    n_stop = tl.minimum(n_start + rows_per_split, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < n_stop
        x = tl.load(
            x_ptr + tile_offsets(rn, rc, stride_xn, stride_xc),
            mask=mask_n[:, None] & mask_c[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(w_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc_w += x * w[:, None]
        if HAS_CSUM:
            acc_c += x
    out_offs = pid_s * C + rc
    tl.store(wsum_ptr + out_offs, tl.sum(acc_w, axis=0), mask=mask_c)
    if HAS_CSUM:
        tl.store(csum_ptr + out_offs, tl.sum(acc_c, axis=0), mask=mask_c)


def weighted_colsum_triton(
    x: torch.Tensor, w: torch.Tensor, with_colsum: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x^T w, x^T 1)`` as fp32 ``[C]`` vectors.

    Args:
        x: ``[N, C]`` fp32/fp16/bf16, any strides.
        w: ``[N]`` fp32.
        with_colsum: also return the plain column sums (else None).
    """
    N, C = x.shape
    col_blocks = triton.cdiv(C, REDUCE_BLOCK_C)
    split, rows_per_split = reduce_launch.colsum_split(
        N, C, REDUCE_BLOCK_N, REDUCE_BLOCK_C, REDUCE_TARGET_PROGRAMS, REDUCE_MIN_ROWS
    )
    wsum = torch.empty((split, C), device=x.device, dtype=torch.float32)
    csum = torch.empty((split, C), device=x.device, dtype=torch.float32) if with_colsum else wsum
    weighted_colsum_kernel[(col_blocks, split)](
        x,
        w,
        wsum,
        csum,
        N,
        C,
        rows_per_split,
        x.stride(0),
        x.stride(1),
        HAS_CSUM=with_colsum,
        BLOCK_N=REDUCE_BLOCK_N,
        BLOCK_C=REDUCE_BLOCK_C,
        num_warps=REDUCE_NUM_WARPS,
    )
    return wsum.sum(0), (csum.sum(0) if with_colsum else None)
