"""The kernels on a CUDA device, compiled (not interpreted), against float64 references.

- ``rank1_linear`` on every backend (``triton``: ``rank1_gemm_kernel`` for the forward and
  ``dx`` (with ``db``/``dbias`` folded in when there is no dropout), ``weighted_colsum_kernel``
  for ``da``, and for ``db``/``dbias`` otherwise; ``cuda``: the C++ extension,
  built on the spot when missing; ``torch``: the reference path on cuBLAS): outputs and the
  gradients of x, a, b, bias against float64 on the CPU; fp32/fp16/bf16; N = 1, sizes divisible
  by no block, 3-D and strided inputs, bf16 adapters, dropout, an empty batch; and under CUDA
  autocast (fp16, bf16) against ``nn.Linear`` + peft LoRA r=1 under the same autocast.
- ``merge_``: the weights written on the GPU by every backend are bit-identical to the CPU
  reference's for the same seed (nearest and stochastic, also through a transposed view).
- the counter hash and the rounding functions, compiled, against their torch twins.

Run by ``bench/gpu_check.py``; skipped without a CUDA device or with interpreted kernels.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import triton.language as tl
from helpers.kernel_checks import (
    GPU_MARKS,
    TOL,
    autocast_parity,
    bits_of,
    compensation_like,
    float64_reference,
    hash_and_round_kernel,
    make_inputs,
    rel_err,
)

import xgblora_fast as xf
from xgblora_fast.ops import reference

pytestmark = GPU_MARKS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW = [torch.float16, torch.bfloat16]
# (leading dims of x, K, M): N=1, sizes that divide no block size, 3-D input, a square, sizes
# past the largest tiles, a long K loop.
SHAPES = [
    ((1,), 33, 17),
    ((37,), 70, 50),
    ((3, 11), 45, 66),
    ((64,), 96, 80),
    ((300,), 1031, 517),
    ((2, 129), 4099, 257),
]
CUDA = torch.device("cuda")


def run_on_gpu(x, weight, bias, a, b, scale, dy, backend, dropout=0.0):
    """``rank1_linear`` forward and backward on CUDA copies: ``(y, {leaf: grad})``."""
    leaves = {"x": x, "a": a, "b": b} | ({"bias": bias} if bias is not None else {})
    leaves = {k: v.detach().to(CUDA).requires_grad_() for k, v in leaves.items()}
    y = xf.rank1_linear(
        leaves["x"],
        weight.to(CUDA),
        leaves.get("bias"),
        leaves["a"],
        leaves["b"],
        scale,
        backend=backend,
        dropout=dropout,
    )
    y.backward(dy.to(CUDA))
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def check_against_reference(y, grads, y_ref, grads_ref, tol, record, backend, dtype) -> None:
    err = rel_err(y, y_ref)
    record("forward", backend, dtype, err)
    assert err < tol, f"forward error {err:.2e}"
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        assert grads[name].shape == ref.shape, name
        err = rel_err(grads[name], ref)
        record(f"grad_{name}", backend, dtype, err)
        assert err < tol, f"grad of {name}: error {err:.2e}"


# ---- rank1_linear -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(gpu_backend, dtype, shape, with_bias, record_error):
    lead, K, M = shape
    x, weight, bias, a, b, dy = make_inputs(lead, K, M, dtype, with_bias, seed=K * M)
    y, grads = run_on_gpu(x, weight, bias, a, b, 0.75, dy, gpu_backend)
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.75, dy)
    assert y.shape == (*lead, M) and y.dtype == dtype and y.is_cuda
    check_against_reference(
        y, grads, y_ref, grads_ref, TOL[dtype], record_error, gpu_backend, dtype
    )


@pytest.mark.parametrize(
    ("autocast_dtype", "weight_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float16, torch.float16),
    ],
    ids=str,
)
def test_autocast_matches_linear_plus_peft_lora(
    gpu_backend, autocast_dtype, weight_dtype, record_error
):
    """Under CUDA autocast (fp16, bf16): output and gradients of x, a, b close to nn.Linear +
    peft LoRA r=1 under the same autocast (each side within the dtype's tolerance of float64)."""
    errors = autocast_parity("cuda", autocast_dtype, weight_dtype, gpu_backend, seed=3)
    for name, err in errors.items():
        record_error(f"autocast_vs_peft_{name}", gpu_backend, autocast_dtype, err)
        assert err < 2 * TOL[autocast_dtype], f"{name}: {err:.2e} against nn.Linear + peft"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(gpu_backend, dtype, record_error):
    """x a strided 3-D slice, W a transposed view, strided a and b: same as the reference."""
    g = torch.Generator().manual_seed(7)
    K, M = 40, 27
    x = torch.randn(2, 19, 2 * K, generator=g).to(dtype).to(CUDA)[..., ::2]
    weight = (torch.randn(K, M, generator=g) / K**0.5).to(dtype).to(CUDA).t()
    a = torch.randn(2 * K, generator=g).to(CUDA)[::2]
    b = torch.randn(M, 3, generator=g).to(CUDA)[:, 1]
    bias = torch.randn(M, generator=g).to(dtype).to(CUDA)
    dy = torch.randn(2, 19, M, generator=g).to(dtype).to(CUDA)
    assert not (x.is_contiguous() or weight.is_contiguous() or a.is_contiguous())
    leaves = {"x": x, "a": a, "b": b, "bias": bias}
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items()}  # strides kept
    y = xf.rank1_linear(
        leaves["x"], weight, leaves["bias"], leaves["a"], leaves["b"], 1.3, backend=gpu_backend
    )
    y.backward(dy)
    grads = {k: v.grad for k, v in leaves.items()}
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 1.3, dy)
    check_against_reference(
        y, grads, y_ref, grads_ref, TOL[dtype], record_error, gpu_backend, dtype
    )


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_adapters(gpu_backend, dtype):
    """Adapters in the weight's dtype: gradients keep the dtypes and match the reference."""
    x, weight, bias, a, b, dy = make_inputs((29,), 52, 36, dtype, True, seed=3, adapter_dtype=dtype)
    y, grads = run_on_gpu(x, weight, bias, a, b, 0.5, dy, gpu_backend)
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.5, dy)
    assert grads["a"].dtype == dtype and grads["b"].dtype == dtype and grads["x"].dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, ref in grads_ref.items():
        assert rel_err(grads[name], ref) < TOL[dtype], name


