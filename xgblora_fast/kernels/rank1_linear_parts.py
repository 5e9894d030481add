"""The rank-1 parts of ``rank1_linear`` around cuBLAS GEMMs (the "cublas" path).

    rowdot:   u[n] = sum_k X[n, k] * a[k]        (u = x a, v = dy b)
    epilogue: Y[n, m] += s * u[n] * b[m]         (in place on the GEMM's output)
    colsum:   c[m] = sum_n X[n, m]               (dbias; weighted sums: ``weighted_colsum_triton``)

Each is one streaming pass with fp32 accumulation and no fp32 copy of ``X``/``Y``: the rowdot
reads ``X`` once, the epilogue reads and writes ``Y`` once. Offsets are int64, so views whose
``N * stride`` passes 2^31 elements address correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xgblora_fast.kernels.runtime import INTERPRET

ROWDOT_BLOCK_N = 16 if INTERPRET else 32
ROWDOT_BLOCK_K = 32 if INTERPRET else 128
EPILOGUE_BLOCK_N = 16 if INTERPRET else 32
EPILOGUE_BLOCK_M = 32 if INTERPRET else 128
PARTS_NUM_WARPS = 4


@triton.jit
def tile_offsets(rows, cols, stride_row, stride_col):
    """``rows[:, None] * stride_row + cols[None, :] * stride_col`` in int64.

    In int32 either product wraps once it reaches 2^31 (a column-major ``[N, C]`` view with
    ``N * C >= 2^31`` has ``cols * stride_col`` past it), and the load reads the wrong address.
    """
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def rowdot_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    N,
    K,
    stride_xn,
    stride_xk,
    stride_a,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        x = tl.load(
            x_ptr + tile_offsets(rn, rk, stride_xn, stride_xk),
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        a = tl.load(a_ptr + rk.to(tl.int64) * stride_a, mask=mask_k, other=0.0).to(tl.float32)
        acc += x * a[None, :]
    tl.store(out_ptr + rn, tl.sum(acc, axis=1), mask=mask_n)


@triton.jit
def rank1_epilogue_kernel(
    y_ptr,
    u_ptr,
    b_ptr,
    N,
    M,
    stride_yn,
    stride_ym,
    stride_b,
    scale,
    ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    offs = tile_offsets(rn, rm, stride_yn, stride_ym)
    u = tl.load(u_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rm.to(tl.int64) * stride_b, mask=rm < M, other=0.0).to(tl.float32)
    out = (scale * u)[:, None] * b[None, :]
    if ACCUMULATE:
        out += tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


def rowdot_triton(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x @ a`` as fp32 ``[N]``, accumulated in fp32 from ``x``'s own dtype (no fp32 copy).

    Args:
        x: ``[N, K]`` fp32/fp16/bf16, any strides.
        a: ``[K]`` any floating dtype, any stride.
    """
    N, K = x.shape
    out = torch.empty((N,), device=x.device, dtype=torch.float32)
    if N == 0:
        return out
    grid = (triton.cdiv(N, ROWDOT_BLOCK_N),)
    rowdot_kernel[grid](
        x,
        a,
        out,
        N,
        K,
        x.stride(0),
        x.stride(1),
        a.stride(0),
        BLOCK_N=ROWDOT_BLOCK_N,
        BLOCK_K=ROWDOT_BLOCK_K,
        num_warps=PARTS_NUM_WARPS,
    )
    return out


def _launch_epilogue(y, u, b, scale, accumulate):
    N, M = y.shape
    if N == 0 or M == 0:
        return y
    u = u.contiguous()
    grid = (triton.cdiv(N, EPILOGUE_BLOCK_N), triton.cdiv(M, EPILOGUE_BLOCK_M))
    rank1_epilogue_kernel[grid](
        y,
        u,
        b,
        N,
        M,
        y.stride(0),
        y.stride(1),
        b.stride(0),
        float(scale),
        ACCUMULATE=accumulate,
        BLOCK_N=EPILOGUE_BLOCK_N,
        BLOCK_M=EPILOGUE_BLOCK_M,
        num_warps=PARTS_NUM_WARPS,
    )
    return y


def rank1_epilogue_(
    y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``y += scale * u b^T`` in place (fp32 arithmetic, one rounding to y's dtype); returns y.

    One read and one write of ``y``.

    Args:
        y: ``[N, M]`` fp32/fp16/bf16, any strides without overlap (a GEMM's output).
        u: ``[N]`` fp32.
        b: ``[M]`` any floating dtype, any stride.
    """
    return _launch_epilogue(y, u, b, scale, accumulate=True)


def rank1_outer(u: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * u b^T`` as a new contiguous ``[N, M]`` tensor of ``dtype`` (computed in fp32,
    rounded once; one write, no fp32 ``N x M`` temporary)."""
    y = torch.empty((u.shape[0], b.shape[0]), device=u.device, dtype=dtype)
    return _launch_epilogue(y, u, b, scale, accumulate=False)


def colsum_triton(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(0)`` as fp32 ``[C]``, accumulated in fp32 from ``x``'s own dtype (no fp32 copy)."""
    from xgblora_fast.kernels.rank1_reduce import weighted_colsum_triton

    N, C = x.shape
    if N == 0:
        return torch.zeros((C,), device=x.device, dtype=torch.float32)
    ones = torch.ones((N,), device=x.device, dtype=torch.float32)
    _, csum = weighted_colsum_triton(x, ones, with_colsum=True)
    return csum
