"""Host reads of a round end: one transfer for every layer together, whatever their number.

Every value a round end decides on (finite boosters, the history's norms, the unit scores, the
merges' safety checks) is measured on the device and read through ``checks.host_values``. These
tests count its calls, and every other way Python reads a tensor's value (``item``, ``float``,
``bool``, ``int``, ``tolist``), during ``Booster._end_round``: on a GPU each would be a
synchronisation. ``tests/gpu/test_gpu_syncs.py`` checks the same on CUDA under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn

import xgblora_fast as xf
from xgblora_fast.boosting.booster import Booster
from xgblora_fast.ops import checks
from xgblora_fast.ops.checks import MergeStats

TENSOR_READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy")


class ReadCounter:
    """Counts ``host_values`` calls and the other Python reads of tensor values (outside it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.host_values = 0
        self.other: list[str] = []
        self.active = False
        self._inside = False
        real_host_values = checks.host_values

        def counting_host_values(*tensors):
            if self.active:
                self.host_values += 1
            self._inside = True
            try:
                return real_host_values(*tensors)
            finally:
                self._inside = False

        monkeypatch.setattr(checks, "host_values", counting_host_values)
        for name in TENSOR_READS:
            real = getattr(torch.Tensor, name)

            def method(t, *args, _real=real, _name=name, **kwargs):
                if self.active and not self._inside:
                    self.other.append(_name)
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, method)

    @contextlib.contextmanager
    def counting(self):
        self.host_values, self.other, self.active = 0, [], True
        try:
            yield self
        finally:
            self.active = False


def count_round_ends(monkeypatch, booster: Booster) -> list[tuple[int, list[str]]]:
    """Wrap ``booster._end_round``: ``[(host_values calls, other reads)]`` per round end."""
    counter = ReadCounter(monkeypatch)
    seen = []
    real = booster._end_round

    def end_round(*args, **kwargs):
        with counter.counting():
            try:
                return real(*args, **kwargs)
            finally:
                seen.append((counter.host_values, list(counter.other)))

    monkeypatch.setattr(booster, "_end_round", end_round)
    return seen


def model_of(layers: int, width: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def train(booster: Booster, model: nn.Module, steps: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=lr)
    booster.attach(optimizer)
    x = torch.randn(6, model[0].in_features, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step()


CONFIGS = {
    "default": {},  # carry, booster_keep 0.9, gradient-scored units
    "uniform": {"select": "uniform"},
    "kahan": {"rounding": "kahan"},
    "stochastic": {"rounding": "stochastic", "booster_init": "random"},
    "redraw": {"booster_init": "redraw"},
    "half": {"layers_per_round": 0.5, "booster_init": "random", "sample_by": "module"},
    "no-record": {"record": False},
}


@pytest.mark.parametrize("layers", [1, 3, 8])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_round_end_reads_the_host_once_whatever_the_number_of_layers(layers, config, monkeypatch):
    # Before batching: ~9 host reads per layer and round (11 in a layer's first, 2 more with
    # Kahan) plus 2 blocking record copies; now one for the whole round end.
    model = model_of(layers)
    cfg = xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0, **CONFIGS[config])
    booster = Booster(model, cfg)
    seen = count_round_ends(monkeypatch, booster)
    train(booster, model, steps=5)
    booster.finish()
    assert len(seen) == 3  # two rounds (the first reads every W) and finish()
    for host_values, other in seen:
        assert host_values == 1
        assert other == []


def test_finish_reads_the_host_twice_at_most(monkeypatch):
    """One read to see whether a booster was kept, one for the round end it then runs."""
    model = model_of(5)
    booster = Booster(model, xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0))
    train(booster, model, steps=4)  # ends on a round end: only the kept boosters are left
    counter = ReadCounter(monkeypatch)
    with counter.counting():
        booster.finish()
    assert (counter.host_values, counter.other) == (2, [])
    assert len(booster.history) == 3


def test_the_history_and_records_are_those_of_per_layer_reads():
    """The batched values are the ones ``float(tensor)`` gave: same history, same records."""
    model = model_of(3)
    booster = Booster(model, xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0))
    expected = []
    real = booster._end_round

    @torch.no_grad()
    def end_round(*args, **kwargs):
        norms = {}
        for name in booster.active:
            layer = booster.layers[name]
            # Carry with booster_keep 0.9: v = a, t = merge_step * (1 - 0.9).
            step = booster.config.merge_step * (1 - 0.9)
            norms[name] = abs(step * layer.alpha) * float(layer.lora_a.norm())
            norms[name] *= float(layer.lora_b.norm())
        expected.append(norms)
        return real(*args, **kwargs)

    booster._end_round = end_round
    train(booster, model, steps=4)
    for round_, norms in zip(booster.history, expected, strict=True):
        assert round_["update_norm"] == norms
        for name, norm in norms.items():
            base = booster._base_norms[name]
            assert round_["relative_update"][name] == norm / base
        assert round_["unit_scores"]  # the gradient sketch was read too
    record = booster.records["0"]
    assert record.rounds == [0, 1] and record.a.shape == (2, 12)