def test_only_requested_gradients(gpu_backend):
    """x without grad: only the adapter's gradients (no dx GEMM), and they are right."""
    x, weight, _, a, b, dy = make_inputs((21,), 34, 30, torch.float32, False, seed=11)
    a_leaf, b_leaf = a.to(CUDA).requires_grad_(), b.to(CUDA).requires_grad_()
    x_gpu = x.to(CUDA)
    y = xf.rank1_linear(x_gpu, weight.to(CUDA), None, a_leaf, b_leaf, 2.0, backend=gpu_backend)
    y.backward(dy.to(CUDA))
    _, grads_ref = float64_reference(x, weight, None, a, b, 2.0, dy)
    assert x_gpu.grad is None
    assert rel_err(a_leaf.grad, grads_ref["a"]) < 1e-5
    assert rel_err(b_leaf.grad, grads_ref["b"]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_forward_and_gradients(gpu_backend, dtype):
    """Train-mode dropout on the adapter's input, with the mask torch draws on the GPU."""
    x, weight, bias, a, b, dy = make_inputs((45,), 62, 38, dtype, True, seed=13)
    p = 0.3
    torch.manual_seed(123)
    y, grads = run_on_gpu(x, weight, bias, a, b, 1.5, dy, gpu_backend, dropout=p)
    torch.manual_seed(123)  # the same draw: F.dropout on a tensor of x's shape and dtype
    x_dropped = torch.nn.functional.dropout(x.to(CUDA), p, training=True).cpu()
    keep = (x_dropped != 0).double() / (1 - p)  # x holds no exact zeros
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, a, b))
    y_ref = x64 @ weight.double().t() + bias.double() + 1.5 * ((x64 * keep) @ a64)[:, None] * b64
    y_ref.backward(dy.double())
    assert 0 < (x_dropped == 0).sum() < x.numel()
    assert rel_err(y, y_ref.detach()) < TOL[dtype]
    for name, ref in (("x", x64.grad), ("a", a64.grad), ("b", b64.grad)):
        assert rel_err(grads[name], ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_db_dbias_folded_into_dx_match_the_unfused_pass(dtype):
    """Compiled and autotuned on this call (a shape no other test uses): candidates with other
    BLOCK_N write other numbers of partial rows, and only the chosen config's are summed. db and
    dbias from the dx GEMM match weighted_colsum's pass over dy (dx not needed) and float64."""
    from xgblora_fast.ops.rank1_linear import _backward_triton

    x, weight, _, a, b, dy = make_inputs((333,), 777, 555, dtype, False, seed=5)
    x, weight, a, b, dy = (t.to(CUDA) for t in (x, weight, a, b, dy))
    u = x.float() @ a
    _, _, db, dbias, _ = _backward_triton(dy, x, weight, a, b, u, 0.75, None, True, True, True)
    _, _, db_unfused, dbias_unfused, _ = _backward_triton(
        dy, x, weight, a, b, u, 0.75, None, False, True, True
    )
    dy64 = dy.cpu().double()
    assert rel_err(db, 0.75 * dy64.t() @ u.cpu().double()) < 1e-5
    assert rel_err(dbias, dy64.sum(0)) < 1e-5
    assert rel_err(db, db_unfused.cpu().double()) < 1e-5
    assert rel_err(dbias, dbias_unfused.cpu().double()) < 1e-5


def test_empty_batch(gpu_backend):
    x = torch.randn(0, 12, device=CUDA, requires_grad=True)
    a = torch.randn(12, device=CUDA, requires_grad=True)
    weight, b = torch.randn(8, 12, device=CUDA), torch.randn(8, device=CUDA)
    y = xf.rank1_linear(x, weight, None, a, b, 1.0, backend=gpu_backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 12) and torch.equal(a.grad, torch.zeros_like(a))


# ---- merge_ ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["row-major", "transposed", "strided-adapters"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(70, 33), (257, 1031), (1024, 4096)], ids=str)
def test_merge_bits_identical_to_the_cpu_reference(gpu_backend, shape, dtype, rounding, layout):
    """Same seed -> the GPU writes exactly the bits the CPU reference writes.

    Also through a transposed view of W (``[K, M]`` storage, the Kahan buffer row-major: its own
    strides) and with strided ``a``/``b``; Kahan: the buffer's bits too.
    """
    M, K = shape
    g = torch.Generator().manual_seed(M + K)
    weight = torch.randn(M, K, generator=g).to(dtype)
    a = torch.randn(K, generator=g) * 1e-2
    b = torch.randn(M, generator=g)
    comp = compensation_like(weight, seed=M) if rounding == "kahan" else None
    expected, expected_c = weight.clone(), comp.clone() if comp is not None else None
    xf.merge_(expected, a, b, 0.9, rounding, 1234, "torch", compensation=expected_c)
    assert not torch.equal(expected, weight)
    w = weight.t().contiguous().to(CUDA).t() if layout == "transposed" else weight.to(CUDA)
    c = comp.to(CUDA) if comp is not None else None
    a_gpu, b_gpu = a.to(CUDA), b.to(CUDA)
    if layout == "strided-adapters":
        a_gpu = torch.stack([a_gpu, -a_gpu], dim=1)[:, 0]
        b_gpu = torch.stack([b_gpu, -b_gpu], dim=1)[:, 0]
        assert a_gpu.stride() == (2,) and b_gpu.stride() == (2,)
    out = xf.merge_(w, a_gpu, b_gpu, 0.9, rounding, 1234, gpu_backend, compensation=c)
    assert out is w
    assert torch.equal(bits_of(w.cpu()), bits_of(expected))
    if c is not None:
        assert torch.equal(bits_of(c.cpu()), bits_of(expected_c))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_merge_other_seed_other_bits(gpu_backend, dtype):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 50, generator=g).to(dtype).to(CUDA)
    a, b = (torch.randn(n, generator=g).to(CUDA) * 1e-2 for n in (50, 40))
    results = []
    for seed in (7, 7, 8):
        w = weight.clone()
        xf.merge_(w, a, b, 1.0, "stochastic", seed=seed, backend=gpu_backend)
        results.append(bits_of(w))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize("rounding", ["nearest", "kahan"])
