"""Shared by the CPU tests (tests/ops) and the GPU tests (tests/gpu): inputs, float64
references, error measures, and a tiny kernel exposing the RNG and rounding helpers.

Importable as ``kernel_checks`` because pytest puts ``tests/`` (home of conftest.py) on the path.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import xgblora_fast
from xgblora_fast.kernels.rng import counter_hash, round_stochastic
from xgblora_fast.ops.backend import triton_interpreting

# The marks of every GPU test: CUDA needed, and compiled (not interpreted) kernels.
GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        triton_interpreting(),
        reason="Triton kernels run in the interpreter here (TRITON_INTERPRET=1): "
        "run them compiled with bench/gpu_check.py",
    ),
]

# Normwise relative tolerance by dtype: fp32 ~1e-5, fp16 ~1e-3, bf16 ~1e-2.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|`` in float64 on the CPU."""
    got64 = got.detach().cpu().double()
    return ((got64 - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_rel_close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str = "") -> None:
    """Elementwise ``rtol=rel`` plus an absolute floor of ``rel * max|ref|`` (normwise)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    ref64 = ref.detach().double()
    floor = rel * ref64.abs().max().item()
    assert floor > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    torch.testing.assert_close(got.detach().double(), ref64, rtol=rel, atol=floor, msg=what)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of an fp16/bf16/fp32 tensor, for bit-identity checks."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def compensation_like(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """A Kahan buffer for ``weight`` as merges leave it: below ``eps |w| / 4`` (half an ulp)."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(weight.shape, generator=g) * 2 - 1
    eps = torch.finfo(weight.dtype).eps
    return (weight.detach().cpu().float() * eps * 0.25 * spread).to(weight.dtype)


def make_inputs(lead, K, M, dtype, with_bias, seed, adapter_dtype=torch.float32):
    """CPU tensors ``(x [*lead, K], weight [M, K], bias [M] | None, a [K], b [M], dy)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    weight = (torch.randn(M, K, generator=g) / K**0.5).to(dtype)
    bias = torch.randn(M, generator=g).to(dtype) if with_bias else None
    a = torch.randn(K, generator=g).to(adapter_dtype)
    b = torch.randn(M, generator=g).to(adapter_dtype)
    dy = torch.randn(*lead, M, generator=g).to(dtype)
    return x, weight, bias, a, b, dy


def float64_reference(x, weight, bias, a, b, scale, dy):
    """Output and gradients of x, a, b (and bias) in float64 on the CPU, by autograd."""
    x64, a64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, a, b))
    bias64 = bias.detach().cpu().double().requires_grad_() if bias is not None else None
    y = x64 @ weight.detach().cpu().double().t() + scale * (x64 @ a64)[..., None] * b64
    if bias64 is not None:
        y = y + bias64
    y.backward(dy.detach().cpu().double())
    grads = {"x": x64.grad, "a": a64.grad, "b": b64.grad}
    if bias64 is not None:
        grads["bias"] = bias64.grad
    return y.detach(), grads


@triton.jit
def hash_and_round_kernel(idx_ptr, value_ptr, bits_ptr, out_ptr, seed, n, DTYPE: tl.constexpr):
    """``counter_hash`` of up to 64 indices and ``round_stochastic`` of as many values."""
    offs = tl.arange(0, 64)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask)
    bits = counter_hash(seed, idx)
    tl.store(bits_ptr + offs, bits.to(tl.int64), mask=mask)
    value = tl.load(value_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, round_stochastic(value, bits, DTYPE), mask=mask)


def autocast_parity(
    device: str, autocast_dtype: torch.dtype, weight_dtype: torch.dtype, backend: str, seed: int
) -> dict[str, float]:
    """A ``FastRank1Linear`` and ``nn.Linear`` + peft LoRA r=1 holding the same ``W``, ``bias``,
    ``a``, ``b``, run under ``torch.autocast(device, autocast_dtype)`` on a 3-D input: the
    relative error (``rel_err``) of our output and of the gradients of x, a and b against peft's.

    Asserts what autocast promises first: the output in the autocast dtype, every gradient in
    its leaf's own dtype, and ``W`` left in ``weight_dtype``.
    """
    import peft

    g = torch.Generator().manual_seed(seed)
    K, M, alpha = 45, 38, 1.5
    base = torch.nn.Linear(K, M).to(device=device, dtype=weight_dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(M, K, generator=g) / K**0.5)
        base.bias.copy_(torch.randn(M, generator=g))
    a = torch.randn(K, generator=g) / K**0.5
    b = torch.randn(M, generator=g)
    x = torch.randn(3, 7, K, generator=g)
    dy = torch.randn(3, 7, M, generator=g)

    reference_model = torch.nn.Sequential(copy.deepcopy(base))
    lora = peft.LoraConfig(r=1, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0)
    peft.inject_adapter_in_model(lora, reference_model)
    lora_layer = reference_model[0]
    with torch.no_grad():  # peft keeps its adapters in fp32, as we do
        lora_layer.lora_A["default"].weight.copy_(a[None, :])
        lora_layer.lora_B["default"].weight.copy_(b[:, None])
    ours = xgblora_fast.FastRank1Linear.from_linear(
        copy.deepcopy(base), alpha=alpha, backend=backend
    )
    with torch.no_grad():
        ours.lora_a.copy_(a)
        ours.lora_b.copy_(b)

    def run(module, a_param, b_param):
        xi = x.to(device).clone().requires_grad_()
        with torch.autocast(device, dtype=autocast_dtype):
            y = module(xi)
        (y.float() * dy.to(device)).sum().backward()
        return y, {"x": xi.grad, "a": a_param.grad, "b": b_param.grad}

    y, grads = run(ours, ours.lora_a, ours.lora_b)
    y_peft, grads_peft = run(
        lora_layer, lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight
    )
    assert y.dtype == y_peft.dtype == autocast_dtype
    assert grads["x"].dtype == torch.float32  # x is an fp32 leaf: autocast's cast hands it back
    assert grads["a"].dtype == grads["b"].dtype == torch.float32
    assert ours.weight.dtype == weight_dtype and ours.weight.grad is None
    errors = {"forward": rel_err(y, y_peft.detach().cpu().double())}
    for name, ref in grads_peft.items():
        errors[f"grad_{name}"] = rel_err(grads[name].reshape(ref.shape), ref.cpu().double())
    return errors


def run_compiled_json(args: list[str], timeout: int = 900) -> object:
    """Run ``python ARGS`` from the repo root without ``TRITON_INTERPRET`` (so Triton compiles
    ahead of time) and ``tests/`` importable; return what it printed to stdout, as JSON."""
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)
