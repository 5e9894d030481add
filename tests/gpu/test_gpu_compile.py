"""``torch.compile(fullgraph=True)`` (inductor) of a model with injected layers, on a CUDA device.

A small pre-norm gated-MLP block whose four ``nn.Linear`` are replaced by ``FastRank1Linear``
(``xf.inject``, ``"all-linear"``) on the Triton and the CUDA C++ backends: the compiled model
gives the eager model's outputs and gradients (x and every booster), and in-place merges between
compiled calls need no recompilation. Run by ``bench/gpu_check.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.kernel_checks import GPU_MARKS
from torch._dynamo.testing import CompileCounterWithBackend

import xgblora_fast as xf

pytestmark = GPU_MARKS

D, HIDDEN, OUT = 72, 200, 36
# Normwise relative tolerance, compiled vs eager: inductor fuses the norm and the activations
# in its own kernels (other rounding orders; in bf16 it keeps fused intermediates in fp32).
REL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


class Block(nn.Module):
    """``head(x + down(silu(gate(norm x)) * up(norm x)))``: four linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, HIDDEN)
        self.gate = nn.Linear(D, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, D)
        self.head = nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.head(x + self.down(F.silu(self.gate(h)) * self.up(h)))


def make_model(dtype: torch.dtype, backend: str) -> tuple[Block, list[xf.FastRank1Linear]]:
    """The block on CUDA with every linear layer injected; boosters drawn with ``b != 0``."""
    torch.manual_seed(0)
    model = Block().to("cuda", dtype)
    layers = list(xf.inject(model, "all-linear", alpha=0.5, backend=backend).values())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            for p in (layer.lora_a, layer.lora_b):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, layers


def boosters(layers: list[xf.FastRank1Linear]) -> list[nn.Parameter]:
    return [p for layer in layers for p in (layer.lora_a, layer.lora_b)]


def forward_backward(model, layers, x, dy) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of x and of every booster (cleared first)."""
    for p in boosters(layers):
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    return y.detach(), [x.grad, *(p.grad for p in boosters(layers))]


def assert_rel_close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    ref64 = ref.detach().double()
    floor = rel * ref64.abs().max().item()
    assert floor > 0, what
    torch.testing.assert_close(got.detach().double(), ref64, rtol=rel, atol=floor, msg=what)


@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inductor_fullgraph_matches_eager(gpu_backend, dtype):
    torch._dynamo.reset()
    model, layers = make_model(dtype, gpu_backend)
    compiled = torch.compile(model, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 33, D, generator=g).to("cuda", dtype)
    dy = torch.randn(4, 33, OUT, generator=g).to("cuda", dtype)
    y_ref, grads_ref = forward_backward(model, layers, x, dy)
    y, grads = forward_backward(compiled, layers, x, dy)
    for layer in layers:
        layer.active = False
    with torch.no_grad():
        assert (y_ref - model(x)).abs().max() > 0.1  # the adapters matter
    assert_rel_close(y, y_ref, REL[dtype], "output")
    for i, (got, ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert got is not None, i
        assert_rel_close(got, ref, REL[dtype], f"gradient {i} (0: x, then a, b per layer)")
    torch._dynamo.reset()


@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"], indirect=True)
def test_merge_between_compiled_calls_needs_no_recompile(gpu_backend):
    """merge_ folds the boosters into W in place: the same graph, the same function."""
    torch._dynamo.reset()
    model, layers = make_model(torch.float32, gpu_backend)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(5, 7, D, device="cuda")
    with torch.no_grad():
        y0 = compiled(x)
        for layer in layers:
            layer.merge_()
        y1 = compiled(x)
        assert_rel_close(y1, y0, 1e-4, "compiled output after the merges")
        assert_rel_close(y1, model(x), 1e-4, "compiled vs eager after the merges")
    assert counter.frame_count == 1
    torch._dynamo.reset()
