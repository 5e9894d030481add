"""Rounds count optimizer steps: gradient accumulation, skipped GradScaler steps, no attach."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
from helpers.offline_models import LLAMA_VOCAB, tiny_llama
from transformers import Trainer, TrainingArguments

import xgblora_fast as xf
from xgblora_fast.integrations.hf import add_xgblora

WIDTH = 16


class Blocks(nn.Module):
    """Three residual blocks of two linear layers and a head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
            for _ in range(3)
        )
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        for block in self.layers:
            x = x + block(x)
        return self.head(x).squeeze(-1)


def batches(n, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, WIDTH, generator=g)
        out.append((x, x[:, 0].sin() + x[:, 1]))
    return out


def make(config, optimizer_class=torch.optim.AdamW, attach=True, **optimizer_kw):
    torch.manual_seed(0)
    model = Blocks()
    booster = xf.Booster(model, config)
    optimizer = optimizer_class(booster.param_groups(), lr=optimizer_kw.pop("lr", 1e-2))
    if attach:
        booster.attach(optimizer)
    return model, booster, optimizer


def config(**kw):
    return xf.XGBLoRAConfig(
        **{"target_modules": ["0", "2"], "kappa": 3, "kappa_growth": 1.0, "seed": 4} | kw
    )


def boosted_weights(booster):
    return {n: layer.weight.detach().clone() for n, layer in booster.layers.items()}


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),  # carry, every layer, booster_keep 0.9
        dict(booster_init="gradient", layers_per_round=2),  # gradient init + gradient select
    ],
    ids=["carry", "gradient"],
)
def test_plain_loop_rounds_count_optimizer_steps_not_micro_batches(cfg):
    accumulation, steps = 4, 9
    data = batches(accumulation * steps)
    runs = {}
    for per_micro_batch in (True, False):
        model, booster, optimizer = make(config(**cfg))
        for i, (x, t) in enumerate(data):
            loss = (model(x) - t).square().mean() / accumulation
            loss.backward()
            stepped = (i + 1) % accumulation == 0
            if stepped:
                optimizer.step()
                optimizer.zero_grad()
            if per_micro_batch or stepped:
                ended = booster.step(loss.item())
                assert not ended or stepped  # only an optimizer step can end a round
        booster.finish()
        runs[per_micro_batch] = booster
        rounds = [h for h in booster.history if h["steps"][1] > h["steps"][0]]
        assert [h["steps"] for h in rounds] == [[0, 3], [3, 6], [6, 9]]
        assert booster.global_step == steps
        if cfg.get("booster_init") == "gradient":
            assert all(set(h["gradient_sigma"]) == set(h["active"]) for h in rounds)
    # Both ways of calling step() train exactly the same model.
    ours, theirs = runs[True], runs[False]
    assert [h["active"] for h in ours.history] == [h["active"] for h in theirs.history]
    for name, weight in boosted_weights(ours).items():
        assert torch.equal(weight, theirs.layers[name].weight), name


def test_accumulated_micro_batches_match_one_big_batch_with_gradient_init():
    """4 micro-batches of 8 with the loss / 4 are one batch of 32: the gradient init (its probe
    accumulates the micro-batches' captures) and the rounds give the same model."""
    cfg = config(booster_init="gradient", layers_per_round=2, select="uniform")
    data = batches(4 * 6)
    model, booster, optimizer = make(cfg, torch.optim.SGD, lr=0.05)
    for i, (x, t) in enumerate(data):
        ((model(x) - t).square().mean() / 4).backward()
        if (i + 1) % 4 == 0:
            optimizer.step()
            optimizer.zero_grad()
        booster.step()
    big_model, big, big_optimizer = make(cfg, torch.optim.SGD, lr=0.05)
    for k in range(6):
        x = torch.cat([b[0] for b in data[4 * k : 4 * k + 4]])
        t = torch.cat([b[1] for b in data[4 * k : 4 * k + 4]])
        (big_model(x) - t).square().mean().backward()
        big_optimizer.step()
        big_optimizer.zero_grad()
        big.step()
    assert [h["steps"] for h in booster.history] == [h["steps"] for h in big.history]
    for h, g in zip(booster.history, big.history, strict=True):
        for name, sigma in h["gradient_sigma"].items():
            assert sigma == pytest.approx(g["gradient_sigma"][name], rel=1e-4)
    for name, weight in boosted_weights(booster).items():
        torch.testing.assert_close(weight, big.layers[name].weight, rtol=1e-4, atol=1e-5)