def test_merge_refusal_leaves_weight_untouched_and_near_overflow_merge_applies(
    gpu_backend, rounding
):
    weight = torch.zeros(12, 20, dtype=torch.float16, device=CUDA)
    weight[0, 0] = 60000.0
    a, b = torch.full((20,), 100.0, device=CUDA), torch.full((12,), 100.0, device=CUDA)
    comp = torch.full_like(weight, 1e-3) if rounding == "kahan" else None
    before = weight.clone()
    with pytest.raises(ValueError, match="merge refused"):  # 60000 + 10000 overflows fp16
        xf.merge_(weight, a, b, 1.0, rounding, backend=gpu_backend, compensation=comp)
    assert torch.equal(bits_of(weight), bits_of(before))
    if comp is not None:
        assert torch.equal(comp, torch.full_like(weight, 1e-3))
    a[0] = 0.0  # the 10000 update now misses column 0, where the 60000 sits
    xf.merge_(weight, a, b, 1.0, rounding, backend=gpu_backend, compensation=comp)
    assert weight[0, 0].item() == 60000.0 and weight[0, 1].item() == 10000.0
    assert torch.isfinite(weight.float()).all()


# ---- counter hash and rounding, compiled -----------------------------------------------------


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rng_and_rounding_kernels_match_their_torch_twins(dtype):
    """Indices past 2**32, edge values (max finite, beyond it, subnormal, -0), compiled."""
    idx = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62])
    fmax = torch.finfo(dtype).max
    beyond = min(2.0 * fmax, torch.finfo(torch.float32).max)
    tiny = torch.finfo(dtype).smallest_normal
    value = torch.tensor(
        [1.0 / 3, -2.7, fmax, beyond, -beyond, tiny / 3, -tiny / 5, -0.0, 12345.678]
    )
    bits = torch.empty(idx.numel(), dtype=torch.int64, device=CUDA)
    out = torch.empty(idx.numel(), dtype=dtype, device=CUDA)
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    hash_and_round_kernel[(1,)](
        idx.to(CUDA), value.to(CUDA), bits, out, 2024, idx.numel(), DTYPE=tl_dtype
    )
    expected_bits = reference.counter_hash(2024, idx)
    assert torch.equal(bits.cpu(), expected_bits)
    expected = reference.round_stochastic(value, expected_bits, dtype)
    assert torch.equal(bits_of(out.cpu()), bits_of(expected))


