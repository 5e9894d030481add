"""One GEMM with a rank-1 epilogue, used by the forward pass and by the ``dx`` backward pass.

    out[n, m] = sum_k A[n, k] B[m, k]  +  s * r[n] * vout[m]  (+ bias[m])
    r[n]      = sum_k A[n, k] vin[k]      (in the K loop: a second, small ``tl.dot`` on sm_90)

Forward:  A = x [N, K],  B = W [M, K],          vin = a, vout = b, r = u = x.a,  bias.
dx:       A = dy [N, M], B = W^T (swapped strides), vin = b, vout = a, r = v = dy.b.

``B`` is addressed through strides only, so ``W`` is never transposed or copied. Programs of the
first column block store ``r`` (fp32) for the backward pass.

On sm_90 every tile loaded in the K loop feeds only ``tl.dot``. There ``tl.dot`` is an asynchronous
wgmma that reads its operands from shared memory while the next tiles are being loaded, and
Triton's software pipeliner gives an operand the extra shared-memory buffer this needs only when
every user of the loaded tile is a dot: a tile that also fed ``tl.sum(a * vin)`` (the row dot)
or column sums got ``num_stages - 1`` buffers, so the load ``num_stages - 1`` iterations ahead
overwrote the buffer the wgmma still in flight was reading (Triton issue 6691; A100's
synchronous ``mma.sync`` is unaffected). Hence:

- The row dot is ``tl.dot(a, V)`` with ``V`` a ``[BLOCK_K, 16]`` tile of ``vin_split``, a
  ``[K, 4]`` matrix in the input dtype built by ``split_vector`` (columns 4-15 of the tile are
  masked to zero): ``vin`` scaled by a power of two and split into 3 parts (``hi =
  v.to(dtype)``, ``mid``, ``lo`` from the exact fp32 remainders, each scaled up by ``2^bits`` so
  fp16 does not underflow), the fourth column zero. After the loop the fp32 accumulator's
  columns are scaled back by ``vin_unscale`` (fp32 ``[4]``, powers of two) and summed: ``r``
  is the fp32 dot of the tile with ``vin`` to ~24 bits, as accurate as the former broadcast-FMA
  row dot. fp32 inputs with IEEE ``tl.dot`` need no split (one column); with TF32 the ``A``
  tile is rounded to TF32 in the row dot too.
  On sm_80 (``rowdot_as_dot``) the row dot stays broadcast FMAs on the A tile: ``mma.sync`` is
  synchronous (no race), and there the extra accumulator made the largest configs spill.
- The column sums of ``dy`` for ``db`` and ``dbias`` are not in this kernel: the backward runs
  ``weighted_colsum_triton`` (``rank1_reduce.py``) over ``dy``. Their summation order then does
  not depend on the GEMM's autotuned config, and there are no partial-row buffers to size.

``tests/test_wgmma_buffers.py`` checks the invariant from the sm_90 TTGIR of every config.
``tl.dot`` needs every dimension >= 16 on real GPUs (the 16 columns of ``V``).

Tile configs are autotuned per architecture (``GEMM_CONFIGS``) with a grouped, L2-friendly
program order as in Triton's matmul tutorial. The autotune key holds no exact batch size (``N``
is not specialised, ``N_BUCKET`` is its next power of two), results are cached on disk across
processes (``cache_results=True``). Under the interpreter there is a single small config and the
bf16 tiles are upcast right after loading (bf16 arithmetic is broken there, triton issue 11584).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def rowdot_as_dot(capability: int | None) -> bool:
    """Whether the row dot is a ``tl.dot`` (sm_90's asynchronous wgmma needs it, and the
    interpreter runs that path) or broadcast FMAs on the A tile (sm_80: synchronous
    ``mma.sync`` has no race, and the FMA row dot spills fewer registers there)."""
    return INTERPRET or (capability is not None and capability >= 90)


# Columns of the row-dot tile V (tl.dot needs >= 16); the columns stored in memory (the parts of
# vin and a zero: 8-byte rows in bf16/fp16, which cp.async can copy), the others are masked off.
VIN_COLS = 16
VIN_STORED = 4
VIN_PARTS = 3
# Significand bits (with the implicit one) of each dot input dtype: the scale between parts.
_SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 11}  # fp32: as TF32


SPLIT_BLOCK = 1024


@triton.jit
def split_vector_kernel(
    v_ptr,
    out_ptr,
    unscale_ptr,
    K,
    BITS: tl.constexpr,
    PARTS: tl.constexpr,
    STORED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: ``max |v|``, then the parts of every element and the ``STORED`` scales."""
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(v_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    top = tl.max(amax, axis=0)
    exponent = ((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126  # top = m 2^e, m in [.5, 1)
    shift = tl.minimum(tl.maximum(14 - exponent, -60), 60)
    scale = ((shift + 127) << 23).to(tl.float32, bitcast=True)  # 2^shift, exactly
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        rest = tl.load(v_ptr + k0 + offs, mask=mask, other=0.0).to(tl.float32) * scale
        for j in tl.static_range(STORED):
            if j < PARTS:
                part = rest.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + (k0 + offs) * STORED + j, part, mask=mask)
                rest = (rest - part.to(tl.float32)) * (2.0**BITS)  # exact
            else:
                tl.store(out_ptr + (k0 + offs) * STORED + j, tl.zeros_like(part), mask=mask)
    j = tl.arange(0, STORED)
    unscale = ((127 - shift - j * BITS) << 23).to(tl.float32, bitcast=True)
    tl.store(unscale_ptr + j, tl.where(j < PARTS, unscale, 0.0))


def split_vector(v: torch.Tensor, dtype: torch.dtype, exact_fp32: bool):
    """``(V [K, 4] in dtype, unscale [4] fp32)`` with ``sum_j V[:, j] * unscale[j] == v``.

    ``v`` (any float dtype) is scaled by a power of two so that ``max |v|`` lies in ``[2^13,
    2^14)`` (fp16's range holds every part, subnormals are avoided), then split into
    ``VIN_PARTS`` parts, each the rounding to ``dtype`` of the exact fp32 remainder of the ones
    before, scaled up by ``2^bits``. Three parts of 8 (bf16) or 11 (fp16) bits cover fp32's 24.
    With ``exact_fp32`` (fp32 inputs, IEEE ``tl.dot``) ``V``'s first column is ``v`` (scaled).
    One kernel launch, no host synchronisation (it runs under CUDA graphs).
    """
    v = v.contiguous()
    (k,) = v.shape
    out = torch.empty((k, VIN_STORED), device=v.device, dtype=dtype)
    unscale = torch.empty(VIN_STORED, device=v.device, dtype=torch.float32)
    split_vector_kernel[(1,)](
        v,
        out,
        unscale,
        k,
        BITS=_SIGNIFICAND_BITS[dtype],
        PARTS=1 if exact_fp32 else VIN_PARTS,
        STORED=VIN_STORED,
        BLOCK=SPLIT_BLOCK,
    )
    return out, unscale


# stride_bk in the key: the forward (W row-major, stride 1) and dx (W^T, stride M) tune apart.
# N is not in the key and not specialised: a new batch size reuses the tuned config of its
# N_BUCKET, and results go to Triton's on-disk cache (TRITON_CACHE_DIR) for later processes.
@triton.autotune(
    configs=gemm_configs(),
    key=["M", "K", "N_BUCKET", "stride_bk"],
    cache_results=True,
)
@triton.jit(do_not_specialize=["N"])
def rank1_gemm_kernel(
    a_ptr,
    b_ptr,
    vin_ptr,
    vin_unscale_ptr,
    vout_ptr,
    bias_ptr,
    rowdot_ptr,
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
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    VCOLS: tl.constexpr,
    VSTORED: tl.constexpr,
    ROWDOT_DOT: tl.constexpr,
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
    rv = tl.arange(0, VCOLS)
    mask_n = rn < N
    mask_m = rm < M
    a_ptrs = a_ptr + rn[:, None].to(tl.int64) * stride_an + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rm[None, :].to(tl.int64) * stride_bm
    mask_v = rv < VSTORED
    v_ptrs = vin_ptr + rk[:, None] * VSTORED + rv[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    racc = tl.zeros((BLOCK_N, VCOLS), dtype=tl.float32)
    rowdot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        mask_k = rk < k_left
        # Each tile loaded here feeds tl.dot and nothing else (module docstring).
        a = tl.load(a_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if COMPUTE_ROWDOT and ROWDOT_DOT:
            v = tl.load(v_ptrs, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            racc = tl.dot(a, v, racc, input_precision=DOT_PRECISION)
            v_ptrs += BLOCK_K * VSTORED
        if COMPUTE_ROWDOT and not ROWDOT_DOT:  # sm_80 only (rowdot_as_dot)
            vin = tl.load(vin_ptr + k0 * BLOCK_K + rk, mask=mask_k, other=0.0).to(tl.float32)
            rowdot += tl.sum(a.to(tl.float32) * vin[None, :], axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if COMPUTE_ROWDOT and ROWDOT_DOT:
        unscale = tl.load(vin_unscale_ptr + rv, mask=mask_v, other=0.0)
        rowdot = tl.sum(racc * unscale[None, :], axis=1)
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


# A config every launch of rank1_gemm_triton uses instead of the autotuner's pick (None: tune).
_forced_config: triton.Config | None = None


@contextlib.contextmanager
def forced_config(config: triton.Config) -> Iterator[None]:
    """Inside the block, ``rank1_gemm_triton`` launches ``config`` instead of autotuning: the
    race check of ``bench/gpu_check.py`` runs every candidate config this way."""
    global _forced_config
    previous, _forced_config = _forced_config, config
    try:
        yield
    finally:
        _forced_config = previous


def rank1_gemm_triton(
    inp: torch.Tensor,
    b_matrix: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    vin: torch.Tensor | None = None,
    vout: torch.Tensor | None = None,
    rowdot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out = inp @ b_matrix^T (+ s * r vout^T) (+ bias)``, with ``r = inp @ vin`` fused in.

    Args:
        inp: ``[N, K]`` fp32/fp16/bf16, any strides.
        b_matrix: ``[M, K]`` same dtype as ``inp``, any strides (pass ``W`` or ``W.t()``).
        bias: ``[M]`` or None (vectors may be strided views; they are made contiguous).
        vin: ``[K]``: compute ``r = inp @ vin`` in the K loop and return it (fp32 ``[N]``).
        vout: ``[M]``: add ``s * r vout^T`` in the epilogue (needs ``vin`` or ``rowdot``).
        rowdot: ``[N]`` fp32 ``r`` computed elsewhere (the dropout path).
    Returns:
        ``(out [N, M] in inp.dtype, r)``, ``r`` None when ``vin`` is None.
    """
    N, K = inp.shape
    M = b_matrix.shape[0]
    # The kernel indexes the vectors with unit stride (matrices go by their strides).
    vout, bias, rowdot = (None if v is None else v.contiguous() for v in (vout, bias, rowdot))
    precision = dot_precision(inp.dtype)
    out = torch.empty((N, M), device=inp.device, dtype=inp.dtype)
    computed = torch.empty(N, device=inp.device, dtype=torch.float32) if vin is not None else None
    rowdot_buf = computed if computed is not None else rowdot
    as_dot = vin is not None and rowdot_as_dot(cuda_capability())
    if as_dot:
        exact = inp.dtype == torch.float32 and precision == "ieee"
        vin_split, vin_unscale = split_vector(vin, inp.dtype, exact)
    else:  # the FMA row dot reads vin as fp32
        vin_split = None if vin is None else vin.float().contiguous()
        vin_unscale = None
    dummy = out  # never read or written: the matching constexpr flag is off
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(M, meta["BLOCK_M"]),
    )
    kernel, launch_options = rank1_gemm_kernel, {}
    if _forced_config is not None:
        kernel = rank1_gemm_kernel.fn  # the kernel under the autotuner
        launch_options = dict(
            _forced_config.kwargs,
            num_warps=_forced_config.num_warps,
            num_stages=_forced_config.num_stages,
        )
    kernel[grid](
        inp,
        b_matrix,
        vin_split if vin_split is not None else dummy,
        vin_unscale if vin_unscale is not None else dummy,
        vout if vout is not None else dummy,
        bias if bias is not None else dummy,
        rowdot_buf if rowdot_buf is not None else dummy,
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
        UPCAST=INTERPRET,
        DOT_PRECISION=precision,
        VCOLS=VIN_COLS,
        VSTORED=VIN_STORED,
        ROWDOT_DOT=as_dot,
        **launch_options,
    )
    return out, computed
