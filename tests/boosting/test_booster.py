"""Booster: rounds, sampling, merges, optimizer resets, re-warm-up, history."""

import copy

import pytest
import torch
import torch.nn as nn

import xgblora_fast as xf
from xgblora_fast.boosting.booster import group_units

WIDTH = 16


def mlp(depth=4, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, WIDTH, generator=g)
    return x.to(dtype), torch.sin(3 * x).to(dtype)


def train(model, booster, optimizer, steps, start=0, scheduler=None):
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, next(model.parameters()).dtype)
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        booster.step(loss.item())
        losses.append(loss.item())
    return losses


def make_run(config, seed=0, dtype=torch.float32, lr=1e-2):
    model = mlp(seed=seed, dtype=dtype)
    booster = xf.Booster(model, config)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=lr)
    booster.attach(optimizer)
    return model, booster, optimizer


def test_config_validation():
    with pytest.raises(ValueError, match="kappa"):
        xf.XGBLoRAConfig(kappa=0)
    with pytest.raises(ValueError, match="fraction"):
        xf.XGBLoRAConfig(layers_per_round=1.5)
    with pytest.raises(ValueError, match="count"):
        xf.XGBLoRAConfig(layers_per_round=0)
    with pytest.raises(ValueError, match="rounding"):
        xf.XGBLoRAConfig(rounding="up")
    with pytest.raises(ValueError, match="optimizer_reset"):
        xf.XGBLoRAConfig(optimizer_reset="half")
    with pytest.raises(ValueError, match="not both"):
        xf.XGBLoRAConfig(rounds=3, total_steps=30)
    with pytest.raises(ValueError, match="gradient_init_rounds must be >= 1"):
        xf.XGBLoRAConfig(booster_init="gradient", gradient_init_rounds=0)
    with pytest.raises(ValueError, match="needs booster_init='gradient'"):
        xf.XGBLoRAConfig(booster_init="random", gradient_init_rounds=5)
    for keep in (-0.1, 1.0):
        with pytest.raises(ValueError, match="booster_keep must be in"):
            xf.XGBLoRAConfig(booster_init="carry", booster_keep=keep)
    with pytest.raises(ValueError, match="booster_keep needs booster_init in"):
        xf.XGBLoRAConfig(booster_init="random", booster_keep=0.5)
    with pytest.raises(ValueError, match="every unit in every round"):
        make_run(xf.XGBLoRAConfig(booster_init="carry", booster_keep=0.5, layers_per_round=2))
    for growth in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kappa_growth"):
            xf.XGBLoRAConfig(kappa_growth=growth)
    cfg = xf.XGBLoRAConfig(rounds=3, kappa=7, kappa_growth=1.0, layers_per_round=2)
    assert cfg.planned_steps == 21
    assert xf.XGBLoRAConfig(rounds=4, kappa=2, kappa_growth=1.5).planned_steps == 2 + 3 + 4 + 7
    assert xf.XGBLoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_units_group_modules_by_transformer_block():
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.mlp.up_proj",
        "score",
    ]
    by_block = group_units(names, "block")
    assert by_block == {
        "model.layers.0": names[:2],
        "model.layers.1": [names[2]],
        "model.layers.11": [names[3]],
        "score": ["score"],
    }
    assert group_units(names, "module") == {n: [n] for n in names}


