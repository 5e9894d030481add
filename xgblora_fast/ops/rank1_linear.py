"""``y = x W^T + bias + s (x.a) b^T`` as a ``torch.library`` custom op with autograd.

Two custom ops (forward, backward) with fake implementations, so ``torch.compile(fullgraph=True)``
traces through them without graph breaks; ``register_autograd`` ties them together. Each op
dispatches at run time to the Triton kernels (``kernels/rank1_linear.py``,
``kernels/rank1_reduce.py``), the CUDA C++ extension, or the PyTorch reference.

Saved for backward: ``x``, ``u = x.a`` (N floats), ``a``, ``b`` and ``W`` (a reference, not a
copy). Nothing N x M. With adapter dropout, the dropped input ``x_d`` is saved as well (as peft
does) and the rank-1 part of ``dx`` flows back through ``F.dropout``.

Under ``torch.autocast`` the op does what autocast does to ``nn.Linear``: ``x``, ``W`` and ``bias``
are cast to the autocast dtype (differentiably, so an fp32 master ``W`` stays fp32 and any
gradient it gets is fp32), the GEMM runs in that dtype and ``y`` comes out in it. fp32 boosters
stay fp32 (the rank-1 terms are fp32 in every backend) and get fp32 gradients. The cast happens in
``rank1_linear`` for the eager path and in an autocast kernel of the custom op for direct calls
and ``torch.compile``; the implementations themselves run with autocast off.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from xgblora_fast.ops import reference
from xgblora_fast.ops._native import native_module
from xgblora_fast.ops.autocast import AUTOCAST_DEVICES, autocast_dtype, autocast_off
from xgblora_fast.ops.backend import resolve_backend
from xgblora_fast.ops.checks import check_backend, check_rank1_linear_args

_EMPTY = (0,)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(_EMPTY)


def _forward_triton(x, weight, bias, a, b, scale, x_adapter):
    from xgblora_fast.kernels.rank1_linear import rank1_gemm_triton
    from xgblora_fast.kernels.rank1_linear_parts import rowdot_triton

    if x_adapter is None:
        return rank1_gemm_triton(x, weight, bias, scale, vin=a, vout=b)
    u = rowdot_triton(x_adapter, a)  # fp32 accumulation, no fp32 copy of the dropped input
    y, _ = rank1_gemm_triton(x, weight, bias, scale, vout=b, rowdot=u)
    return y, u


def _backward_triton(dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias):
    from xgblora_fast.kernels.rank1_linear import rank1_gemm_triton
    from xgblora_fast.kernels.rank1_linear_parts import rank1_outer, rowdot_triton

    dx = dx_adapter = None
    v = None
    if need_dx:
        # dx = dy @ W (+ s v a^T): the forward kernel over dy with W's strides swapped, v = dy.b
        # its row dot; without dropout the rank-1 term goes into its epilogue.
        dx, v = rank1_gemm_triton(
            dy, weight.t(), None, scale, vin=b, vout=a if x_adapter is None else None
        )
        if x_adapter is not None:
            dx_adapter = rank1_outer(v, a, scale, x.dtype)
    if need_dab and v is None:
        v = rowdot_triton(dy, b)
    da, db, dbias = _adapter_gradients(dy, x, u, v, scale, x_adapter, need_dab, need_dbias)
    return dx, da, db, dbias, dx_adapter


def _adapter_gradients(dy, x, u, v, scale, x_adapter, need_dab, need_dbias):
    """``(da, db, dbias)`` by Triton column reductions (None where not needed), both paths.

    ``da = s x^T v`` is one pass over x; ``db = s dy^T u`` and ``dbias = dy^T 1`` one pass over
    dy of their own, not folded into the dx GEMM (whose tiles feed only ``tl.dot``,
    ``kernels/rank1_linear.py``): the summation order is the reduction's, whatever config the
    GEMM's autotuner picked.
    """
    from xgblora_fast.kernels.rank1_linear_parts import colsum_triton
    from xgblora_fast.kernels.rank1_reduce import weighted_colsum_triton

    if not need_dab:
        return None, None, colsum_triton(dy) if need_dbias else None
    da, _ = weighted_colsum_triton(x if x_adapter is None else x_adapter, v, with_colsum=False)
    db, dbias = weighted_colsum_triton(dy, u, with_colsum=need_dbias)
    return da.mul_(scale), db.mul_(scale), dbias


def _forward_cuda(x, weight, bias, a, b, scale, x_adapter):
    # native_module() loads the extension (registering its ops) on first use.
    native_module()
    y, u = torch.ops.xgblora_fast.cuda_rank1_linear_fwd(x, weight, bias, a, b, scale, x_adapter)
    return y, u


def _backward_cuda(dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias):
    native_module()
    # Outputs that were not needed come back as None (undefined tensors in C++).
    return tuple(
        torch.ops.xgblora_fast.cuda_rank1_linear_bwd(
            dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias
        )
    )


def _forward_cublas(x, weight, bias, a, b, scale, x_adapter):
    """The "cublas" path: ``F.linear`` (cuBLAS, as ``nn.Linear``), then ``y += s u b^T`` in place.

    ``u = x_adapter a`` by a Triton row dot (fp32 accumulation, no fp32 copy of x); the rank-1
    epilogue reads and writes y once.
    """
    from xgblora_fast.kernels.rank1_linear_parts import rank1_epilogue_, rowdot_triton

    u = rowdot_triton(x if x_adapter is None else x_adapter, a)
    y = F.linear(x, weight, bias)
    return rank1_epilogue_(y, u, b, scale), u


def _backward_cublas(dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias):
    """The "cublas" path's backward: ``dx = dy W`` by cuBLAS (+ ``s v a^T`` in place), the
    row dot ``v = dy b`` and the column reductions ``da``, ``db``, ``dbias`` by Triton."""
    from xgblora_fast.kernels.rank1_linear_parts import (
        rank1_epilogue_,
        rank1_outer,
        rowdot_triton,
    )

    dx = dx_adapter = None
    v = rowdot_triton(dy, b) if need_dx or need_dab else None
    if need_dx:
        dx = torch.mm(dy, weight)
        if x_adapter is None:
            rank1_epilogue_(dx, v, a, scale)
        else:
            dx_adapter = rank1_outer(v, a, scale, x.dtype)
    da, db, dbias = _adapter_gradients(dy, x, u, v, scale, x_adapter, need_dab, need_dbias)
    return dx, da, db, dbias, dx_adapter


def _forward_triton_path(backend, x, weight, bias, a, b, scale, x_adapter):
    """The Triton backend's forward for this call: fused kernel or cuBLAS + rank-1 kernels
    (``ops/dispatch.py`` decides, at run time, outside any traced code)."""
    from xgblora_fast.ops.dispatch import SELECTOR, bucket_key

    impls = {"fused": _forward_triton, "cublas": _forward_cublas}
    args = (x, weight, bias, a, b, scale, x_adapter)
    n, k = x.shape
    m = weight.shape[0]
    variant = f"bias{int(bias is not None)}drop{int(x_adapter is not None)}"
    key = bucket_key("forward", x.dtype, n, k, m, variant)
    runners = {name: functools.partial(impl, *args) for name, impl in impls.items()}
    return impls[SELECTOR.choose(backend, x.device, key, n, x.dtype, runners)]


def _backward_triton_path(backend, dy, x, weight, a, b, u, scale, x_adapter, *needs):
    """The Triton backend's backward for this call (see ``_forward_triton_path``)."""
    from xgblora_fast.ops.dispatch import SELECTOR, bucket_key

    impls = {"fused": _backward_triton, "cublas": _backward_cublas}
    args = (dy, x, weight, a, b, u, scale, x_adapter, *needs)
    n, m = dy.shape
    k = x.shape[1]
    variant = "need" + "".join(str(int(f)) for f in needs) + f"drop{int(x_adapter is not None)}"
    key = bucket_key("backward", dy.dtype, n, k, m, variant)
    runners = {name: functools.partial(impl, *args) for name, impl in impls.items()}
    return impls[SELECTOR.choose(backend, dy.device, key, n, dy.dtype, runners)]


