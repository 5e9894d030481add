"""rank1_linear under torch.autocast (CPU): what autocast does to nn.Linear, on every path.

The GEMM runs in the autocast dtype, fp32 weights stay fp32 (the master copy), boosters keep
their dtype and get gradients in it, merges land in the fp32 weight; the eager Function, the
custom op called directly and ``torch.compile`` agree, and a backward or a merge inside an
autocast region changes nothing.
"""

import copy

import pytest
import torch
from helpers.kernel_checks import TOL, autocast_parity, float64_reference, make_inputs, rel_err
from torch._dynamo.testing import CompileCounterWithBackend

import xgblora_fast as xf

BACKENDS = ["torch", "triton"]
# (autocast dtype, base weight dtype): fp32 masters, and weights already in the autocast dtype.
PRECISIONS = [
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("autocast_dtype", "weight_dtype"), PRECISIONS, ids=str)
def test_matches_linear_plus_peft_lora(backend, autocast_dtype, weight_dtype, record_error):
    """Output and the gradients of x, a, b close to peft's under the same autocast.

    Both sides round to the autocast dtype (peft also computes its rank-1 path in it, we keep
    it in fp32), so they may differ by twice the dtype's tolerance against float64.
    """
    errors = autocast_parity("cpu", autocast_dtype, weight_dtype, backend, seed=3)
    for name, err in errors.items():
        record_error(f"autocast_vs_peft_{name}", backend, autocast_dtype, err)
        assert err < 2 * TOL[autocast_dtype], f"{name}: {err:.2e} against nn.Linear + peft"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, record_error):
    """The function under bf16 autocast: fp32 inputs, bf16 output, fp32 gradients, all close to
    float64 (bias included: a trainable bias gets its gradient in fp32 too)."""
    x, weight, bias, a, b, dy = make_inputs((4, 9), 37, 29, torch.float32, True, seed=11)
    leaves = [t.detach().requires_grad_() for t in (x, bias, a, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = xf.rank1_linear(leaves[0], weight, leaves[1], leaves[2], leaves[3], 0.8, backend)
    y.backward(dy.bfloat16())
    y_ref, grads_ref = float64_reference(x, weight, bias, a, b, 0.8, dy)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]
    for name, leaf in zip(("x", "bias", "a", "b"), leaves, strict=True):
        assert leaf.grad.dtype == torch.float32, name
        err = rel_err(leaf.grad, grads_ref[name])
        record_error(f"autocast_grad_{name}", backend, torch.bfloat16, err)
        assert err < TOL[torch.bfloat16], f"grad of {name}: {err:.2e}"


def test_custom_op_has_an_autocast_rule():
    """Called directly under autocast, the forward op casts x, W and bias (not a, b) itself."""
    x, weight, bias, a, b, _ = make_inputs((6,), 20, 12, torch.float32, True, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, u = torch.ops.xgblora_fast.rank1_linear_fwd(x, weight, bias, a, b, 0.5, None, "torch")
    y_ref, _ = float64_reference(x, weight, bias, a, b, 0.5, torch.zeros(6, 12))
    assert y.dtype == torch.bfloat16 and u.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]
    # The fp32 row dot used fp32 a on bf16 x: the same as x cast first, then dotted in fp32.
    torch.testing.assert_close(u, x.bfloat16().float() @ a)


def test_fp32_weights_stay_the_master_copy():
    """Training under autocast never changes W's dtype; the merge adds s b a^T in fp32."""
    torch.manual_seed(0)
    layer = xf.FastRank1Linear(24, 16, alpha=2.0)
    optimizer = torch.optim.SGD([layer.lora_a, layer.lora_b], lr=0.1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(torch.randn(5, 24)).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.lora_b.abs().sum() > 0  # the booster trained
    expected = layer.weight.double() + 2.0 * torch.outer(layer.lora_b.double(), layer.lora_a)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a merge called inside the region
        layer.merge_()
    assert layer.weight.dtype == torch.float32
    assert rel_err(layer.weight, expected) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_the_autocast_region(backend):
    """Calling backward inside the region (some loops do) gives the gradients taken outside."""
    x, weight, bias, a, b, dy = make_inputs((8,), 30, 14, torch.float32, True, seed=2)

    def grads(inside: bool):
        leaves = [t.detach().requires_grad_() for t in (x, a, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = xf.rank1_linear(leaves[0], weight, bias, leaves[1], leaves[2], 0.7, backend)
            if inside:
                y.backward(dy.bfloat16())
        if not inside:
            y.backward(dy.bfloat16())
        return [leaf.grad for leaf in leaves]

    for inside, outside in zip(grads(True), grads(False), strict=True):
        assert torch.equal(inside, outside)


def test_compiled_matches_eager_without_graph_breaks():
    """torch.compile(fullgraph=True) under autocast: one graph, same values as eager."""
    torch.manual_seed(4)
    eager = torch.nn.Sequential(
        xf.FastRank1Linear(16, 24, alpha=1.5), torch.nn.GELU(), xf.FastRank1Linear(24, 8)
    )
    with torch.no_grad():
        for layer in (eager[0], eager[2]):
            layer.lora_b.normal_()
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, 16)

    def run(model):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xi)
        y.float().sum().backward()
        boosters = [p.grad for n, p in model.named_parameters() if "lora" in n]
        return y, [xi.grad, *boosters]

    y_eager, grads_eager = run(eager)
    y_compiled, grads_compiled = run(compiled)
    assert counter.frame_count == 1
    assert y_compiled.dtype == torch.bfloat16
    assert torch.equal(y_compiled, y_eager)
    assert len(grads_compiled) == 5
    for got, want in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