def test_rounds_merge_active_layers_only_and_reset_everything():
    cfg = xf.XGBLoRAConfig(
        kappa=3, kappa_growth=1.0, layers_per_round=2, rounding="nearest", seed=1
    )
    model, booster, optimizer = make_run(cfg)
    params_before = [id(p) for p in booster.parameters()]
    weights0 = {n: m.weight.detach().clone() for n, m in booster.layers.items()}
    active = list(booster.active)
    assert len(active) == 2
    train(model, booster, optimizer, 2)
    for name, layer in booster.layers.items():
        if name in active:
            assert layer.lora_b.abs().sum() > 0  # learning
            assert len(optimizer.state[layer.lora_a]) > 0
        else:
            assert layer.lora_a.grad is None and layer.lora_b.grad is None
            assert layer.lora_a not in optimizer.state
    # Third step ends round 0: merge the active boosters, re-init, drop their optimizer state.
    x, y = batch(2)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    learned = {n: booster.layers[n].merged_weight() for n in active}
    assert booster.step() is True
    for name, layer in booster.layers.items():
        if name in active:
            assert torch.equal(layer.weight, learned[name])
            assert not torch.equal(layer.weight, weights0[name])
            assert torch.equal(layer.lora_b, torch.zeros_like(layer.lora_b))
            assert layer.lora_a not in optimizer.state and layer.lora_b not in optimizer.state
        else:
            assert torch.equal(layer.weight, weights0[name])
    assert [id(p) for p in booster.parameters()] == params_before
    assert booster.round == 1 and len(booster.history) == 1
    # The next step starts Adam afresh for a re-activated booster: step count 1.
    train(model, booster, optimizer, 1, start=3)
    for name in booster.active:
        assert optimizer.state[booster.layers[name].lora_b]["step"].item() == 1.0


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("reset", ["momentum", "none"])
def test_optimizer_reset_keeps_what_it_says(reset, optimizer_class):
    cfg = xf.XGBLoRAConfig(
        kappa=2, kappa_growth=1.0, layers_per_round=4, optimizer_reset=reset, seed=2
    )
    model = mlp()
    booster = xf.Booster(model, cfg)
    kw = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    optimizer = optimizer_class(booster.param_groups(), lr=1e-2, **kw)
    booster.attach(optimizer)
    train(model, booster, optimizer, 1)
    x, y = batch(1)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    params = booster.parameters()
    before = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    assert booster.step() is True  # the merge
    for p, old in zip(params, before, strict=True):
        state = optimizer.state[p]
        assert state.keys() == old.keys() and state  # nothing dropped
        for key, value in state.items():
            if reset == "momentum" and key in ("exp_avg", "momentum_buffer"):
                assert torch.count_nonzero(value) == 0 and torch.count_nonzero(old[key]) > 0
            else:  # second moment, step count (or everything) as the optimizer left them
                assert torch.equal(value, old[key]), key


def test_carry_keeps_each_trained_a_across_merges_and_draws_round_0_like_random():
    common = dict(kappa=2, kappa_growth=1.0, layers_per_round=2, seed=4)
    _, carry, carry_opt = make_run(xf.XGBLoRAConfig(booster_init="carry", **common))
    _, fresh, _ = make_run(xf.XGBLoRAConfig(booster_init="random", **common))
    for name in carry.layers:  # round 0: the same seeded draw
        assert torch.equal(carry.layers[name].lora_a, fresh.layers[name].lora_a)
    model = carry.model
    for round_index in range(3):
        active = list(carry.active)
        train(model, carry, carry_opt, 1, start=2 * round_index)
        x, y = batch(2 * round_index + 1)
        nn.functional.mse_loss(model(x), y).backward()
        carry_opt.step()
        carry_opt.zero_grad()
        trained = {n: carry.layers[n].lora_a.detach().clone() for n in carry.layers}
        merged = {n: carry.layers[n].merged_weight() for n in active}
        assert carry.step() is True
        for name, layer in carry.layers.items():
            assert torch.equal(layer.lora_a, trained[name])  # kept, active or not
            assert torch.count_nonzero(layer.lora_b) == 0
            if name in active:
                assert torch.equal(layer.weight, merged[name])
                assert layer.lora_a not in carry_opt.state  # Adam restarts as with "random"
    assert carry.round == 3