_FORWARD = {
    "torch": reference.rank1_linear_forward_reference,
    "triton": _forward_triton,
    "cuda": _forward_cuda,
}
_BACKWARD = {
    "torch": reference.rank1_linear_backward_reference,
    "triton": _backward_triton,
    "cuda": _backward_cuda,
}


def autocast_inputs(x, weight, bias, a, b, x_adapter):
    """``(x, weight, bias, a, b, x_adapter)`` as autocast hands them to the GEMM.

    Autocast casts ``F.linear``'s floating-point inputs to its dtype; the same here for ``x``,
    ``weight``, ``bias`` and ``x_adapter``. Boosters in fp32 are left as they are (the kernels
    compute the rank-1 terms in fp32); low-precision boosters follow the GEMM's dtype, so
    bf16 boosters work under fp16 autocast too. Non-tensors pass through for the checks to name.
    """
    if not isinstance(x, torch.Tensor):
        return x, weight, bias, a, b, x_adapter
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return x, weight, bias, a, b, x_adapter

    def cast(t, keep_fp32=False):
        floating = isinstance(t, torch.Tensor) and t.is_floating_point()
        if not floating or t.dtype == dtype or (keep_fp32 and t.dtype == torch.float32):
            return t
        return t.to(dtype)

    return (
        cast(x),
        cast(weight),
        cast(bias),
        cast(a, keep_fp32=True),
        cast(b, keep_fp32=True),
        cast(x_adapter),
    )


