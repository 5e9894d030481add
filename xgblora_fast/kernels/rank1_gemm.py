"""One GEMM with a rank-1 epilogue, used by the forward pass and by the ``dx`` backward pass.

    out[n, m] = sum_k A[n, k] B[m, k]  +  s * r[n] * vout[m]  (+ bias[m])
    r[n]      = sum_k A[n, k] vin[k]      (accumulated in the K loop from the A tiles)
    wsum[k]   = sum_n A[n, k] colw[n]     (optional, per row block: partial rows, see below)
    csum[k]   = sum_n A[n, k]             (optional, likewise)

Forward:  A = x [N, K],  B = W [M, K],          vin = a, vout = b, r = u = x.a,  bias.
dx:       A = dy [N, M], B = W^T (swapped strides), vin = b, vout = a, r = v = dy.b,
          colw = u: wsum = dy^T u (db before the scale), csum = dy^T 1 (dbias).

``B`` is addressed through strides only, so ``W`` is never transposed or copied. The row dot
and the column sums cost no extra memory traffic: they reuse the A tile already loaded for
``tl.dot``. Programs of the first column block store ``r`` (fp32) for the backward pass, and
(the only programs that see every column of A for their rows) one fp32 partial row of
``wsum``/``csum`` per row block; the launcher sums the partial rows, so the result stays
deterministic (no atomics). Rank-1 terms are broadcast FMAs, never ``tl.dot`` (which needs
every dimension >= 16 on real GPUs).

Tile configs are autotuned per architecture (``GEMM_CONFIGS``) with a grouped, L2-friendly
program order as in Triton's matmul tutorial; under the interpreter there is a single small
config and bf16 tiles are upcast right after loading (bf16 arithmetic is broken there,
triton issue 11584).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xgblora_fast.kernels.runtime import INTERPRET, cuda_capability, dot_precision


def _cfg(bn: int, bm: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "GROUP_N": group},
        num_warps=warps,
        num_stages=stages,
    )


# Per-architecture candidates (the N-dimension block is the token dimension). Small BLOCK_N
# configs serve decode-like calls (N <= 64); all dot dimensions stay >= 16.
GEMM_CONFIGS: dict[int, list[triton.Config]] = {
    90: [
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
        _cfg(16, 128, 128, 4, 4),
    ],
    80: [
        _cfg(128, 256, 32, 8, 3),
        _cfg(128, 128, 32, 4, 4),
        _cfg(64, 128, 32, 4, 4),
        _cfg(64, 64, 32, 4, 4),
        _cfg(16, 128, 64, 4, 4),
    ],
}
INTERPRETER_CONFIG = _cfg(16, 32, 32, 4, 1, group=2)


def gemm_configs() -> list[triton.Config]:
    """Autotune candidates for the device this process runs on (sm_80 list as the fallback)."""
    if INTERPRET:
        return [INTERPRETER_CONFIG]
    cap = cuda_capability()
    return GEMM_CONFIGS[90] if cap is not None and cap >= 90 else GEMM_CONFIGS[80]


# (BLOCK_N, BLOCK_M, BLOCK_K, num_warps) of the configs that spill registers once the column
# sums are on (python -m xgblora_fast.inspect, bf16): 128x128 tiles on 4 warps already keep 128
# fp32 accumulator registers per thread, and the column reductions push them past 255 (sm_90:
# 84 B of spills, sm_80: 36 B). The 8-warp 128x128 (sm_90) and 128x256 tiles stay.
COLSUM_SPILLING = {(128, 128, 64, 4), (128, 128, 32, 4)}


def colsum_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The candidates of a launch with ``COL_WSUM``/``COL_SUM`` on: those that do not spill."""
    return [
        cfg
        for cfg in configs
        if (cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"], cfg.num_warps)
        not in COLSUM_SPILLING
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return colsum_configs(configs) if kwargs["COL_WSUM"] or kwargs["COL_SUM"] else configs


# stride_bk in the key: the forward (W row-major, stride 1) and dx (W^T, stride M) tune apart;
# the column-sum flags too: they change the candidates and the cost of every config.
@triton.autotune(
    configs=gemm_configs(),
    key=["M", "K", "N_BUCKET", "stride_bk", "COL_WSUM", "COL_SUM"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def rank1_gemm_kernel(
    a_ptr,
    b_ptr,
    vin_ptr,
    vout_ptr,
    bias_ptr,
    rowdot_ptr,
    colw_ptr,
    wsum_ptr,
    csum_ptr,
    out_ptr,
    scale,
    N,
    M,
    K,
    N_BUCKET,  # autotune key only: next power of two of N, so each new batch size is not retuned
    stride_an,
    stride_ak,
    stride_bm,
    stride_bk,
    stride_on,
    stride_om,
    HAS_BIAS: tl.constexpr,
    COMPUTE_ROWDOT: tl.constexpr,
    ROWDOT_GIVEN: tl.constexpr,
    ADD_RANK1: tl.constexpr,
    COL_WSUM: tl.constexpr,
    COL_SUM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped ordering: GROUP_N row blocks share each column block of B while it is in L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_N * num_pid_m
    group_id = pid // num_pid_in_group
    first_pid_n = group_id * GROUP_N
    group_size_n = min(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + ((pid % num_pid_in_group) % group_size_n)
    pid_m = (pid % num_pid_in_group) // group_size_n

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    mask_m = rm < M
    a_ptrs = a_ptr + rn[:, None].to(tl.int64) * stride_an + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rm[None, :].to(tl.int64) * stride_bm

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    rowdot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if COL_WSUM:
        colw = tl.load(colw_ptr + rn, mask=mask_n, other=0.0)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        mask_k = rk < k_left
        a = tl.load(a_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if COMPUTE_ROWDOT:
            vin = tl.load(vin_ptr + k0 * BLOCK_K + rk, mask=mask_k, other=0.0).to(tl.float32)
            rowdot += tl.sum(a.to(tl.float32) * vin[None, :], axis=1)
        if COL_WSUM or COL_SUM:  # noqa: SIM102 (a constexpr test and a runtime test)
            # One column block is enough to see every column: the others skip the reductions.
            if pid_m == 0:
                # This chunk of the row block's partial row, [row_blocks, K] row-major.
                part_ptrs = pid_n.to(tl.int64) * K + k0 * BLOCK_K + rk
                if COL_WSUM:
                    wsum = tl.sum(a.to(tl.float32) * colw[:, None], axis=0)
                    tl.store(wsum_ptr + part_ptrs, wsum, mask=mask_k)
                if COL_SUM:
                    tl.store(csum_ptr + part_ptrs, tl.sum(a.to(tl.float32), axis=0), mask=mask_k)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if COMPUTE_ROWDOT:  # noqa: SIM102 (a constexpr test and a runtime test)
        if pid_m == 0:
            tl.store(rowdot_ptr + rn, rowdot, mask=mask_n)
    if ROWDOT_GIVEN:
        rowdot = tl.load(rowdot_ptr + rn, mask=mask_n, other=0.0)
    if ADD_RANK1:
        vout = tl.load(vout_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)
        acc += (scale * rowdot)[:, None] * vout[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)
        acc += bias[None, :]

    out_ptrs = out_ptr + rn[:, None].to(tl.int64) * stride_on + rm[None, :] * stride_om
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def rank1_gemm_triton(
    inp: torch.Tensor,
    b_matrix: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    vin: torch.Tensor | None = None,
    vout: torch.Tensor | None = None,
    rowdot: torch.Tensor | None = None,
    colw: torch.Tensor | None = None,
    with_colsum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``out = inp @ b_matrix^T (+ s * r vout^T) (+ bias)``, with ``r = inp @ vin`` fused in.

    Args:
        inp: ``[N, K]`` fp32/fp16/bf16, any strides.
        b_matrix: ``[M, K]`` same dtype as ``inp``, any strides (pass ``W`` or ``W.t()``).
        bias: ``[M]`` or None (vectors may be strided views; they are made contiguous).
        vin: ``[K]``: compute ``r = inp @ vin`` in the K loop and return it (fp32 ``[N]``).
        vout: ``[M]``: add ``s * r vout^T`` in the epilogue (needs ``vin`` or ``rowdot``).
        rowdot: ``[N]`` fp32 ``r`` computed elsewhere (the dropout path).
        colw: ``[N]`` fp32: also return ``inp^T colw`` (fp32 ``[K]``), from the same A tiles.
        with_colsum: also return the column sums ``inp^T 1`` (fp32 ``[K]``), likewise.
    Returns:
        ``(out [N, M] in inp.dtype, r, inp^T colw, inp^T 1)``, each of the last three None
        when not asked for.
    """
    N, K = inp.shape
    M = b_matrix.shape[0]
    # The kernel indexes the vectors with unit stride (matrices go by their strides).
    vin, vout, bias, rowdot, colw = (
        None if v is None else v.contiguous() for v in (vin, vout, bias, rowdot, colw)
    )
    out = torch.empty((N, M), device=inp.device, dtype=inp.dtype)
    computed = torch.empty(N, device=inp.device, dtype=torch.float32) if vin is not None else None
    rowdot_buf = computed if computed is not None else rowdot
    # One partial row per row block of the config the autotuner picks, which is known only
    # after the launch: room for the smallest BLOCK_N, and only the rows written are summed.
    min_block_n = min(cfg.kwargs["BLOCK_N"] for cfg in rank1_gemm_kernel.configs)
    partial_shape = (triton.cdiv(N, min_block_n), K)
    wsum = inp.new_empty(partial_shape, dtype=torch.float32) if colw is not None else None
    csum = inp.new_empty(partial_shape, dtype=torch.float32) if with_colsum else None
    dummy = out  # never read or written: the matching constexpr flag is off
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(M, meta["BLOCK_M"]),
    )
    rank1_gemm_kernel[grid](
        inp,
        b_matrix,
        vin if vin is not None else dummy,
        vout if vout is not None else dummy,
        bias if bias is not None else dummy,
        rowdot_buf if rowdot_buf is not None else dummy,
        colw if colw is not None else dummy,
        wsum if wsum is not None else dummy,
        csum if csum is not None else dummy,
        out,
        float(scale),
        N,
        M,
        K,
        triton.next_power_of_2(N),
        inp.stride(0),
        inp.stride(1),
        b_matrix.stride(0),
        b_matrix.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        COMPUTE_ROWDOT=vin is not None,
        ROWDOT_GIVEN=vin is None and rowdot is not None,
        ADD_RANK1=vout is not None,
        COL_WSUM=colw is not None,
        COL_SUM=with_colsum,
        UPCAST=INTERPRET,
        DOT_PRECISION=dot_precision(inp.dtype),
    )
    # The config of this launch (set on every launch, tuned or cached; the only one under the
    # interpreter). Rows past its row-block count are unwritten or hold autotuning runs' data.
    written = triton.cdiv(N, rank1_gemm_kernel.best_config.kwargs["BLOCK_N"])
    return (
        out,
        computed,
        wsum[:written].sum(0) if wsum is not None else None,
        csum[:written].sum(0) if csum is not None else None,
    )