# ---- the Triton backend's cuBLAS path and backend="auto"'s choice ------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_cublas_path_matches_float64_reference(dtype, shape, with_bias, record_error, monkeypatch):
    """cuBLAS GEMMs + the rank-1 kernels of kernels/rank1_linear_parts.py (the cublas path)."""
    monkeypatch.setenv("XGBLORA_FAST_PATH", "cublas")
    lead, K, M = shape
    x, weight, bias, a, b, dy = make_inputs(lead, K, M, dtype, with_bias, seed=K * M + 3)
    y, grads = run_on_gpu(x, weight, bias, a, b, 0.75, dy, "triton")
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.75, dy)
    assert y.shape == (*lead, M) and y.dtype == dtype and y.is_cuda
    check_against_reference(y, grads, y_ref, grads_ref, TOL[dtype], record_error, "cublas", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cublas_path_strided_and_dropout(dtype, monkeypatch):
    monkeypatch.setenv("XGBLORA_FAST_PATH", "cublas")
    g = torch.Generator().manual_seed(8)
    K, M = 70, 43
    x = torch.randn(3, 13, 2 * K, generator=g).to(dtype)[..., ::2]
    weight = (torch.randn(K, M, generator=g) / K**0.5).to(dtype).t()
    a = torch.randn(2 * K, generator=g)[::2]
    b = torch.randn(M, 3, generator=g)[:, 1]
    bias = torch.randn(M, 2, generator=g).to(dtype)[:, 0]
    dy = torch.randn(3, 13, M, generator=g).to(dtype)
    y, grads = run_on_gpu(x, weight, bias, a, b, 1.3, dy, "triton")
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 1.3, dy)
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, ref in grads_ref.items():
        assert rel_err(grads[name], ref) < TOL[dtype], name
    # Dropout: the same draw through both paths gives the same result within tolerance.
    torch.manual_seed(5)
    y_c, g_c = run_on_gpu(x, weight, bias, a, b, 1.3, dy, "triton", dropout=0.3)
    monkeypatch.setenv("XGBLORA_FAST_PATH", "fused")
    torch.manual_seed(5)
    y_f, g_f = run_on_gpu(x, weight, bias, a, b, 1.3, dy, "triton", dropout=0.3)
    assert rel_err(y_c, y_f.cpu().double()) < TOL[dtype]
    for name in g_f:
        assert rel_err(g_c[name], g_f[name].cpu().double()) < TOL[dtype], name