def _run_forward(x, weight, bias, a, b, scale, x_adapter, backend):
    """Forward on 2-D ``x [N, K]``: ``(y [N, M] in x.dtype, u [N] fp32)`` on the chosen backend."""
    name = resolve_backend(backend, x.device)
    impl = _FORWARD[name]
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[0])), x.new_empty((0,), dtype=torch.float32)
    with autocast_off(x.device):
        if name == "triton":
            impl = _forward_triton_path(backend, x, weight, bias, a, b, scale, x_adapter)
        return impl(x, weight, bias, a, b, scale, x_adapter)


def _run_backward(dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias, backend):
    """``(dx, da, db, dbias, dx_adapter)``, None where not needed; da/db in the adapters' dtype."""
    name = resolve_backend(backend, dy.device)
    impl = _BACKWARD[name]
    if dy.shape[0] == 0:
        impl = reference.rank1_linear_backward_reference
    elif name == "triton":
        needs = (need_dx, need_dab, need_dbias)
        with autocast_off(dy.device):
            impl = _backward_triton_path(backend, dy, x, weight, a, b, u, scale, x_adapter, *needs)
    with autocast_off(dy.device):
        dx, da, db, dbias, dx_adapter = impl(
            dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias
        )
    if da is not None:
        da, db = da.to(a.dtype), db.to(b.dtype)
    return dx, da, db, dbias, dx_adapter


@torch.library.custom_op("xgblora_fast::rank1_linear_fwd", mutates_args=())
def rank1_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    x_adapter: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D ``x [N, K]``: returns ``(y [N, M] in x.dtype, u [N] fp32)``."""
    return _run_forward(x, weight, bias, a, b, scale, x_adapter, backend)


@rank1_linear_fwd.register_fake
def _(x, weight, bias, a, b, scale, x_adapter, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty(
        (x.shape[0],), dtype=torch.float32
    )


@torch.library.custom_op("xgblora_fast::rank1_linear_bwd", mutates_args=())
def rank1_linear_bwd(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, da, db, dbias, dx_adapter)``; empty tensors stand for "not needed"."""
    dx, da, db, dbias, dx_adapter = _run_backward(
        dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias, backend
    )
    return (
        dx if dx is not None else _empty(x),
        da if da is not None else _empty(a),
        db if db is not None else _empty(b),
        dbias if dbias is not None else _empty(dy).float(),
        dx_adapter if dx_adapter is not None else _empty(x),
    )


@rank1_linear_bwd.register_fake
def _(dy, x, weight, a, b, u, scale, x_adapter, need_dx, need_dab, need_dbias, backend):
    with_adapter = need_dx and x_adapter is not None
    return (
        x.new_empty(x.shape) if need_dx else _empty(x),  # the kernels return contiguous dx
        torch.empty_like(a) if need_dab else _empty(a),
        torch.empty_like(b) if need_dab else _empty(b),
        dy.new_empty((dy.shape[1],), dtype=torch.float32) if need_dbias else _empty(dy).float(),
        x.new_empty(x.shape) if with_adapter else _empty(x),
    )