def test_step_skipped_by_grad_scaler_is_not_counted_and_never_merged():
    """A step the GradScaler skips (inf gradients: scaler.step does not call optimizer.step) is
    not counted, its gradient captures are dropped, and the merges that follow write only
    finite weights; the scaled gradient init equals the unscaled one."""
    cfg = config(booster_init="gradient", layers_per_round=2, kappa=2)
    data = batches(6)
    # Reference: fp32, no scaler, no skipped step.
    ref_model, ref, ref_optimizer = make(cfg, torch.optim.SGD, lr=0.05)
    for x, t in data:
        (ref_model(x) - t).square().mean().backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        ref.step()
    # The same with a GradScaler and an overflowing batch before the first step of round 0
    # and before the first step of round 1 (where the gradient-init probe is armed).
    model, booster, optimizer = make(cfg, torch.optim.SGD, lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    skipped = 0
    for i, (x, t) in enumerate(data):
        for overflow in (True, False) if i in (0, 2) else (False,):
            loss = (model(x) - t).square().mean()
            if overflow:
                loss = loss * float("inf")  # what an fp16 overflow does to the gradients
            scaler.scale(loss).backward()
            before = booster.global_step
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            assert booster.step(loss.item()) is (not overflow and i % 2 == 1)
            assert booster.global_step == before + (not overflow)
            skipped += overflow
    assert skipped == 2 and scaler.get_scale() < 65536.0  # the scaler did skip two steps
    booster.finish()
    ref.finish()
    assert [h["steps"] for h in booster.history] == [h["steps"] for h in ref.history]
    assert [h["active"] for h in booster.history] == [h["active"] for h in ref.history]
    for h, g in zip(booster.history, ref.history, strict=True):
        assert h["gradient_sigma"].keys() == g["gradient_sigma"].keys()
    # The skipped batches' inf losses went into the history, the weights stayed finite.
    assert math.isinf(booster.history[0]["loss"])
    for name, weight in boosted_weights(booster).items():
        assert weight.isfinite().all(), name
        # Same model as without a scaler: the gradient init's db was unscaled too (SGD applies
        # it as is, so a db 65536x too large would show).
        torch.testing.assert_close(weight, ref.layers[name].weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("booster_init", ["carry", "gradient"])
def test_fp16_autocast_with_grad_scaler_overflows_are_skipped_not_counted(booster_init):
    """fp16 autocast + GradScaler as people run it: a scale too large for fp16 makes the first
    backwards overflow (inf output gradients), the scaler skips those steps and lowers the scale;
    rounds count only the steps that ran, and every merge writes finite weights."""
    cfg = config(booster_init=booster_init, kappa=2)
    model, booster, optimizer = make(cfg, lr=1e-2)
    base = boosted_weights(booster)
    ran = []
    optimizer.register_step_post_hook(lambda *_: ran.append(True))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    for x, t in batches(16):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        assert out.dtype == torch.float16  # the boosted GEMMs ran in fp16
        loss = (out.float() - t).square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        booster.step(loss.item())
    booster.finish()
    assert 0 < len(ran) < 16  # some steps overflowed and were skipped, the others ran
    assert booster.global_step == len(ran)
    rounds = [h["steps"] for h in booster.history if h["steps"][1] > h["steps"][0]]
    assert rounds == [[s, min(s + 2, len(ran))] for s in range(0, len(ran), 2)]
    for name, layer in booster.layers.items():
        assert layer.weight.dtype == torch.float32 and layer.weight.isfinite().all(), name
        assert not torch.equal(layer.weight, base[name]), name  # the boosters trained, merged


def test_unattached_booster_warns_once_at_the_first_merge():
    model, booster, optimizer = make(config(kappa=1), attach=False)
    with pytest.warns(UserWarning, match="attach"):
        for x, t in batches(1):
            (model(x) - t).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            assert booster.step() is True  # unattached: every call counts a step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, t in batches(2, seed=2):
            (model(x) - t).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            booster.step()


def _token_rows(n=64, seq=12):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.arange(seq) * 3 + int(torch.randint(0, LLAMA_VOCAB, (1,), generator=g))
        rows.append({"input_ids": ids % LLAMA_VOCAB, "labels": ids % LLAMA_VOCAB})
    return rows


def test_trainer_gradient_accumulation_rounds_end_at_optimizer_steps(tmp_path):
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_token_rows())
    booster = add_xgblora(trainer, config(target_modules=["q_proj", "v_proj"], kappa=2))
    micro_batches = []
    booster.layers["model.layers.0.self_attn.q_proj"].register_forward_hook(
        lambda *_: micro_batches.append(1)
    )
    trainer.train()
    assert len(micro_batches) == 12 and trainer.state.global_step == 6
    rounds = [h for h in booster.history if h["steps"][1] > h["steps"][0]]
    assert [h["steps"] for h in rounds] == [[0, 2], [2, 4], [4, 6]]
    # Each round's loss: the mean of its optimizer steps' losses, as the Trainer logged them.
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 6
    for k, h in enumerate(rounds):
        assert h["loss"] == pytest.approx(sum(logged[2 * k : 2 * k + 2]) / 2, abs=1e-3)
