"""Host synchronisations of a round end on CUDA: exactly one, whatever the number of layers.

``Booster._end_round`` measures every value it decides on (finite boosters, history norms, unit
scores, the merges' safety checks) on the device and reads them in one transfer
(``checks.host_values``); the merge records are copied without waiting. Each round end runs
under ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call but
the one allowed read. Run by ``bench/gpu_check.py``; the CPU counterpart is
``tests/test_host_syncs.py``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn
from helpers.kernel_checks import GPU_MARKS

import xgblora_fast as xf
from xgblora_fast.ops import checks

pytestmark = GPU_MARKS

LAYERS, WIDTH = 6, 64


@contextlib.contextmanager
def one_sync_allowed(monkeypatch: pytest.MonkeyPatch):
    """Syncs raise, except inside ``checks.host_values``; yields the list of its calls."""
    calls: list[int] = []
    real = checks.host_values

    def allowed(*tensors):
        calls.append(len(tensors))
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real(*tensors)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(checks, "host_values", allowed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield calls
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.setattr(checks, "host_values", real)


def cuda_booster(dtype: torch.dtype, **config):
    """A booster built on the CPU model, then moved (same Parameters) to the GPU."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, dtype=dtype) for _ in range(LAYERS)])
    cfg = xf.XGBLoRAConfig(kappa=3, kappa_growth=1.0, **config)
    booster = xf.Booster(model, cfg)
    model.to("cuda")
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=1e-2)
    booster.attach(optimizer)
    return model, booster, optimizer


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_round_end_synchronises_once(dtype, rounding, monkeypatch):
    model, booster, optimizer = cuda_booster(dtype, rounding=rounding)
    x = torch.randn(8, WIDTH, device="cuda", dtype=dtype)
    ends = 0
    for _ in range(9):  # three rounds: the first reads every W, the later ones use the bound
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if booster.step_in_round + 1 < booster.config.round_length(booster.round):
            assert not booster.step()
            continue
        layers = [booster.layers[n] for n in booster.active]
        a = [layer.lora_a.detach().cpu() for layer in layers]
        b = [layer.lora_b.detach().cpu() for layer in layers]
        with one_sync_allowed(monkeypatch) as calls:
            assert booster.step()  # merges every layer and starts the next round
        assert len(calls) == 1
        ends += 1
        for name, a0, b0 in zip(booster.active, a, b, strict=True):
            record = booster.records[name]  # the copies in flight have landed when read
            assert torch.equal(record.a[-1], a0) and torch.equal(record.b[-1], b0)
        assert all(math.isfinite(v) for v in booster.history[-1]["update_norm"].values())
        assert booster.history[-1]["unit_scores"]
    assert ends == 3
    with one_sync_allowed(monkeypatch) as calls:
        booster.finish()
    assert len(calls) == 1


def test_a_refused_round_synchronises_once(monkeypatch):
    model, booster, optimizer = cuda_booster(torch.float32)
    x = torch.randn(8, WIDTH, device="cuda")
    model(x).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        booster.layers["3"].lora_a[0] = math.nan
    weights = [m.weight.detach().clone() for m in model]
    with one_sync_allowed(monkeypatch) as calls, pytest.raises(FloatingPointError):
        booster._end_round()
    assert len(calls) == 1
    assert all(torch.equal(w, m.weight) for w, m in zip(weights, model, strict=True))