def test_a_refused_round_reads_once_and_changes_nothing(monkeypatch):
    model = model_of(4)
    booster = Booster(model, xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0, booster_init="redraw"))
    seen = count_round_ends(monkeypatch, booster)
    train(booster, model, steps=2)
    weights = [m.weight.detach().clone() for m in model]
    generator = booster.generator.get_state()
    with torch.no_grad():
        booster.layers["2"].lora_b[1] = math.nan
    with pytest.raises(FloatingPointError, match=r"\['2'\]"):
        booster._end_round()
    assert seen[-1] == (1, [])
    assert all(torch.equal(w, m.weight) for w, m in zip(weights, model, strict=True))
    assert torch.equal(booster.generator.get_state(), generator)  # no redraw was drawn
    assert [len(r.rounds) for r in booster.records.values()] == [1, 1, 1, 1]


def test_a_merge_refused_with_batched_values_is_refused_as_before(monkeypatch):
    """A NaN in W (the first merge reads it): refused at that layer, W and record untouched."""
    model = model_of(3)
    booster = Booster(model, xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0))
    train(booster, model, steps=1)
    with torch.no_grad():
        model[1].weight[0, 0] = math.inf
    before = [m.weight.detach().clone() for m in model]
    seen = count_round_ends(monkeypatch, booster)
    with pytest.raises(ValueError, match="weight already contains NaN/Inf"):
        booster._end_round()
    assert seen == [(1, [])]
    assert not torch.equal(model[0].weight, before[0])  # merged before the refusal, as before
    assert torch.equal(model[1].weight, before[1]) and torch.equal(model[2].weight, before[2])
    assert [len(booster.records[n].rounds) for n in "012"] == [1, 0, 0]


# ---- the layer's batched merge: same bits, same bound, same refusals -------------------------


def merge_pair(rounding: str, dtype: torch.dtype):
    torch.manual_seed(5)
    layer = xf.FastRank1Linear(9, 7, dtype=dtype, backend="torch")
    twin = xf.FastRank1Linear(9, 7, dtype=dtype, backend="torch")
    twin.load_state_dict(layer.state_dict())
    for m in (layer, twin):
        with torch.no_grad():
            m.lora_b.copy_(torch.linspace(-2, 3, 7))
    return layer, twin


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_with_stats_equals_merge_without(rounding, dtype, monkeypatch):
    layer, twin = merge_pair(rounding, dtype)
    counter = ReadCounter(monkeypatch)
    for step in range(3):  # the first reads W, the later ones use the bound
        a, b = layer.booster_vectors()
        tensors, finish = layer.merge_stats_request(a, b, 0.5, rounding)
        with counter.counting():
            stats = finish(checks.host_values(*tensors))
            layer.merge_vectors_(a, b, 0.5, rounding, seed=step, stats=stats)
        assert counter.host_values == 1 and counter.other == []
        assert (stats.w_max is not None) == (step == 0)
        twin.merge_vectors_(*twin.booster_vectors(), 0.5, rounding, seed=step)
        assert torch.equal(layer.weight, twin.weight)
        assert layer._weight_bound[2] == twin._weight_bound[2]
        if rounding == "kahan":
            assert torch.equal(layer.compensation, twin.compensation)


def test_stats_of_a_weight_written_since_are_not_trusted():
    layer, _ = merge_pair("nearest", torch.float32)
    a, b = layer.booster_vectors()
    tensors, finish = layer.merge_stats_request(a, b)
    stats = finish(checks.host_values(*tensors))
    with torch.no_grad():
        layer.weight[2, 3] = math.nan  # written after the stats were measured
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="weight already contains NaN"):
        layer.merge_vectors_(a, b, stats=stats)
    assert torch.isnan(layer.weight[2, 3]) and torch.equal(
        torch.nan_to_num(layer.weight), torch.nan_to_num(before)
    )


# ---- host_values ---------------------------------------------------------------------------


def test_host_values_reads_every_value_exactly_in_order():
    values = [
        torch.tensor(1 / 3, dtype=torch.float32),
        torch.tensor([65504.0, -6e-8], dtype=torch.float16),
        torch.tensor([True, False]),
        torch.tensor([[1.0078125, -3.0]], dtype=torch.bfloat16),
        torch.tensor([], dtype=torch.float32),
        torch.tensor(math.inf),
    ]
    got = checks.host_values(*values)
    assert got == [float(v) for t in values for v in t.reshape(-1)]
    assert all(type(v) is float for v in got)
    assert checks.host_values() == []


def test_abs_max_and_merge_stats_agree_with_aminmax():
    t = torch.tensor([-3.0, 2.0, 0.5])
    assert checks.abs_max(t) == 3.0
    assert math.isnan(checks.abs_max(torch.tensor([1.0, math.nan])))
    assert checks.abs_max(torch.tensor([1.0, -math.inf])) == math.inf
    w = torch.full((2, 3), -4.0)
    stats = MergeStats.read(w, t, torch.tensor([1.0, -7.0]), torch.ones(2, 3))
    assert stats == MergeStats(3.0, 7.0, 1.0, 4.0)
