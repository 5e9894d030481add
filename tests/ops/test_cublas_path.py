"""The Triton backend's "cublas" path (GEMMs by torch, rank-1 parts by
``kernels/rank1_linear_parts.py``) against float64, through the Triton interpreter: outputs,
every gradient, and its kernels."""

import pytest
import torch
import triton
import triton.language as tl
from helpers.kernel_checks import TOL, float64_reference, make_inputs, rel_err

import xgblora_fast as xf
from xgblora_fast.kernels import rank1_linear_parts as parts_kernels
from xgblora_fast.kernels.rank1_linear_parts import (
    colsum_triton,
    rank1_epilogue_,
    rank1_outer,
    rowdot_triton,
    tile_offsets,
)
from xgblora_fast.kernels.rank1_reduce import weighted_colsum_triton
from xgblora_fast.ops.dispatch import PATH_ENV, agreement
from xgblora_fast.ops.rank1_linear import (
    _backward_cublas,
    _backward_triton,
    _forward_cublas,
    _forward_triton,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [((1,), 33, 17), ((37,), 70, 50), ((3, 11), 45, 66), ((64,), 96, 80)]


@pytest.fixture(autouse=True)
def cublas_path(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "cublas")


def run_op(x, weight, bias, a, b, scale, dy, dropout=0.0):
    leaves = {"x": x, "a": a, "b": b} | ({"bias": bias} if bias is not None else {})
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items()}
    y = xf.rank1_linear(
        leaves["x"], weight, leaves.get("bias"), leaves["a"], leaves["b"], scale, "triton", dropout
    )
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def test_the_cublas_path_is_what_runs(monkeypatch):
    calls = []
    real = parts_kernels.rank1_epilogue_
    monkeypatch.setattr(parts_kernels, "rank1_epilogue_", lambda *a: calls.append(1) or real(*a))
    x, weight, bias, a, b, dy = make_inputs((5,), 12, 9, torch.float32, True, seed=0)
    run_op(x, weight, bias, a, b, 1.0, dy)
    assert len(calls) == 2  # forward y += s u b^T, backward dx += s v a^T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(dtype, shape, with_bias, record_error):
    lead, K, M = shape
    x, weight, bias, a, b, dy = make_inputs(lead, K, M, dtype, with_bias, seed=K * M + 1)
    y, grads = run_op(x, weight, bias, a, b, 0.75, dy)
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.75, dy)
    assert y.shape == (*lead, M) and y.dtype == dtype
    err = rel_err(y, y_ref)
    record_error("forward", "cublas", dtype, err)
    assert err < TOL[dtype], f"forward error {err:.2e}"
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        err = rel_err(grads[name], ref)
        record_error(f"grad_{name}", "cublas", dtype, err)
        assert grads[name].shape == ref.shape
        assert err < TOL[dtype], f"grad of {name}: error {err:.2e}"


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(7)
    K, M = 40, 27
    x = torch.randn(2, 19, 2 * K, generator=g)[..., ::2]
    weight = (torch.randn(K, M, generator=g) / K**0.5).t()
    a = torch.randn(2 * K, generator=g)[::2]
    b = torch.randn(M, 3, generator=g)[:, 1]
    bias = torch.randn(M, 2, generator=g)[:, 0]
    dy = torch.randn(2, 19, M, 2, generator=g)[..., 0]
    for t in (x, weight, a, b, bias, dy):
        assert not t.is_contiguous()
    y, grads = run_op(x, weight, bias, a, b, 1.3, dy)
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 1.3, dy)
    assert rel_err(y, y_ref) < 1e-5
    for name, ref in grads_ref.items():
        assert rel_err(grads[name], ref) < 1e-5, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_path(dtype):
    """Adapter dropout: u from the dropped input, dx's rank-1 part through F.dropout."""
    x, weight, bias, a, b, dy = make_inputs((23,), 30, 22, dtype, True, seed=13)
    p = 0.4
    torch.manual_seed(123)
    y, grads = run_op(x, weight, bias, a, b, 1.5, dy, dropout=p)
    ref = {k: t.double().requires_grad_() for k, t in {"x": x, "a": a, "b": b}.items()}
    bias64 = bias.double().requires_grad_()
    torch.manual_seed(123)
    x_dropped = torch.nn.functional.dropout(ref["x"].to(dtype), p, training=True).double()
    mask = x_dropped != 0
    x_d = ref["x"] * mask / (1 - p)
    y_ref = ref["x"] @ weight.double().t() + bias64 + 1.5 * (x_d @ ref["a"])[:, None] * ref["b"]
    y_ref.backward(dy.double())
    assert rel_err(y, y_ref.detach()) < TOL[dtype]
    for name, t in ref.items():
        assert rel_err(grads[name], t.grad) < TOL[dtype], name
    assert rel_err(grads["bias"], bias64.grad) < TOL[dtype]


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize(
    "needs",
    [
        (True, True, True),
        (False, True, True),
        (True, False, True),
        (False, False, True),
        (True, True, False),
    ],
    ids=str,
)
def test_backward_matches_the_fused_path(needs, dropout):
    """Every combination of needed gradients: same outputs (None where not needed) as fused."""
    x, weight, _, a, b, dy = make_inputs((29,), 37, 41, torch.float32, False, seed=3)
    u = x @ a
    x_adapter = x * 0.5 if dropout else None
    got = _backward_cublas(dy, x, weight, a, b, u, 0.6, x_adapter, *needs)
    want = _backward_triton(dy, x, weight, a, b, u, 0.6, x_adapter, *needs)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == w.shape and g.dtype == w.dtype
            assert rel_err(g, w.double()) < 1e-5
    assert agreement(got, want, torch.float32)[0]
    if needs[0]:
        assert got[0].is_contiguous()