def test_auto_times_both_paths_once_and_caches_the_choice(tmp_path, monkeypatch):
    from xgblora_fast.ops import dispatch

    monkeypatch.delenv("XGBLORA_FAST_PATH", raising=False)
    monkeypatch.setenv("XGBLORA_FAST_CACHE", str(tmp_path))
    selector = dispatch.PathSelector()
    monkeypatch.setattr(dispatch, "SELECTOR", selector)
    x, weight, bias, a, b, dy = make_inputs((333,), 512, 384, torch.bfloat16, True, seed=9)
    y, grads = run_on_gpu(x, weight, bias, a, b, 0.5, dy, "auto")
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.5, dy)
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]
    for name, ref in grads_ref.items():
        assert rel_err(grads[name], ref) < TOL[torch.bfloat16], name
    cache = tmp_path / dispatch.CACHE_FILE
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["device"]["gpu"] == torch.cuda.get_device_name()
    choices = entry["choices"]
    assert {key.split("|")[0] for key in choices} == {"forward", "backward"}
    for record in choices.values():
        assert record["agree"] and record["path"] in dispatch.PATHS
        assert record["fused_s"] > 0 and record["cublas_s"] > 0
    # Decode-sized N: the cuBLAS path, nothing timed or cached.
    run_on_gpu(x[:4], weight, bias, a, b, 0.5, dy[:4], "auto")
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["choices"] == choices


def test_weighted_colsum_column_major_past_2_31_elements():
    """A column-major [N, C] view with N * C > 2^31: column offsets c * N pass int32."""
    from xgblora_fast.kernels.rank1_linear_parts import colsum_triton
    from xgblora_fast.kernels.rank1_reduce import weighted_colsum_triton

    n, c = 65536, 32769  # N * C = 2^31 + 2^16 bf16 elements: 4.3 GB
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    storage = torch.empty((c, n), device=CUDA, dtype=torch.bfloat16)
    storage[:-1].fill_(0.5)
    storage[-1].fill_(1.0)  # the last column, at offsets past 2^31
    x = storage.t()
    w = torch.full((n,), 2.0, device=CUDA)
    wsum, csum = weighted_colsum_triton(x, w, with_colsum=True)
    assert wsum[-1].item() == 2.0 * n and csum[-1].item() == n
    assert wsum[0].item() == n and csum[-2].item() == 0.5 * n
    assert colsum_triton(x)[-1].item() == n
    del storage, x
    torch.cuda.empty_cache()


def test_booster_on_a_cuda_model_draws_what_a_cpu_model_draws():
    """The Booster's generator lives on the CPU: boosters of a model on the GPU get the same
    random ``a`` as the same model on the CPU, at build time and at each restart."""
    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Linear(40, 24))
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    config = xf.XGBLoRAConfig(kappa=1, booster_init="random", seed=3)
    boosters = [xf.Booster(m, config) for m in (cpu_model, gpu_model)]
    for booster in boosters:
        optimizer = torch.optim.SGD(booster.param_groups(), lr=0.1)
        booster.attach(optimizer)
        device = next(booster.model.parameters()).device
        booster.model(torch.ones(3, 48, device=device)).square().sum().backward()
        optimizer.step()
        booster.step()  # round end: merge, then a fresh a from the generator
    cpu_booster, gpu_booster = boosters
    for name, layer in gpu_booster.layers.items():
        assert layer.lora_a.is_cuda
        torch.testing.assert_close(layer.lora_a.cpu(), cpu_booster.layers[name].lora_a)
