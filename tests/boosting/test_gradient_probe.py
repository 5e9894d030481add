"""Gradient probes: power iteration vs an explicit SVD, sketches, and the Booster's use of them."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn as nn

import xgblora_fast as xf
from xgblora_fast.boosting.gradient_probe import GradientProbe, LayerGradient, top_singular_pair
from xgblora_fast.boosting.strategies import merged_basis, orthogonal_part


def _pairs(seed: int, shapes: list[int], K: int, M: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, K, generator=g).to(dtype), torch.randn(n, M, generator=g).to(dtype))
        for n in shapes
    ]


def _explicit(pairs) -> torch.Tensor:
    return sum(dy.double().t() @ x.double() for x, dy in pairs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("K, M, shapes", [(7, 5, [1]), (33, 17, [5, 3]), (64, 48, [40])])
def test_power_iteration_matches_svd_of_the_explicit_gradient(backend, K, M, shapes):
    pairs = _pairs(K * M, shapes, K, M)
    G = _explicit(pairs)
    U, S, Vh = torch.linalg.svd(G)
    start = torch.randn(K, generator=torch.Generator().manual_seed(1))
    sigma, u, v = top_singular_pair(LayerGradient(pairs, backend), start, iters=200)
    assert sigma == pytest.approx(float(S[0]), rel=1e-5)
    assert float(v.double() @ start.double()) > 0  # the sign is fixed by the start vector
    assert abs(float(v.double() @ Vh[0])) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(u.double() @ U[:, 0])) == pytest.approx(1.0, abs=1e-5)
    # The pair is consistent: G v = sigma u.
    torch.testing.assert_close((G @ v.double()).float(), sigma * u, rtol=1e-4, atol=1e-5)


def test_projected_power_iteration_finds_the_top_pair_outside_a_subspace():
    """With ``project`` onto the complement of 3 orthonormal directions: the top pair of
    ``G P`` (float64 SVD), and ``v`` orthogonal to those directions."""
    K, M = 33, 17
    pairs = _pairs(11, [9, 4], K, M)
    G = _explicit(pairs)
    _, _, Vh = torch.linalg.svd(G)
    # The removed directions include G's own top one, so the answer has to change.
    taken = torch.linalg.qr(torch.stack([Vh[0], *torch.randn(2, K, dtype=torch.float64)]).T).Q.T
    P = torch.eye(K, dtype=torch.float64) - taken.T @ taken
    _, S, Vh_p = torch.linalg.svd(G @ P)
    project = functools.partial(orthogonal_part, basis=taken.float())  # what the Booster uses
    sigma, _, v = top_singular_pair(LayerGradient(pairs), torch.ones(K), 300, project)
    assert sigma == pytest.approx(float(S[0]), rel=1e-5)
    assert float(S[0]) < 0.99 * float(torch.linalg.svdvals(G)[0])
    assert abs(float(v.double() @ Vh_p[0])) == pytest.approx(1.0, abs=1e-5)
    assert (taken @ v.double()).abs().max() < 1e-6


def test_power_iteration_on_bf16_activations_finds_a_dominant_direction():
    K, M, N = 96, 80, 64
    g = torch.Generator().manual_seed(3)
    # A clear gap: one strong rank-1 component plus noise, as batch gradients typically are.
    x = torch.randn(N, K, generator=g) + 4 * torch.randn(N, 1, generator=g) * torch.randn(
        1, K, generator=g
    )
    dy = torch.randn(N, M, generator=g) + 4 * torch.randn(N, 1, generator=g) * torch.randn(
        1, M, generator=g
    )
    pairs = [(x.bfloat16(), dy.bfloat16())]
    _, _, Vh = torch.linalg.svd(_explicit([(x, dy)]))
    _, _, v = top_singular_pair(LayerGradient(pairs), torch.ones(K), iters=4)
    assert abs(float(v.double() @ Vh[0])) > 0.99


def test_zero_gradient_gives_zero_sigma_without_nan():
    pairs = [(torch.randn(4, 6), torch.zeros(4, 3))]
    sigma, u, v = top_singular_pair(LayerGradient(pairs), torch.ones(6), iters=3)
    assert sigma == 0.0
    assert torch.isfinite(u).all() and torch.isfinite(v).all()


def test_probe_captures_pairs_and_the_sketch_estimates_the_frobenius_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 8))
    layers = {"0": model[0], "2": model[2]}
    pair_probe = GradientProbe(layers)
    x = torch.randn(3, 50, 24)
    with torch.no_grad():
        model(x)  # evaluation forwards are ignored
    assert not pair_probe.captured
    model(x).square().sum().backward()
    assert pair_probe.captured
    grads = {n: m.weight.grad.double() for n, m in layers.items()}
    for name, pairs in pair_probe.pairs.items():
        torch.testing.assert_close(_explicit(pairs), grads[name], rtol=1e-5, atol=1e-5)
    pair_probe.remove()

    # The sketch: E|G omega|^2 = |G|_F^2; average many independent sketches to test it.
    estimates = {n: [] for n in layers}
    for seed in range(60):
        probe = GradientProbe(layers, sketch=torch.Generator().manual_seed(seed))
        model(x).square().sum().backward()
        for n, value in probe.squared_norms().items():
            estimates[n].append(value)
        probe.remove()
    for name, values in estimates.items():
        truth = float(grads[name].square().sum())
        assert sum(values) / len(values) == pytest.approx(truth, rel=0.15)
    # Removed probes capture nothing.
    model(x).sum().backward()
    assert probe.sketches == {}


class _Blocks(nn.Module):
    """Four blocks of two linears, a stand-in for a transformer's numbered layers."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            for _ in range(4)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for block in self.layers:
            x = x + block(x)
        return self.head(x).squeeze(-1)