def test_forward_matches_the_fused_path_and_agreement_catches_a_difference():
    x, weight, bias, a, b, _ = make_inputs((33,), 40, 24, torch.bfloat16, True, seed=4)
    got = _forward_cublas(x, weight, bias, a, b, 0.5, None)
    want = _forward_triton(x, weight, bias, a, b, 0.5, None)
    ok, err, tol = agreement(got, want, torch.bfloat16)
    assert ok and err < tol
    bad = (got[0] * 1.1, got[1])
    ok, err, _ = agreement(bad, want, torch.bfloat16)
    assert not ok and err > 0.05


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rowdot_strided_and_broadcast_rows(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(70, 2 * 53, generator=g).to(dtype)
    a = torch.randn(53 * 3, generator=g)[::3]
    for x in (base[:, ::2], base[:, ::2].t().contiguous().t(), base[0, ::2].expand(70, 53)):
        got = rowdot_triton(x, a)
        assert got.dtype == torch.float32 and got.shape == (70,)
        assert rel_err(got, x.double() @ a.double()) < 1e-6
    assert rowdot_triton(base[:0, :53], a).shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogue_in_place_and_outer(dtype):
    g = torch.Generator().manual_seed(2)
    y = torch.randn(37, 66, generator=g).to(dtype)
    u = torch.randn(37, generator=g)
    b = torch.randn(66 * 2, generator=g)[::2]
    expected = y.double() + 0.3 * u.double()[:, None] * b.double()
    ptr = y.data_ptr()
    out = rank1_epilogue_(y, u, b, 0.3)
    assert out is y and y.data_ptr() == ptr
    # One rounding to dtype: half an ulp on a GPU, up to one in the interpreter (which truncates
    # fp32 to bf16).
    assert rel_err(y, expected) < TOL[dtype]
    outer = rank1_outer(u, b, 0.3, dtype)
    assert outer.dtype == dtype and outer.is_contiguous()
    assert rel_err(outer, 0.3 * u.double()[:, None] * b.double()) < TOL[dtype]
    # A strided (column-major) output is updated in place as well.
    yt = torch.randn(66, 37, generator=g).to(dtype).t()
    expected = yt.double() + 0.3 * u.double()[:, None] * b.double()
    rank1_epilogue_(yt, u, b, 0.3)
    assert rel_err(yt, expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_colsum(dtype):
    x = torch.randn(90, 45, generator=torch.Generator().manual_seed(5)).to(dtype)
    for view in (x, x.t().contiguous().t(), x[::2]):
        assert rel_err(colsum_triton(view), view.double().sum(0)) < 1e-6
    assert torch.equal(colsum_triton(x[:0]), torch.zeros(45))


@triton.jit
def _offsets_kernel(out_ptr, stride_row, stride_col, R: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, R)
    cols = tl.arange(0, C)
    offs = tile_offsets(rows, cols, stride_row, stride_col)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], offs)


def test_tile_offsets_are_int64_past_2_31():
    """A column-major [N, C] view with N * C >= 2^31: column offsets ``c * N`` pass 2^31 while
    the stride itself fits int32 (so Triton passes it as i32); int32 products would wrap."""
    stride_col = 2**30 + 3  # N rows of a column-major x
    out = torch.empty((4, 8), dtype=torch.int64)
    _offsets_kernel[(1,)](out, 1, stride_col, R=4, C=8)
    rows = torch.arange(4)[:, None]
    cols = torch.arange(8)[None, :]
    expected = rows + cols * stride_col
    assert expected.max() > 2**32
    assert torch.equal(out, expected)
    out = torch.empty((4, 8), dtype=torch.int64)
    _offsets_kernel[(1,)](out, stride_col, 1, R=4, C=8)
    assert torch.equal(out, rows * stride_col + cols)


def test_weighted_colsum_column_major_and_strided():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(77, 50, generator=g).t().contiguous().t()  # column-major
    w = torch.randn(77, generator=g)
    wsum, csum = weighted_colsum_triton(x, w, with_colsum=True)
    assert rel_err(wsum, x.double().t() @ w.double()) < 1e-6
    assert rel_err(csum, x.double().sum(0)) < 1e-6
