"""transformers Trainer + XGBLoRACallback: rounds, merges and resume inside a real Trainer."""

import json
import math

import pytest
import torch
from helpers.offline_models import LLAMA_VOCAB, tiny_llama
from transformers import Trainer, TrainingArguments

import xgblora_fast as xf
from xgblora_fast.integrations.hf import XGBLoRACallback, add_xgblora

VOCAB = LLAMA_VOCAB


def dataset(n=64, seq=12):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        ids = (torch.arange(seq) * 3 + start) % VOCAB  # a learnable pattern
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def make_trainer(tmp_path, model, booster, max_steps, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        **{"logging_steps": 1} | kw,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        callbacks=[XGBLoRACallback(booster, history_path=tmp_path / "history.json")],
    )


def test_trainer_runs_boosting_rounds_and_merges(tmp_path):
    model = tiny_llama()
    cfg = xf.XGBLoRAConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        kappa=3,
        kappa_growth=1.0,
        layers_per_round=1,
        seed=2,
    )
    booster = xf.Booster(model, cfg)
    base = {n: m.weight.detach().clone() for n, m in booster.layers.items()}
    trainer = make_trainer(tmp_path, model, booster, max_steps=9)
    trainer.train()
    history = json.loads((tmp_path / "history.json").read_text())["rounds"]
    assert [h["steps"] for h in history] == [[0, 3], [3, 6], [6, 9]]
    assert all(h["loss"] is not None for h in history)
    merged = {n for h in history for n in h["active"]}
    for name, layer in booster.layers.items():
        assert torch.equal(layer.weight, base[name]) == (name not in merged), name
        assert torch.equal(layer.lora_b, torch.zeros_like(layer.lora_b))  # all merged
    # Every round's active layers sit in one block (sample_by="block", one block per round).
    for h in history:
        assert len({n.split(".")[2] for n in h["active"]}) == 1
    # The Trainer's optimizer was reset for merged boosters: no state survives the last merge.
    optimizer = trainer.optimizer
    assert all(p not in optimizer.state for p in booster.parameters())
    ids = torch.arange(10)[None] % VOCAB
    with torch.no_grad():
        adapted = model(ids).logits
        plain = xf.eject(model)(ids).logits
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_trainer_bf16_autocast_on_fp32_or_bf16_weights(tmp_path, weight_dtype):
    """Trainer(bf16=True) on CPU: the boosted layers run under bf16 autocast, the boosters
    train in fp32, merges land in weights of their own dtype, and the result ejects."""
    model = tiny_llama().to(weight_dtype)
    cfg = xf.XGBLoRAConfig(target_modules=["q_proj", "v_proj"], kappa=2, kappa_growth=1.0)
    booster = xf.Booster(model, cfg)
    base = {n: m.weight.detach().clone() for n, m in booster.layers.items()}
    seen = []
    layer = next(iter(booster.layers.values()))
    layer.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    trainer = make_trainer(tmp_path, model, booster, max_steps=4, bf16=True)
    trainer.train()
    # The layer's input has the weights' dtype (fp32 in, cast by autocast as for nn.Linear);
    # its output the autocast dtype.
    assert seen and set(seen) == {(weight_dtype, torch.bfloat16)}
    rounds = [h for h in booster.history if h["steps"][1] > h["steps"][0]]  # + finish()'s merge
    assert [h["steps"] for h in rounds] == [[0, 2], [2, 4]]
    assert all(math.isfinite(h["loss"]) for h in rounds)
    for name, m in booster.layers.items():
        assert m.weight.dtype == weight_dtype and m.lora_a.dtype == torch.float32
        assert m.weight.isfinite().all() and not torch.equal(m.weight, base[name]), name
    ids = torch.arange(10)[None] % VOCAB
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(ids).logits
        plain = xf.eject(model)(ids).logits
    torch.testing.assert_close(plain, adapted, rtol=0, atol=0)


def test_every_round_has_a_loss_when_logging_is_rarer_than_rounds(tmp_path):
    cfg = xf.XGBLoRAConfig(target_modules=["q_proj", "v_proj"], kappa=2, kappa_growth=1.0)
    model = tiny_llama()
    booster = xf.Booster(model, cfg)
    trainer = make_trainer(tmp_path, model, booster, max_steps=6, logging_steps=50)
    assert add_xgblora(trainer, booster) is booster  # binds the callback given to the Trainer
    trainer.train()
    assert booster.optimizer is trainer.optimizer  # on_train_begin attached it
    rounds = [h for h in booster.history if h["steps"][1] > h["steps"][0]]
    assert [h["steps"] for h in rounds] == [[0, 2], [2, 4], [4, 6]]
    assert all(isinstance(h["loss"], float) and math.isfinite(h["loss"]) for h in rounds)
    # Unbound, the callback sees only the logged losses: none was logged during these rounds.
    model = tiny_llama()
    unbound = xf.Booster(model, cfg)
    make_trainer(tmp_path / "u", model, unbound, max_steps=6, logging_steps=50).train()
    assert [h["loss"] for h in unbound.history if h["steps"][1] > h["steps"][0]] == [None] * 3


@pytest.mark.slow
def test_trainer_resume_restores_the_booster(tmp_path):
    cfg = xf.XGBLoRAConfig(
        target_modules=["q_proj", "v_proj"], kappa=2, kappa_growth=1.0, layers_per_round=1
    )
    straight_model = tiny_llama()
    straight = xf.Booster(straight_model, cfg)
    make_trainer(tmp_path / "a", straight_model, straight, max_steps=8).train()

    model = tiny_llama()
    booster = xf.Booster(model, cfg)
    make_trainer(tmp_path / "b", model, booster, max_steps=8, save_steps=5).train()
    resumed_model = tiny_llama()
    resumed = xf.Booster(resumed_model, cfg)
    trainer = make_trainer(tmp_path / "b", resumed_model, resumed, max_steps=8)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-5"))
    assert resumed.global_step == 8
    assert [h["active"] for h in resumed.history] == [h["active"] for h in straight.history]
    for key, value in straight_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=1e-6)
