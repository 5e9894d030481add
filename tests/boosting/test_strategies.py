"""The restart strategies (``boosting/strategies.py``): what a round end merges and where the next
booster starts, per ``booster_init``, float64-checked on one layer."""

import math

import pytest
import torch
from helpers.kernel_checks import assert_rel_close

import xgblora_fast as xf
from xgblora_fast.boosting.strategies import Carry, Orthogonal, Redraw, Restart, strategy_for

K, M = 24, 20
ALPHA = 1.25


def trained_layer(seed: int) -> xf.FastRank1Linear:
    torch.manual_seed(seed)
    layer = xf.FastRank1Linear(K, M, bias=True, alpha=ALPHA)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(K))
        layer.lora_b.copy_(torch.randn(M))
    return layer


def round_end(strategy, layer, step: float, keep: float, generator: torch.Generator):
    """What ``Booster`` does for one layer: plan, merge the plan, restart."""
    plan = strategy.plan(layer, step, keep, generator)
    layer.merge_vectors_(plan.direction, layer.booster_vectors()[1], plan.step)
    strategy.restart_(layer, plan, keep, generator)
    return plan


def test_each_booster_init_has_its_strategy():
    assert isinstance(strategy_for("random"), Restart)
    assert isinstance(strategy_for("gradient"), Restart)
    assert type(strategy_for("carry")) is Carry
    assert isinstance(strategy_for("redraw"), Redraw)
    assert isinstance(strategy_for("orthogonal"), Orthogonal)
    with pytest.raises(ValueError, match="booster_init must be one of"):
        strategy_for("orthogonal?")


@pytest.mark.parametrize(
    "strategy, keep",
    [(Restart(), 0.0), (Carry(), 0.0), (Carry(), 0.3), (Redraw(), 0.0), (Redraw(), 0.6)],
    ids=["restart", "carry", "carry_keep", "redraw", "redraw_keep"],
)
def test_round_end_keeps_the_function_and_moves_the_booster(strategy, keep):
    """With step 1 every strategy leaves the layer's output unchanged; W and the next booster are
    what the strategy's formula says (float64); Carry draws no random number."""
    layer = trained_layer(5)
    w0, a0, b0 = (t.detach().double().clone() for t in (layer.weight, layer.lora_a, layer.lora_b))
    x = torch.randn(3, 5, K)
    with torch.no_grad():
        y0 = layer(x).double()
    generator = torch.Generator().manual_seed(3)
    plan = round_end(strategy, layer, 1.0, keep, generator)
    drew = not torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())

    with torch.no_grad():
        assert_rel_close(layer(x), y0, 1e-5, "output after the round end")
    a1, b1 = layer.lora_a.detach().double(), layer.lora_b.detach().double()
    if isinstance(strategy, Restart):
        expected_w = w0 + ALPHA * torch.outer(b0, a0)
        assert drew and torch.count_nonzero(layer.lora_b) == 0
        assert not torch.equal(a1, a0) and a1.abs().max() <= 1 / math.sqrt(K)
    elif isinstance(strategy, Redraw):
        next_a = plan.next_a.double()
        expected_w = w0 + ALPHA * torch.outer(b0, a0 - keep * next_a)
        assert drew and plan.step == 1.0 and torch.equal(a1, next_a)
        assert math.isclose(next_a.norm().item(), a0.norm().item(), rel_tol=1e-6)
        torch.testing.assert_close(b1, keep * b0, rtol=1e-7, atol=0)
    else:
        expected_w = w0 + (1 - keep) * ALPHA * torch.outer(b0, a0)
        assert not drew and plan.step == 1.0 - keep and torch.equal(a1, a0)
        torch.testing.assert_close(b1, keep * b0, rtol=1e-7, atol=0)
    assert_rel_close(layer.weight, expected_w, 1e-6, "merged weight")


@pytest.mark.parametrize("strategy", [Carry(), Redraw()], ids=["carry", "redraw"])
def test_step_below_one_merges_that_fraction_of_the_merged_part(strategy):
    """``merge_step`` t: ``W += t (1 - keep) s b a^T`` (+ the redraw's difference)."""
    layer = trained_layer(6)
    w0, a0, b0 = (t.detach().double().clone() for t in (layer.weight, layer.lora_a, layer.lora_b))
    plan = round_end(strategy, layer, 0.5, 0.2, torch.Generator().manual_seed(4))
    direction = 0.5 * 0.8 * a0
    if plan.next_a is not None:
        direction = direction + 0.2 * (a0 - plan.next_a.double())
    assert_rel_close(layer.weight, w0 + ALPHA * torch.outer(b0, direction), 1e-6, "merged weight")


@pytest.mark.parametrize(
    "strategy, keep",
    [(Restart(), 0.5), (Carry(), 1.0), (Carry(), -0.1), (Redraw(), 1.5)],
    ids=["restart_keeps_nothing", "carry_all", "carry_negative", "redraw_too_much"],
)
def test_bad_keep_is_refused_before_anything_is_drawn_or_merged(strategy, keep):
    layer = trained_layer(7)
    before = [t.detach().clone() for t in (layer.weight, layer.lora_a, layer.lora_b)]
    generator = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match=r"keep"):
        strategy.plan(layer, 1.0, keep, generator)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(1).get_state())
    for t, old in zip((layer.weight, layer.lora_a, layer.lora_b), before, strict=True):
        assert torch.equal(t, old)


@pytest.mark.parametrize("in_features", [24, 3], ids=["room_left", "span_full"])
def test_orthogonal_draws_each_a_outside_the_merged_directions(in_features):
    """Each new ``a`` is orthogonal to every direction the layer merged before (float64 check)
    and has the norm of the plain draw; once the merged directions span the input space the
    draw is used as it is."""
    torch.manual_seed(11)
    layer = xf.FastRank1Linear(in_features, M, alpha=ALPHA)
    generator = torch.Generator().manual_seed(2)
    merged = []
    for _ in range(5):
        with torch.no_grad():  # a round of training moves a off its draw, and b off zero
            layer.lora_a.add_(0.1 * torch.randn(in_features))
            layer.lora_b.copy_(torch.randn(M))
        merged.append(layer.lora_a.detach().double().clone())
        twin = torch.Generator()
        twin.set_state(generator.get_state())
        plain = layer.draw_a(twin).double()
        round_end(Orthogonal(), layer, 1.0, 0.0, generator)
        a = layer.lora_a.detach().double()
        assert torch.count_nonzero(layer.lora_b) == 0
        assert math.isclose(a.norm().item(), plain.norm().item(), rel_tol=1e-6)
        if len(merged) < in_features:
            span = torch.linalg.qr(torch.stack(merged).T).Q.T  # orthonormal rows
            assert (span @ a).abs().max() <= 1e-6 * a.norm()
        else:
            assert torch.equal(a, plain)
    assert layer.merged_basis.shape == (min(5, in_features), in_features)
