"""torch.compile(fullgraph=True) through FastRank1Linear: no graph breaks, same values as eager."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.kernel_checks import assert_rel_close, rel_err
from torch._dynamo.testing import CompileCounterWithBackend

import xgblora_fast as xf
from xgblora_fast.ops.merge import merge_op
from xgblora_fast.ops.rank1_linear import rank1_linear_bwd, rank1_linear_fwd

K, H, M = 32, 48, 16


class Stack(nn.Module):
    def __init__(self, backend: str = "torch", dropout: float = 0.0) -> None:
        super().__init__()
        self.l1 = xf.FastRank1Linear(K, H, alpha=1.5, dropout=dropout, backend=backend)
        self.l2 = xf.FastRank1Linear(H, M, bias=False, alpha=0.5, dropout=dropout, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.gelu(self.l1(x)))

    def boosters(self) -> list[nn.Parameter]:
        return [self.l1.lora_a, self.l1.lora_b, self.l2.lora_a, self.l2.lora_b]


def make_stack(seed: int, backend: str = "torch", dropout: float = 0.0) -> Stack:
    torch.manual_seed(seed)
    model = Stack(backend, dropout)
    with torch.no_grad():
        for p in model.boosters():
            p.copy_(torch.randn_like(p) * 0.5)  # b != 0: the adapters matter
    return model


def run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, mark_dynamic: bool = False):
    """Output and gradients of x and of every booster."""
    x = x.detach().clone().requires_grad_()
    if mark_dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    y = model(x)
    y.backward(dy)
    return y.detach(), [x.grad, *(p.grad for p in model.boosters())]


def worst_error_vs_eager(backend: str, layer_backend: str, seed: int) -> float:
    """Largest ``max|compiled - eager| / max|eager|`` over the output and every gradient."""
    eager = make_stack(seed, layer_backend)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    x = torch.randn(3, 10, K)
    dy = torch.randn(3, 10, M)
    y_ref, grads_ref = run(eager, x, dy)
    y, grads = run(compiled, x, dy)
    torch._dynamo.reset()
    base = copy.deepcopy(eager)
    base.l1.active = base.l2.active = False
    assert (y_ref - base(x).detach()).abs().max() > 0.1  # the adapters matter
    names = ["y", "x", "l1.a", "l1.b", "l2.a", "l2.b"]
    errors = {}
    for name, got, ref in zip(names, [y, *grads], [y_ref, *grads_ref], strict=True):
        assert got is not None and got.shape == ref.shape, name
        errors[name] = rel_err(got, ref.double())
    return max(errors.values())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_graph_breaks(dropout, train):
    torch._dynamo.reset()
    model = make_stack(0, dropout=dropout).train(train)
    model.l2.active = False  # the plain-GEMM path traces too
    explanation = torch._dynamo.explain(model)(torch.randn(2, 5, K))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("layer_backend", ["torch", "triton"])
def test_aot_eager_matches_eager(layer_backend):
    assert worst_error_vs_eager("aot_eager", layer_backend, seed=1) <= 1e-6


def test_inductor_fullgraph_matches_eager():
    assert worst_error_vs_eager("inductor", "torch", seed=2) <= 1e-5


def test_merge_between_compiled_steps_needs_no_recompile():
    """merge_/reset_ work in place on the same Parameters: the compiled graph stays valid."""
    torch._dynamo.reset()
    model = make_stack(3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, K)
    with torch.no_grad():
        y0 = compiled(x)
        model.l1.merge_()
        model.l2.merge_()
        y1 = compiled(x)
        assert_rel_close(y1, y0, 1e-5, "compiled output after merge")
        with torch.no_grad():
            model.l1.lora_b.copy_(torch.randn(H))
        y2 = compiled(x)
        assert (y2 - y1).abs().max() > 1e-3
        assert_rel_close(y2, model(x), 1e-6, "compiled vs eager after an in-place update")
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["mark_dynamic", "dynamic=True"])
def test_dynamic_token_count_compiles_once(mode):
    """New token counts reuse one dynamic-shape graph (no recompilation per batch size)."""
    torch._dynamo.reset()
    model = make_stack(4)
    counter = CompileCounterWithBackend("aot_eager")
    dynamic = True if mode == "dynamic=True" else None
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
    frames_after_first = None
    for n in (5, 9, 17):
        x = torch.randn(n, K)
        dy = torch.randn(n, M)
        y, grads = run(compiled, x, dy, mark_dynamic=mode == "mark_dynamic")
        frames_after_first = frames_after_first or counter.frame_count
        for p in model.boosters():
            p.grad = None
        y_ref, grads_ref = run(model, x, dy)
        assert_rel_close(y, y_ref, 1e-6, f"output n={n}")
        for got, ref in zip(grads, grads_ref, strict=True):
            assert_rel_close(got, ref, 1e-6, f"grad n={n}")
        for p in model.boosters():
            p.grad = None
    assert counter.frame_count == frames_after_first
    if mode == "mark_dynamic":
        assert counter.frame_count == 1
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# The custom ops' fake implementations and autograd registration (what compile relies on)
# ------------------------------------------------------------------------------------------------


def op_inputs(dtype: torch.dtype, transposed_x: bool, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    n, k, m = 7, 12, 9
    x = torch.randn(k, n, generator=g).t() if transposed_x else torch.randn(n, k, generator=g)
    x = x.to(dtype)
    weight = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(m, generator=g).to(dtype)
    a = torch.randn(k, generator=g)
    b = torch.randn(m, generator=g)
    dy = torch.randn(n, m, generator=g).to(dtype)
    return x, weight, bias, a, b, dy


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_dropout", [False, True], ids=["plain", "dropout"])
def test_opcheck_rank1_linear_ops(backend, dtype, with_dropout):
    x, weight, bias, a, b, dy = op_inputs(dtype, transposed_x=False)
    x_adapter = F.dropout(x, 0.3, training=True) if with_dropout else None
    fwd_args = (
        x.requires_grad_(),
        weight,
        bias.requires_grad_(),
        a.requires_grad_(),
        b.requires_grad_(),
        1.5,
        x_adapter,
        backend,
    )
    torch.library.opcheck(rank1_linear_fwd, fwd_args)
    u = (x.detach().float() @ a.detach()).contiguous()
    bwd_args = (dy, x.detach(), weight, a.detach(), b.detach(), u, 1.5, x_adapter)
    torch.library.opcheck(rank1_linear_bwd, (*bwd_args, True, True, True, backend))
    torch.library.opcheck(rank1_linear_bwd, (*bwd_args, False, True, False, backend))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_merge_op(dtype, rounding):
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(9, 12, generator=g).to(dtype)
    a, b = torch.randn(12, generator=g), torch.randn(9, generator=g)
    compensation = torch.zeros_like(weight) if rounding == "kahan" else None
    torch.library.opcheck(merge_op, (weight, a, b, 0.5, rounding, 3, "torch", compensation))


def test_opcheck_backward_with_transposed_input():
    """A dense but transposed x: the fake dx must have the real (contiguous) strides."""
    x, weight, _, a, b, dy = op_inputs(torch.float32, transposed_x=True)
    assert not x.is_contiguous()
    u = x.float() @ a
    torch.library.opcheck(
        rank1_linear_bwd, (dy, x, weight, a, b, u, 1.5, None, True, True, True, "torch")
    )


def test_inductor_backward_with_transposed_input():
    """End to end: inductor checks the custom op's output strides against its fake kernel."""
    torch._dynamo.reset()
    torch.manual_seed(7)
    layer = xf.FastRank1Linear(12, 9, alpha=1.5, backend="torch")
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(9))

    def f(xt: torch.Tensor) -> torch.Tensor:
        return layer(xt.t())

    xt = torch.randn(12, 7)
    dy = torch.randn(7, 9)
    x_ref = xt.clone().requires_grad_()
    f(x_ref).backward(dy)
    a_grad_ref = layer.lora_a.grad.clone()
    layer.lora_a.grad = None
    layer.lora_b.grad = None
    x_c = xt.clone().requires_grad_()
    # Caches off: a compiled artifact from before a fix of the fake kernel must not be reused.
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        torch.compile(f, fullgraph=True)(x_c).backward(dy)
    assert_rel_close(x_c.grad, x_ref.grad, 1e-5, "dx")
    assert_rel_close(layer.lora_a.grad, a_grad_ref, 1e-5, "da")
    torch._dynamo.reset()
