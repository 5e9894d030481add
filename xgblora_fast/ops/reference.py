"""The PyTorch path: the CPU backend, and the reference the kernels are tested against.

Everything here mirrors a Triton kernel bit for bit where bits are promised (the merge and its
counter-based random numbers) and to floating-point accuracy elsewhere.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MERGE_CHUNK_ELEMENTS = 1 << 20  # bounds the CPU merge's temporaries to a few MiB per chunk


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Twin of ``kernels.rng.lowbias32`` on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def counter_hash(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """Twin of ``kernels.rng.counter_hash``: uint32 bits (as int64) for int64 indices."""
    lo = idx & _MASK32
    hi = (idx >> 32) & _MASK32
    key = lowbias32(torch.tensor(seed & _MASK32, dtype=torch.int64))
    return lowbias32(lo ^ lowbias32((key + hi) & _MASK32))


def round_toward_zero(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``value`` rounded toward zero to fp16/bf16 (past the largest finite: to it)."""
    if dtype == torch.bfloat16:
        # bf16 is the top half of fp32: truncating the low 16 bits is rounding toward zero.
        return (value.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    nearest = value.to(dtype)
    overshoot = nearest.float().abs() > value.abs()
    stepped = (nearest.view(torch.int16) - 1).view(dtype)  # one ulp toward zero
    return torch.where(overshoot, stepped, nearest)


def round_stochastic(value: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Twin of ``kernels.rng.round_stochastic`` (see there for the rule)."""
    t = round_toward_zero(value, dtype)
    n = (t.view(torch.int16) + 1).view(dtype)
    t32 = t.float()
    gap = (n.float() - t32).abs()
    u = (bits >> 8).float() * (1.0 / 16777216.0)
    return torch.where((value - t32).abs() > u * gap, n, t)


def merge_reference_(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    rounding: str,
    seed: int,
    compensation: torch.Tensor | None = None,
    row_offset: int = 0,
) -> None:
    """``weight += s * b a^T`` in place, in row chunks; same bits as ``rank1_merge_kernel``.

    ``rounding``: ``"nearest"``, ``"stochastic"`` (bits from ``seed`` and the global element
    index ``(row_offset + i) * K + j``) or ``"kahan"``, which reads and writes ``compensation``
    (W's shape and dtype; see ``kahan_step``).
    """
    M, K = weight.shape
    a32 = a.detach().float()
    sb = torch.tensor(scale, dtype=torch.float32, device=b.device) * b.detach().float()
    rows = max(1, _MERGE_CHUNK_ELEMENTS // max(K, 1))
    cols = torch.arange(K, device=weight.device, dtype=torch.int64)
    for r0 in range(0, M, rows):
        r1 = min(r0 + rows, M)
        w = weight[r0:r1]
        # One fp32 chunk: the product rounded, then the sum rounded (no fused multiply-add,
        # exactly as the kernels do); w + value == value + w bit for bit.
        value = torch.outer(sb[r0:r1], a32)
        if rounding == "kahan":
            w_new, c_new = kahan_step(w.float(), value, compensation[r0:r1].float(), w.dtype)
            w.copy_(w_new)
            compensation[r0:r1].copy_(c_new)
        elif weight.dtype == torch.float32:
            w.add_(value)
        elif rounding == "stochastic":
            value.add_(w)
            row_idx = torch.arange(
                row_offset + r0, row_offset + r1, device=weight.device, dtype=torch.int64
            )
            bits = counter_hash(seed, row_idx[:, None] * K + cols[None, :])
            w.copy_(round_stochastic(value, bits, weight.dtype))
            del bits
        else:
            w.copy_(value.add_(w))
        del value  # free this chunk's buffer before the next one is allocated


def kahan_step(
    w: torch.Tensor, update: torch.Tensor, c: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One compensated merge of fp32 ``w``, ``update`` and ``c``: ``(w', c')`` in ``dtype``.

    ``y = update + c``, ``w' = round(w + y)``, ``c' = round(y - (w' - w))``, each operation
    rounded to fp32 on its own (twin of the Kahan branch of ``rank1_merge_kernel``). For
    ``|y| <= |w|`` (every merge of a small update) ``w' - w`` is exact in fp32 (Sterbenz), and so
    is ``y - (w' - w)`` up to a tie case, so ``c'`` is what rounding ``w + y`` dropped, rounded once
    to ``dtype``. ``w'`` must be the rounded value widened back, not the fp32 sum ``w + y``:
    ``(w + y) - w`` would hand back ``y`` and the dropped part would be lost.
    """
    y = update + c
    w_new = (w + y).to(dtype)
    c_new = (y - (w_new.float() - w)).to(dtype)
    return w_new, c_new


def rank1_linear_forward_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    x_adapter: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x W^T + bias + s u b^T`` with ``u = x_adapter a`` (``x_adapter`` defaults to x).

    Args: ``x [N, K]``, ``weight [M, K]``, ``bias [M]``/None, ``a [K]``, ``b [M]``.
    Returns: ``y [N, M]`` in x's dtype and ``u [N]`` fp32.
    """
    xa = x if x_adapter is None else x_adapter
    u = xa.float() @ a.float()
    if x.dtype == torch.float32:
        # The rank-1 term (+ bias) is written first and the GEMM accumulates onto it (BLAS
        # beta=1): one pass over y, where linear-then-addr_ would make a bias copy and an extra
        # read-modify-write pass.
        if bias is None:
            y = torch.outer(u, b.float() * scale)
        else:
            y = torch.addr(bias.float().expand(x.shape[0], -1), u, b.float(), alpha=scale)
        return y.addmm_(x, weight.t()), u
    # Low precision: GEMM in x's dtype with fp32 accumulation, rank-1 term and bias in fp32.
    y = (x @ weight.t()).float().addr_(u, b.float(), alpha=scale)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype), u


def rank1_linear_backward_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    u: torch.Tensor,
    scale: float,
    x_adapter: torch.Tensor | None,
    need_dx: bool,
    need_dab: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``rank1_linear`` with ``W`` frozen.

    ``v = dy b``; ``dx = dy W + s v a^T`` (the rank-1 part goes to ``dx_adapter`` instead when an
    adapter input was given); ``da = s x_adapter^T v``; ``db = s dy^T u``; ``dbias = sum_n dy``.
    Returns ``(dx, da, db, dbias, dx_adapter)`` (fp32 for da/db/dbias), None where not needed.
    """
    v = dy.float() @ b.float()
    dx = dx_adapter = da = db = dbias = None
    if need_dx:
        if x_adapter is not None:
            dx = dy @ weight
            dx_adapter = torch.outer(v, a.float()).mul_(scale).to(x.dtype)
        elif dy.dtype == torch.float32:
            # As in the forward: rank-1 term first, the GEMM accumulates onto it (one pass).
            dx = torch.outer(v * scale, a.float()).addmm_(dy, weight)
        else:
            dx = (dy @ weight).float().addr_(v, a.float(), alpha=scale).to(x.dtype)
    if need_dab:
        xa = x if x_adapter is None else x_adapter
        da = (xa.float().t() @ v).mul_(scale)
        db = (dy.float().t() @ u).mul_(scale)
    if need_dbias:
        dbias = dy.float().sum(0)
    return dx, da, db, dbias, dx_adapter