@pytest.mark.parametrize("init", ["carry", "redraw"])
def test_booster_keep_merges_part_keeps_the_function_and_finish_merges_the_rest(init):
    """carry: W += (1 - beta) s b a^T, b <- beta b. redraw: a fresh a' of the same norm,
    W += s b (a - beta a')^T. Either way the output is unchanged and the records add up to W."""
    keep = 0.25
    cfg = xf.XGBLoRAConfig(
        kappa=2, kappa_growth=1.0, booster_init=init, booster_keep=keep, seed=4, alpha=1.5
    )
    model, booster, optimizer = make_run(cfg)
    start = {n: m.weight.detach().clone() for n, m in booster.layers.items()}
    x, _ = batch(99)

    def snapshot():
        with torch.no_grad():
            y = model(x)
        parts = {
            n: [t.detach().clone() for t in (m.weight, m.lora_a, m.lora_b)]
            for n, m in booster.layers.items()
        }
        return y, parts

    for round_index in range(3):
        train(model, booster, optimizer, 1, start=2 * round_index)
        xb, yb = batch(2 * round_index + 1)
        nn.functional.mse_loss(model(xb), yb).backward()
        optimizer.step()
        optimizer.zero_grad()
        y_before, before = snapshot()
        assert booster.step() is True
        with torch.no_grad():
            torch.testing.assert_close(model(x), y_before, rtol=1e-5, atol=1e-6)
        for name, layer in booster.layers.items():
            w, a, b = before[name]
            assert torch.count_nonzero(b) == WIDTH  # the round trained every booster
            torch.testing.assert_close(layer.lora_b, keep * b, rtol=0, atol=0)
            a_next = layer.lora_a.detach().double()
            if init == "carry":
                assert torch.equal(layer.lora_a, a)
                merged = w.double() + (1 - keep) * 1.5 * torch.outer(b.double(), a.double())
            else:
                assert torch.dist(a_next, a.double()) > 0.1 * a.norm()  # a new direction
                torch.testing.assert_close(a_next.norm(), a.double().norm())
                merged = w.double() + 1.5 * torch.outer(b.double(), a.double() - keep * a_next)
            torch.testing.assert_close(layer.weight.double(), merged, rtol=1e-6, atol=1e-7)
            step = 1 - keep if init == "carry" else 1.0
            assert booster.records[name].steps[-1] == pytest.approx(step)

    # A round just ended, so nothing is unfinished, yet finish() merges what the merges kept.
    y_before, _ = snapshot()
    booster.finish()
    booster.finish()  # nothing left: no extra merge
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_before, rtol=1e-5, atol=1e-6)
    for name, layer in booster.layers.items():
        assert torch.count_nonzero(layer.lora_b) == 0
        record = booster.records[name]
        assert record.steps == [pytest.approx(1 - keep if init == "carry" else 1.0)] * 3 + [1.0]
        up, down = record.factors()
        torch.testing.assert_close(layer.weight, start[name] + up @ down, rtol=1e-5, atol=1e-6)


def test_booster_keep_defaults_to_0_9_only_where_it_applies():
    assert xf.XGBLoRAConfig().booster_init == "carry" and xf.XGBLoRAConfig().booster_keep is None
    common = dict(kappa=2, kappa_growth=1.0, seed=3)
    resolved = {
        "defaults (carry, every unit)": (dict(), 0.9),
        "a subset of the units": (dict(layers_per_round=2), 0.0),
        "random restarts": (dict(booster_init="random"), 0.0),
        "gradient restarts": (dict(booster_init="gradient"), 0.0),
        "explicit 0": (dict(booster_keep=0.0), 0.0),
        "explicit 0.5": (dict(booster_keep=0.5), 0.5),
    }
    for case, (options, keep) in resolved.items():
        _, booster, _ = make_run(xf.XGBLoRAConfig(**common, **options))
        assert booster.booster_keep == keep, case
        assert booster.config.booster_keep == options.get("booster_keep"), case
    # The defaults' merge: b <- 0.9 b, the rest (0.1 s b a^T) into W.
    model, booster, optimizer = make_run(xf.XGBLoRAConfig(**common))
    train(model, booster, optimizer, 1)
    x, y = batch(1)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    before = {
        n: (m.weight.detach().clone(), m.lora_b.detach().clone()) for n, m in booster.layers.items()
    }
    assert booster.step() is True
    for name, layer in booster.layers.items():
        w, b = before[name]
        assert torch.count_nonzero(b) == WIDTH
        torch.testing.assert_close(layer.lora_b, 0.9 * b, rtol=0, atol=0)
        merged = w.double() + 0.1 * torch.outer(b.double(), layer.lora_a.double())
        torch.testing.assert_close(layer.weight.double(), merged, rtol=1e-6, atol=1e-7)


def test_history_records_what_reviewers_asked_for():
    cfg = xf.XGBLoRAConfig(
        kappa=2, kappa_growth=1.0, layers_per_round=0.5, seed=3, rounding="nearest"
    )
    model, booster, optimizer = make_run(cfg)
    losses = train(model, booster, optimizer, 8)
    hist = booster.history
    assert [h["round"] for h in hist] == [0, 1, 2, 3]
    assert [h["steps"] for h in hist] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    assert hist[1]["loss"] == pytest.approx(sum(losses[2:4]) / 2)
    cumulative, touched = 0, set()
    for h in hist:
        assert len(h["active"]) == 2  # 0.5 of 4 units
        trainable = sum(2 * WIDTH for _ in h["active"])
        cumulative += trainable
        touched |= set(h["active"])
        assert h["trainable_params"] == trainable
        assert h["cumulative_trainable_params"] == cumulative
        assert h["weights_touched"] == len(touched) * WIDTH * WIDTH
        for name in h["active"]:
            assert h["update_norm"][name] > 0
            assert 0 < h["relative_update"][name] < 1


