"""TRL ``SFTTrainer`` + XGBLoRA: the documented recipe (docs/trainers.md) end to end on a tiny
Llama with TRL's defaults (bf16 autocast on CPU, gradient checkpointing, logging every 10
steps), packing on and off, and under ``accelerate launch`` on 2 CPU processes."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.offline_models import tiny_llama
from helpers.process_group import free_port
from helpers.sft_recipe import sft_config, text_dataset, tiny_tokenizer
from trl import SFTTrainer

import xgblora_fast as xf
from xgblora_fast.integrations.hf import XGBLoRACallback, add_xgblora

TESTS = Path(__file__).resolve().parents[1]
KAPPA = 2


def _trainer(tmp_path, model, max_steps=6, **overrides):
    return SFTTrainer(
        model=model,
        args=sft_config(tmp_path / "out", max_steps, **overrides),
        train_dataset=text_dataset(),
        processing_class=tiny_tokenizer(),
    )


def _trained_rounds(booster):
    """The history's rounds that held steps (``finish`` may add a merge-only one)."""
    return [h for h in booster.history if h["steps"][1] > h["steps"][0]]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_recipe_runs_gradient_init_rounds_under_trl_defaults(tmp_path, packing):
    model = tiny_llama()
    trainer = _trainer(tmp_path, model, packing=packing)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The recipe: one call between building the trainer and train().
    booster = add_xgblora(
        trainer,
        xf.XGBLoRAConfig(kappa=KAPPA, kappa_growth=1.0, booster_init="gradient"),
    )
    first_a = {n: layer.lora_a.detach().clone() for n, layer in booster.layers.items()}
    autocast = []
    next(iter(booster.layers.values())).register_forward_hook(
        lambda *_: autocast.append(torch.is_autocast_enabled("cpu"))
    )
    trainer.train()
    assert autocast and all(autocast)  # every training forward ran under bf16 autocast

    args = trainer.args
    assert args.bf16 and args.gradient_checkpointing and args.packing == packing
    assert model.is_activation_checkpointing
    assert args.logging_steps > KAPPA  # TRL logs every 10 steps: rounds are shorter
    # The booster drove the optimizer the Trainer created (its step hooks sit on the inner one).
    assert booster.optimizer is trainer.optimizer
    rounds = _trained_rounds(booster)
    assert [h["steps"] for h in rounds] == [[0, 2], [2, 4], [4, 6]]
    for h in rounds:
        # The step pre-hook fired in each round's first step: every active layer's a was
        # re-pointed along its gradient's top singular vector.
        assert set(h["gradient_sigma"]) == set(h["active"])
        assert all(s > 0 and math.isfinite(s) for s in h["gradient_sigma"].values())
        # A loss per round although the Trainer logged none (issue point 4).
        assert isinstance(h["loss"], float) and math.isfinite(h["loss"])
    assert any(not torch.equal(layer.lora_a, first_a[n]) for n, layer in booster.layers.items())
    # Everything was merged into W at the end; only boosted weights changed.
    merged = {f"{n}.weight" for h in rounds for n in h["active"]}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(p, base[name]) == (name not in merged), name
    for layer in booster.layers.values():
        assert not layer.lora_b.any()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        adapted = model(ids).logits
        plain = xf.eject(model)(ids).logits
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)


def test_sft_trainer_takes_the_callback_form_too(tmp_path):
    """``callbacks=[XGBLoRACallback(booster)]`` with a booster built on the model first;
    ``add_xgblora`` on such a trainer binds that callback instead of adding a second one."""
    model = tiny_llama()
    booster = xf.Booster(model, xf.XGBLoRAConfig(kappa=KAPPA, kappa_growth=1.0))
    callback = XGBLoRACallback(booster, history_path=tmp_path / "history.json")
    trainer = SFTTrainer(
        model=model,
        args=sft_config(tmp_path / "out", 4),
        train_dataset=text_dataset(),
        processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )
    assert add_xgblora(trainer, booster) is booster
    ours = [c for c in trainer.callback_handler.callbacks if isinstance(c, XGBLoRACallback)]
    assert ours == [callback]
    trainer.train()
    rounds = _trained_rounds(booster)
    assert [h["steps"] for h in rounds] == [[0, 2], [2, 4]]
    assert all(math.isfinite(h["loss"]) for h in rounds)
    assert (tmp_path / "history.json").exists()
    with pytest.raises(ValueError, match="another model"):
        add_xgblora(_trainer(tmp_path / "other", tiny_llama()), booster)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_keeps_replicas_bit_identical(tmp_path):
    """The recipe under ``accelerate launch`` (2 processes, gloo): the ranks see different data
    and finish with bit-identical weights (``verify_replicas`` in the script raises if not)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(TESTS / "helpers" / "sft_recipe.py"), str(tmp_path),
    ]  # fmt: skip
    # The script imports the test helpers as the tests do: tests/ on the path.
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert torch.equal(rank0["checksum"], rank1["checksum"])
    assert rank0["steps"][:3] == [[0, 2], [2, 4], [4, 6]]
    # booster_init="gradient" under DDP: the ranks agreed on the all-reduced gradient.
    assert all(rank0["sigmas"][:3]) and rank0["sigmas"] == rank1["sigmas"]
    # Different data on each rank: the round losses differ.
    assert rank0["losses"][:3] != rank1["losses"][:3]
