"""rank1_linear: every backend against a float64 reference, outputs and every gradient."""

import pytest
import torch
from helpers.kernel_checks import TOL, float64_reference, make_inputs, rel_err

import xgblora_fast as xf
from xgblora_fast.ops.rank1_linear import rank1_linear_fwd

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims of x, K, M): N=1, sizes that divide no block size, 3-D input, a larger square.
SHAPES = [
    ((1,), 33, 17),
    ((37,), 70, 50),
    ((3, 11), 45, 66),
    ((64,), 96, 80),
]


def run_op(x, weight, bias, a, b, scale, dy, backend):
    leaves = {"x": x, "a": a, "b": b} | ({"bias": bias} if bias is not None else {})
    # detach() keeps strided views strided (clone() would make them dense).
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items()}
    y = xf.rank1_linear(
        leaves["x"], weight, leaves.get("bias"), leaves["a"], leaves["b"], scale, backend=backend
    )
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(backend, dtype, shape, with_bias, record_error):
    lead, K, M = shape
    x, weight, bias, a, b, dy = make_inputs(lead, K, M, dtype, with_bias, seed=K * M)
    scale = 0.75
    y, grads = run_op(x, weight, bias, a, b, scale, dy, backend)
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, scale, dy)

    assert y.shape == (*lead, M) and y.dtype == dtype
    err = rel_err(y, y_ref)
    record_error("forward", backend, dtype, err)
    assert err < TOL[dtype], f"forward error {err:.2e}"
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        got = grads[name]
        assert got.shape == ref.shape
        err = rel_err(got, ref)
        record_error(f"grad_{name}", backend, dtype, err)
        assert err < TOL[dtype], f"grad of {name}: error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """x as a strided slice, W as a transposed view, strided a and b: same as contiguous."""
    g = torch.Generator().manual_seed(7)
    K, M = 40, 27
    x_big = torch.randn(2, 19, 2 * K, generator=g)
    x = x_big[..., ::2]  # last-dim stride 2
    w_t = torch.randn(K, M, generator=g) / K**0.5
    weight = w_t.t()  # [M, K] with strides (1, M)
    a = torch.randn(2 * K, generator=g)[::2]
    b = torch.randn(M, 3, generator=g)[:, 1]
    bias = torch.randn(M, 2, generator=g)[:, 0]
    dy = torch.randn(2, 19, M, generator=g)
    for t in (x, weight, a, b, bias):
        assert not t.is_contiguous()
    y, grads = run_op(x, weight, bias, a, b, 1.3, dy, backend)
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 1.3, dy)
    assert rel_err(y, y_ref) < 1e-5
    for name, ref in grads_ref.items():
        assert rel_err(grads[name], ref) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_base_with_fp32_adapters_and_bf16_adapters(backend):
    """bf16 base with fp32 adapters (peft's layout) and with bf16 adapters: grads keep dtypes."""
    for adapter_dtype in (torch.float32, torch.bfloat16):
        x, weight, bias, a, b, dy = make_inputs(
            (29,), 52, 36, torch.bfloat16, True, seed=3, adapter_dtype=adapter_dtype
        )
        y, grads = run_op(x, weight, bias, a, b, 0.5, dy, backend)
        y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.5, dy)
        assert grads["a"].dtype == adapter_dtype and grads["b"].dtype == adapter_dtype
        assert grads["x"].dtype == torch.bfloat16
        assert rel_err(y, y_ref) < 1e-2
        for name, ref in grads_ref.items():
            assert rel_err(grads[name], ref) < 1e-2, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    """x without grad: only adapter grads are produced (no dx GEMM), and they are right."""
    x, weight, _, a, b, dy = make_inputs((21,), 34, 30, torch.float32, False, seed=11)
    a_leaf = a.clone().requires_grad_()
    b_leaf = b.clone().requires_grad_()
    y = xf.rank1_linear(x, weight, None, a_leaf, b_leaf, 2.0, backend=backend)
    y.backward(dy)
    _, grads_ref = float64_reference(x, weight, None, a, b, 2.0, dy)
    assert x.grad is None
    assert rel_err(a_leaf.grad, grads_ref["a"]) < 1e-5
    assert rel_err(b_leaf.grad, grads_ref["b"]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_base_weight_gets_its_gradient(backend):
    x, weight, bias, a, b, dy = make_inputs((9,), 20, 24, torch.float32, True, seed=5)
    w_leaf = weight.clone().requires_grad_()
    y = xf.rank1_linear(x, w_leaf, bias, a, b, 1.0, backend=backend)
    y.backward(dy)
    expected = dy.double().t() @ x.double()
    assert rel_err(w_leaf.grad, expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_only_touches_the_adapter_branch(backend):
    """Train-mode dropout: y = base + s ((x*mask/(1-p)) a) b^T with the mask torch drew."""
    x, weight, bias, a, b, _ = make_inputs((17,), 30, 22, torch.float32, True, seed=13)
    p = 0.4
    torch.manual_seed(123)
    y = xf.rank1_linear(x, weight, bias, a, b, 1.5, backend=backend, dropout=p)
    torch.manual_seed(123)
    x_dropped = torch.nn.functional.dropout(x, p, training=True)
    expected = x.double() @ weight.double().t() + bias.double()
    expected += 1.5 * (x_dropped.double() @ a.double())[:, None] * b.double()
    assert rel_err(y, expected) < 1e-5
    y_eval = xf.rank1_linear(x, weight, bias, a, b, 1.5, backend=backend, dropout=p, training=False)
    y_plain = xf.rank1_linear(x, weight, bias, a, b, 1.5, backend=backend)
    assert torch.equal(y_eval, y_plain)
    assert rel_err(y, y_plain.double()) > 1e-3  # dropout really acted


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_gradients(backend):
    x, weight, _, a, b, dy = make_inputs((15,), 26, 18, torch.float32, False, seed=17)
    p = 0.3
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    torch.manual_seed(9)
    xf.rank1_linear(leaves[0], weight, None, leaves[1], leaves[2], 0.9, backend, p).backward(dy)
    ref = [t.double().requires_grad_() for t in (x, a, b)]
    torch.manual_seed(9)
    x_dropped = torch.nn.functional.dropout(ref[0], p, training=True)
    y_ref = ref[0] @ weight.double().t() + 0.9 * (x_dropped @ ref[1])[:, None] * ref[2]
    y_ref.backward(dy.double())
    for got, want in zip(leaves, ref, strict=True):
        assert rel_err(got.grad, want.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 12, requires_grad=True)
    weight, a, b = torch.randn(8, 12), torch.randn(12, requires_grad=True), torch.randn(8)
    y = xf.rank1_linear(x, weight, None, a, b, 1.0, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 12) and torch.equal(a.grad, torch.zeros(12))


def test_custom_op_registration_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    x, weight, bias, a, b, _ = make_inputs((6,), 10, 12, torch.float32, True, seed=1)
    a.requires_grad_()
    b.requires_grad_()
    results = torch.library.opcheck(rank1_linear_fwd, (x, weight, bias, a, b, 0.5, None, "torch"))
    assert results and set(results.values()) == {"SUCCESS"}, results  # opcheck also raises


class _CountingLaunches:
    """Stands in for a Triton kernel and counts its ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dy_layout", ["contiguous", "strided", "broadcast"])
def test_triton_backward_db_and_dbias_do_not_depend_on_the_dx_gemm(dtype, dy_layout, monkeypatch):
    """db and dbias come from one ``weighted_colsum_kernel`` pass over dy of their own (the dx
    GEMM's tiles feed only tl.dot, kernels/rank1_linear.py), so they are bit for bit the same
    whether dx is computed, with or without dropout, and match the float64 sums. N=50 and 70
    columns span several ragged row blocks and K chunks."""
    from xgblora_fast.kernels import rank1_reduce
    from xgblora_fast.ops.rank1_linear import _backward_triton

    x, weight, _, a, b, dy = make_inputs((50,), 45, 70, dtype, False, seed=21)
    if dy_layout == "strided":
        dy = torch.stack([dy, -dy], dim=2)[..., 0]
    elif dy_layout == "broadcast":  # what autograd hands over for y.sum(): stride 0 rows
        dy = dy[0].expand_as(dy)
    u = x.float() @ a
    counter = _CountingLaunches(rank1_reduce.weighted_colsum_kernel)
    monkeypatch.setattr(rank1_reduce, "weighted_colsum_kernel", counter)

    dx, da, db, dbias, _ = _backward_triton(dy, x, weight, a, b, u, 0.75, None, True, True, True)
    assert counter.launches == 2  # da = s x^T v, then db and dbias in one pass over dy
    assert dx is not None and da is not None
    _, _, db_no_dx, dbias_no_dx, _ = _backward_triton(
        dy, x, weight, a, b, u, 0.75, None, False, True, True
    )
    assert counter.launches == 4
    dy64 = dy.double()
    assert rel_err(db, 0.75 * dy64.t() @ u.double()) < 1e-6
    assert rel_err(dbias, dy64.sum(0)) < 1e-6
    assert torch.equal(db, db_no_dx) and torch.equal(dbias, dbias_no_dx)

    # dbias alone (frozen adapters, trainable bias): one column-sum pass (no fp32 copy of dy).
    _, da, db_none, dbias_only, _ = _backward_triton(
        dy, x, weight, a, b, u, 0.75, None, True, False, True
    )
    assert counter.launches == 5 and da is None and db_none is None
    assert rel_err(dbias_only, dy64.sum(0)) < 1e-6

    # With adapter dropout: the same two passes, the same db and dbias.
    _, _, db_drop, dbias_drop, _ = _backward_triton(
        dy, x, weight, a, b, u, 0.75, x.clone(), True, True, True
    )
    assert counter.launches == 7
    assert torch.equal(db, db_drop) and torch.equal(dbias, dbias_drop)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("magnitude", [0.0, 1e-6, 1.0, 300.0])
def test_split_vector_parts_sum_to_the_fp32_vector(dtype, magnitude):
    """The row-dot source of the sm_90 GEMM: 3 parts in the input dtype and their fp32 scales
    give back the fp32 vector (to fp32's 24 bits), fp16's range included."""
    from xgblora_fast.kernels.rank1_linear import split_vector

    v = torch.randn(1500, generator=torch.Generator().manual_seed(4)) * magnitude
    parts, unscale = split_vector(v, dtype, exact_fp32=False)
    assert parts.shape == (1500, 4) and parts.dtype == dtype and unscale.dtype == torch.float32
    assert torch.all(parts[:, 3] == 0) and unscale[3] == 0
    back = (parts.double() * unscale.double()).sum(1)
    assert (back - v.double()).abs().max() <= 2.0**-24 * v.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_fma_row_dot_of_sm80_matches_the_dot_row_dot(dtype, monkeypatch):
    """sm_80 keeps the row dot as FMAs on the A tile (gemm_kernels.rowdot_as_dot): the same
    outputs and gradients as the tl.dot row dot the interpreter runs by default."""
    from xgblora_fast.kernels import rank1_linear as gemm_kernels

    x, weight, bias, a, b, dy = make_inputs((37,), 70, 50, dtype, True, seed=9)
    y_dot, grads_dot = run_op(x, weight, bias, a, b, 0.75, dy, "triton")
    monkeypatch.setattr(gemm_kernels, "rowdot_as_dot", lambda capability: False)
    y_fma, grads_fma = run_op(x, weight, bias, a, b, 0.75, dy, "triton")
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.75, dy)
    assert rel_err(y_fma, y_ref) < TOL[dtype]
    assert rel_err(y_fma, y_dot.double()) < TOL[dtype]
    for name, ref in grads_ref.items():
        assert rel_err(grads_fma[name], ref) < TOL[dtype], name
        assert rel_err(grads_fma[name], grads_dot[name].double()) < TOL[dtype], name


def test_forced_config_launches_that_config_and_stays_accurate(monkeypatch):
    """``forced_config`` (the GPU race check's way to run every candidate): the launch takes the
    given blocks instead of the autotuner's pick, the result still matches float64, and the
    block's end restores autotuning."""
    from xgblora_fast.kernels import rank1_linear as gemm_kernels

    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(37, 70, generator=g), torch.randn(50, 70, generator=g)
    a, b = torch.randn(70, generator=g), torch.randn(50, generator=g)
    ref = x.double() @ weight.double().t() + 0.5 * torch.outer(x.double() @ a.double(), b.double())
    launched = []

    class Recording:
        """The JIT function under the autotuner, recording direct ``fn[grid](...)`` launches
        (the autotuner itself calls ``fn.run``, passed through)."""

        def __init__(self, fn):
            self.fn = fn

        def __getattr__(self, name):
            return getattr(self.fn, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs)
                return self.fn[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(
        gemm_kernels.rank1_gemm_kernel, "fn", Recording(gemm_kernels.rank1_gemm_kernel.fn)
    )
    forced = gemm_kernels._cfg(16, 16, 16, 4, 1, group=1)
    with gemm_kernels.forced_config(forced):
        y, _ = gemm_kernels.rank1_gemm_triton(x, weight, None, 0.5, vin=a, vout=b)
    assert len(launched) == 1
    assert {k: launched[0][k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_N")} == {
        "BLOCK_N": 16,
        "BLOCK_M": 16,
        "BLOCK_K": 16,
        "GROUP_N": 1,
    }
    assert rel_err(y, ref) < TOL[torch.float32]
    y_tuned, _ = gemm_kernels.rank1_gemm_triton(x, weight, None, 0.5, vin=a, vout=b)
    assert len(launched) == 1  # autotuned again: the forced path was not taken
    assert rel_err(y_tuned, ref) < TOL[torch.float32]