def _train(config: xf.XGBLoRAConfig, steps: int, attach: bool = True):
    torch.manual_seed(0)
    model = _Blocks()
    booster = xf.Booster(model, config)
    optimizer = torch.optim.SGD(booster.param_groups(), lr=0.05)
    if attach:
        booster.attach(optimizer)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=g), torch.randn(32, generator=g)) for _ in range(steps)]
    for x, t in data:
        loss = (model(x) - t).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
    return booster


def test_gradient_init_points_a_along_the_top_singular_vector_and_sets_exact_grads():
    cfg = xf.XGBLoRAConfig(
        target_modules=["0", "2"], kappa=3, kappa_growth=1.0, layers_per_round=2,
        booster_init="gradient", power_iters=60, rounds=2, seed=5,
        weight_decay=0.0,  # SGD's decay would move a off the norm and gradients checked below
    )  # fmt: skip
    torch.manual_seed(0)
    model = _Blocks()
    booster = xf.Booster(model, cfg)
    optimizer = torch.optim.SGD(booster.param_groups(), lr=0.05)
    booster.attach(optimizer)
    active = list(booster.active)
    before = {n: booster.layers[n].lora_a.detach().clone() for n in active}
    # Capture the explicit weight gradient with a plain hook-free copy of the same step.
    x, t = torch.randn(32, 16), torch.randn(32)
    inputs, grads_out = {}, {}

    def record(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            output.register_hook(lambda dy: grads_out.__setitem__(name, dy.detach()))

        return hook

    handles = [booster.layers[n].register_forward_hook(record(n)) for n in active]
    (model(x) - t).square().mean().backward()
    for h in handles:
        h.remove()
    optimizer.step()  # the pre-step hook re-points a and rewrites the booster gradients
    for n in active:
        layer = booster.layers[n]
        G = grads_out[n].double().reshape(-1, 16).t() @ inputs[n].double().reshape(-1, 16)
        _, S, Vh = torch.linalg.svd(G)
        a = layer.lora_a.detach().double()
        # Same norm as the random draw, along +-v1, sign agreeing with the random draw.
        assert a.norm() == pytest.approx(float(before[n].norm()), rel=1e-5)
        assert float(a @ before[n].double()) > 0
        assert abs(float(a @ Vh[0])) / float(a.norm()) == pytest.approx(1.0, abs=1e-4)
        # SGD with lr 0.05 applied db = s G a exactly (b was 0, so da = 0).
        expected_b = -0.05 * layer.alpha * (G @ a)
        torch.testing.assert_close(layer.lora_b.detach().double(), expected_b, rtol=1e-4, atol=1e-6)
        assert booster._round_sigma[n] == pytest.approx(float(S[0]), rel=1e-4)
    booster.step()
    # Steps after the first of a round are plain training (the probe is gone).
    assert booster._init_probe is None


def test_gradient_init_rounds_limits_the_gradient_init_to_the_first_rounds():
    common = dict(
        target_modules=["0", "2"],
        kappa=2,
        kappa_growth=1.0,
        layers_per_round=2,
        select="uniform",
        seed=3,
    )
    limited = xf.XGBLoRAConfig(booster_init="gradient", gradient_init_rounds=2, **common)
    # Two rounds: merged and re-drawn, the boosters now start round 2 from the same random
    # draw as a run that never used the gradient (same seed, same draws, same layers).
    guided, plain = _train(limited, 4), _train(xf.XGBLoRAConfig(booster_init="random", **common), 4)
    assert [h["active"] for h in guided.history] == [h["active"] for h in plain.history]
    for name, layer in guided.layers.items():
        torch.testing.assert_close(layer.lora_a, plain.layers[name].lora_a, rtol=0, atol=0)
    assert guided._init_probe is None  # round 2 sets no gradient-init probe
    # The first two rounds were gradient-initialised, the later ones were not.
    history = _train(limited, 8).history
    assert [bool(h["gradient_sigma"]) for h in history] == [True, True, False, False]
    everywhere = _train(dataclasses.replace(limited, gradient_init_rounds=None), 8).history
    assert all(h["gradient_sigma"] for h in everywhere)


def test_gradient_init_without_an_attached_optimizer_raises():
    cfg = xf.XGBLoRAConfig(
        target_modules=["0", "2"], kappa=2, kappa_growth=1.0, booster_init="gradient"
    )
    with pytest.raises(RuntimeError, match="attach"):
        _train(cfg, 1, attach=False)


def test_gradient_selection_prefers_units_with_large_gradients_and_is_reproducible():
    cfg = xf.XGBLoRAConfig(
        target_modules=["0", "2"], kappa=2, kappa_growth=1.0, layers_per_round=1,
        select="gradient", rounds=40, seed=2,
    )  # fmt: skip
    booster = _train(cfg, 80)
    scores = [h["unit_scores"] for h in booster.history]
    assert all(set(s) == set(booster.units) for s in scores)
    chosen = [h["active"][0].rsplit(".", 1)[0] for h in booster.history[1:]]
    # Units picked more often are the ones with the larger measured gradient norms.
    mean_score = {u: sum(s[u] for s in scores) / len(scores) for u in booster.units}
    by_score = sorted(booster.units, key=mean_score.get)
    counts = {u: sum(c == u for c in chosen) for u in booster.units}
    assert counts[by_score[-1]] > counts[by_score[0]]
    # Same seed, same choices.
    again = _train(cfg, 80)
    assert [h["active"] for h in again.history] == [h["active"] for h in booster.history]


def test_the_literal_recipe_runs_no_probes():
    cfg = xf.XGBLoRAConfig(
        target_modules=["0", "2"],
        kappa=2,
        kappa_growth=1.0,
        rounds=3,
        booster_init="random",
        select="uniform",
    )
    booster = _train(cfg, 6)
    assert all(h["gradient_sigma"] == {} and h["unit_scores"] == {} for h in booster.history)


def test_orthogonal_gradient_rounds_start_outside_the_merged_directions():
    """``booster_init="orthogonal-gradient"`` with rounds of one step (so a merged ``a`` is the
    round's gradient-init ``a``, unmoved: Adam's first step on a zero gradient is zero): every
    layer's merged directions are mutually orthogonal, and each round did start from the
    gradient (sigma > 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    cfg = xf.XGBLoRAConfig(
        booster_init="orthogonal-gradient", kappa=1, kappa_growth=1.0, weight_decay=0.0, seed=2
    )
    booster = xf.Booster(model, cfg)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=1e-2)
    booster.attach(optimizer)
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        x, target = torch.randn(32, 12, generator=g), torch.randn(32, 3, generator=g)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
    assert len(booster.history) == 6
    assert all(sigma > 0 for h in booster.history for sigma in h["gradient_sigma"].values())
    for name, record in booster.records.items():
        a = record.a.double()
        a = a / a.norm(dim=1, keepdim=True)
        off_diagonal = a @ a.T - torch.eye(len(a), dtype=torch.float64)
        assert len(a) == 6 and off_diagonal.abs().max() < 1e-5, name
    # A resumed layer (no live basis) rebuilds it from its record to the same bits.
    for layer in booster.layers.values():
        live = layer.merged_basis
        del layer.merged_basis
        assert live.shape[0] == 6 and torch.equal(merged_basis(layer), live)
