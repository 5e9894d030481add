"""Gradient checkpointing (non-reentrant) and torch.compile give the eager gradients of the
boosters ``a``, ``b`` and of the inputs, for FastRank1Linear stacks and an injected HF model.

(``tests/test_compile.py`` covers compile vs eager of FastRank1Linear stacks in depth; here the
layers are injected into a transformers model and combined with checkpointing.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.offline_models import tiny_llama
from torch.utils.checkpoint import checkpoint

import xgblora_fast as xf

K, H = 24, 40


class Block(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.up = xf.FastRank1Linear(K, H, alpha=1.5, dropout=dropout, backend="torch")
        self.down = xf.FastRank1Linear(H, K, bias=False, alpha=0.5, dropout=dropout)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dropout) for _ in range(2))
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return x


def boosters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def randomise_boosters(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in boosters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # b != 0: the adapters matter


def grads(model, x, dy, seed=0):
    """Gradients of the input and of every booster (dropout masks from ``seed``)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    out.backward(dy)
    return [x.grad, *(p.grad for p in boosters(model))]


def assert_all_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g is not None and w is not None, i
        assert torch.isfinite(w).all() and w.abs().max() > 0, i
        assert torch.equal(g, w), f"gradient {i}: max diff {(g - w).abs().max().item():.3e}"


def assert_all_close(got, want, rel=1e-5):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g is not None and w.abs().max() > 0, i
        torch.testing.assert_close(g, w, rtol=rel, atol=rel * w.abs().max().item(), msg=str(i))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_non_reentrant_checkpoint_gives_the_eager_gradients_bit_for_bit(dropout):
    torch.manual_seed(0)
    eager = Net(dropout)
    randomise_boosters(eager, 1)
    ckpt = copy.deepcopy(eager)
    ckpt.use_checkpoint = True
    x, dy = torch.randn(2, 5, K), torch.randn(2, 5, K)
    # The recomputation replays the forward (same RNG state, so the same dropout masks).
    assert_all_equal(grads(ckpt, x, dy, seed=3), grads(eager, x, dy, seed=3))


def injected_llama(seed: int = 0):
    model = tiny_llama(seed)
    layers = xf.inject(model, ["q_proj", "v_proj", "down_proj"], alpha=2.0)
    assert len(layers) == 6
    randomise_boosters(model, 2)
    model.train()
    return model


class EmbedsOnly(nn.Module):
    """Feeds ``inputs_embeds`` so that the input gradient exists."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(inputs_embeds=x).logits


def test_hf_gradient_checkpointing_gives_the_eager_gradients():
    eager = injected_llama()
    ckpt = copy.deepcopy(eager)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for layer in ckpt.modules():
        if isinstance(layer, xf.FastRank1Linear):
            layer.register_forward_hook(lambda *args: calls.append(1))
    x, dy = torch.randn(2, 7, 32), torch.randn(2, 7, 64)
    want = grads(EmbedsOnly(eager), x, dy)
    got = grads(EmbedsOnly(ckpt), x, dy)
    # 6 forwards, then recomputation in backward (non-reentrant stops early once what
    # backward needs is recomputed, so not necessarily all 6 again).
    assert len(calls) > 6, "checkpointing did not recompute anything"
    assert len(got) == 1 + 2 * 6
    assert_all_equal(got, want)


def test_compiled_injected_model_gives_the_eager_gradients():
    eager = injected_llama()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    run = torch.compile(EmbedsOnly(compiled), backend="aot_eager", fullgraph=True)
    x, dy = torch.randn(2, 7, 32), torch.randn(2, 7, 64)
    want = grads(EmbedsOnly(eager), x, dy)
    compiled.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_()
    run(xc).backward(dy)
    got = [xc.grad, *(p.grad for p in boosters(compiled))]
    assert_all_close(got, want)


def test_compiled_model_with_non_reentrant_checkpoints_gives_the_eager_gradients():
    torch.manual_seed(0)
    eager = Net()
    randomise_boosters(eager, 4)
    ckpt = copy.deepcopy(eager)
    ckpt.use_checkpoint = True
    torch._dynamo.reset()
    run = torch.compile(ckpt, backend="aot_eager")
    x, dy = torch.randn(3, K), torch.randn(3, K)
    want = grads(eager, x, dy)
    xc = x.clone().requires_grad_()
    run(xc).backward(dy)
    assert_all_close([xc.grad, *(p.grad for p in boosters(ckpt))], want)