def test_rounds_grow_by_kappa_growth_and_probe_each_round_at_its_last_step():
    cfg = xf.XGBLoRAConfig(kappa=2, kappa_growth=1.5, layers_per_round=2, select="gradient")
    model, booster, optimizer = make_run(cfg)
    armed = []
    for step in range(16):
        armed.append(booster._norm_probe is not None)
        train(model, booster, optimizer, 1, start=step)
    lengths = [end - start for start, end in (h["steps"] for h in booster.history)]
    assert lengths == [2, 3, 4, 7]  # round(2 * 1.5**k)
    # The selection sketch is taken in the last step of every round, however long it is.
    assert [i for i, on in enumerate(armed) if on] == [1, 4, 8, 15]
    assert all(h["unit_scores"] for h in booster.history)
    # Far into a run the length stays an int (no float overflow); 1.0 keeps every round kappa.
    assert cfg.round_length(10**6) >= 2**62
    assert xf.XGBLoRAConfig(kappa=7, kappa_growth=1.0).round_length(10**6) == 7


def test_sampling_is_seeded():
    def active_sets(seed):
        cfg = xf.XGBLoRAConfig(kappa=1, kappa_growth=1.0, layers_per_round=2, seed=seed)
        model, booster, optimizer = make_run(cfg)
        train(model, booster, optimizer, 6)
        return [tuple(h["active"]) for h in booster.history]

    assert active_sets(5) == active_sets(5)
    assert active_sets(5) != active_sets(6)


def test_rewarm_ramps_booster_lr_after_each_merge_under_a_scheduler():
    cfg = xf.XGBLoRAConfig(kappa=4, kappa_growth=1.0, layers_per_round=1, rewarm_steps=4)
    model, booster, optimizer = make_run(cfg, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step // 4))
    lrs = []
    for step in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        train(model, booster, optimizer, 1, start=step, scheduler=scheduler)
    envelope = [0.1] * 4 + [0.05] * 4
    ramp = [1.0, 1.0, 1.0, 1.0, 0.25, 0.5, 0.75, 1.0]  # the run starts unramped; merge at 4
    assert lrs == pytest.approx([e * r for e, r in zip(envelope, ramp, strict=True)])


def test_rewarm_without_scheduler_does_not_compound():
    cfg = xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0, layers_per_round=1, rewarm_steps=2)
    model, booster, optimizer = make_run(cfg, lr=0.1)
    lrs = []
    for step in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        train(model, booster, optimizer, 1, start=step)
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.1, 0.05, 0.1])


def test_finish_merges_an_unfinished_round():
    cfg = xf.XGBLoRAConfig(kappa=10, kappa_growth=1.0, layers_per_round=4, rounding="nearest")
    model, booster, optimizer = make_run(cfg)
    train(model, booster, optimizer, 3)
    x, _ = batch(99)
    with torch.no_grad():
        before = model(x)
    booster.finish()
    assert len(booster.history) == 1 and booster.history[0]["steps"] == [0, 3]
    plain = xf.eject(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), before, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_a_refused_merge_leaves_weights_and_records_as_they_were():
    cfg = xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0, layers_per_round=4, rounding="nearest")
    model, booster, optimizer = make_run(cfg, dtype=torch.float16)
    train(model, booster, optimizer, 3)  # round 0 merged and recorded, round 1 under way
    name, layer = next(iter(booster.layers.items()))
    with torch.no_grad():
        layer.weight[0, 0] = 6e4  # near fp16's largest finite (65504)
        layer.lora_a.fill_(1.0)
        layer.lora_b.fill_(1e4)  # s b a^T pushes row 0 past it
    before = {n: m.weight.clone() for n, m in booster.layers.items()}
    with pytest.raises(ValueError, match="overflow"):
        booster.finish()
    assert booster.records[name].rounds == [0]
    assert torch.equal(layer.weight, before[name])