def _rank1_linear_fwd_autocast(x, weight, bias, a, b, scale, x_adapter, backend):
    """The forward op's autocast kernel: cast as ``autocast_inputs`` does, then run it with
    autocast off (autograd records the casts, so gradients reach fp32 masters in fp32)."""
    cast = autocast_inputs(x, weight, bias, a, b, x_adapter)
    with torch.autocast(x.device.type, enabled=False):
        return rank1_linear_fwd(*cast[:5], scale, cast[5], backend)


# Lives as long as the module: the autocast rules of the forward op, one per device type.
_AUTOCAST_LIB = torch.library.Library("xgblora_fast", "IMPL")
for _device in AUTOCAST_DEVICES:
    _AUTOCAST_LIB.impl("rank1_linear_fwd", _rank1_linear_fwd_autocast, "Autocast" + _device.upper())


def _save_for_backward(ctx, x, weight, bias, a, b, u, scale, x_adapter, backend) -> None:
    ctx.save_for_backward(x, weight, a, b, u, x_adapter)
    ctx.scale = scale
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _input_gradients(ctx, dy, run_backward) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the 8 forward inputs; ``run_backward`` is the custom op or ``_run_backward``."""
    x, weight, a, b, u, x_adapter = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx = need[0] or (x_adapter is not None and need[6])
    need_dab = need[3] or need[4]
    need_dbias = ctx.bias_dtype is not None and need[2]
    dx, da, db, dbias, dx_adapter = run_backward(
        dy, x, weight, a, b, u, ctx.scale, x_adapter, need_dx, need_dab, need_dbias, ctx.backend
    )
    # A trainable base weight is unusual for XGBLoRA but supported: dW = dy^T x (plain GEMM).
    dweight = dy.t() @ x if need[1] else None
    return (
        dx if need[0] else None,
        dweight,
        dbias.to(ctx.bias_dtype) if need_dbias else None,
        da if need[3] else None,
        db if need[4] else None,
        None,
        dx_adapter if x_adapter is not None and need[6] else None,
        None,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, b, scale, x_adapter, backend = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    _save_for_backward(ctx, x, weight, bias, a, b, u, scale, x_adapter, backend)


def _backward(ctx, dy, _du):
    return _input_gradients(ctx, dy, rank1_linear_bwd)


torch.library.register_autograd(
    "xgblora_fast::rank1_linear_fwd", _backward, setup_context=_setup_context
)


class _Rank1LinearEager(torch.autograd.Function):
    """The same implementations as the custom ops, without their dispatch.

    A custom op costs ~0.1 ms of Python dispatch per call in eager mode (measured on CPU: 0.22
    ms per forward+backward, 1.7x a 768x768 layer at N=1), so eager calls go through this plain
    ``autograd.Function``; under ``torch.compile`` the custom ops are what gets traced.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, x_adapter, backend):
        y, u = _run_forward(x, weight, bias, a, b, scale, x_adapter, backend)
        _save_for_backward(ctx, x, weight, bias, a, b, u, scale, x_adapter, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _input_gradients(ctx, dy, _run_backward)


def rank1_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    backend: str = "auto",
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Fused ``y = x W^T + bias + s ((dropout(x)) . a) b^T``, differentiable in x, a, b, bias.

    Args:
        x: ``[..., K]`` fp32/fp16/bf16 (any leading dimensions, any strides).
        weight: ``[M, K]``, x's dtype; usually frozen (its gradient is computed if required).
        bias: ``[M]`` or None.
        a: ``[K]``, b: ``[M]``: the rank-1 adapter, fp32 or weight's dtype.
        scale: the float ``s``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``.
        dropout: probability of dropping an element of the adapter's input (not the base's).
        training: apply dropout only when True (like ``F.dropout``).
    Returns:
        ``[..., M]`` in x's dtype; under ``torch.autocast``, in the autocast dtype (x, weight and
        bias are cast as for ``nn.Linear``; fp32 a/b stay fp32).
    """
    x, weight, bias, a, b, _ = autocast_inputs(x, weight, bias, a, b, None)
    scale = check_rank1_linear_args(x, weight, bias, a, b, scale)
    check_backend(backend)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    x_adapter = F.dropout(x2d, dropout, training) if dropout > 0 and training else None
    if torch.compiler.is_compiling():
        y, _ = rank1_linear_fwd(x2d, weight, bias, a, b, scale, x_adapter, backend)
    else:
        y = _Rank1LinearEager.apply(x2d, weight, bias, a, b, scale, x_adapter, backend)
    return y.reshape(*lead, weight.shape[0])
