"""transformers ``Trainer`` (and TRL ``SFTTrainer``) integration: ``add_xgblora``.

One call between building the Trainer and ``train()``::

    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=ds)
    booster = add_xgblora(trainer, xf.XGBLoRAConfig(kappa=10))  # injects boosters, adds callback
    trainer.train()          # rounds, merges and optimizer resets happen in the callback
    xf.eject(trainer.model).save_pretrained("out/merged")

or, with a ``Booster`` built on the model first, ``callbacks=[XGBLoRACallback(booster)]``.

The Trainer builds its optimizer from every parameter with ``requires_grad``: all boosters are
in it (inactive ones simply get no gradient). The callback attaches the Trainer's optimizer in
``on_train_begin`` (state resets, re-warm-up, ``booster_init="gradient"``'s step pre-hook), so
rounds count the optimizer steps that ran: with ``gradient_accumulation_steps > 1`` a round of
``kappa`` steps spans ``kappa`` optimizer steps, and a step that a ``GradScaler`` skipped (fp16)
is not counted. Under DDP with ``layers_per_round < 1`` the Trainer must use
``ddp_find_unused_parameters=True`` (inactive boosters are not in the graph). The booster's
state is written next to every Trainer checkpoint (``xgblora_booster.*``) and restored by
``on_train_begin`` when the Trainer resumes.

Round losses (the history's ``loss``): a callback bound to its Trainer (``add_xgblora`` binds
it; or ``callback.bind(trainer)``) records every optimizer step's training loss, the value the
Trainer adds to its logged loss (this rank's, summed over the step's micro-batches), by
wrapping ``trainer.training_step``. An unbound callback only sees the logged losses, so a round
shorter than ``logging_steps`` gets ``loss=None``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from xgblora_fast.boosting.booster import Booster
from xgblora_fast.boosting.checkpoint import load_structure, save_structure
from xgblora_fast.boosting.config import XGBLoRAConfig

STATE_NAME = "xgblora_booster"


class XGBLoRACallback(TrainerCallback):
    """Calls ``booster.step()`` after every optimizer step of a transformers ``Trainer``.

    Args:
        booster: the run's ``Booster``.
        history_path: where to write the per-round history JSON at the end (optional).
    """

    def __init__(self, booster: Booster, history_path: str | os.PathLike | None = None) -> None:
        self.booster = booster
        self.history_path = history_path
        self._logged: list[float] = []
        self._step_losses: list[torch.Tensor] = []
        self._bound = False

    def bind(self, trainer: Any) -> XGBLoRACallback:
        """Record each micro-batch's loss as ``trainer`` computes it (wraps its
        ``training_step``), so that every round's history has a loss whatever
        ``logging_steps`` is. ``add_xgblora`` calls it."""
        if self._bound:
            return self
        original = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original(*args, **kwargs)
            if isinstance(loss, torch.Tensor):
                self._step_losses.append(loss.detach())
            return loss

        trainer.training_step = training_step
        self._bound = True
        return self

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.booster.attach(optimizer)
        self._step_losses.clear()
        self._logged.clear()
        resume = kwargs.get("resume_from_checkpoint") or _resume_dir(args, state)
        if resume is not None and (Path(resume) / f"{STATE_NAME}.json").exists():
            self.booster.load_state_dict(load_structure(Path(resume), STATE_NAME))
        booster = self.booster
        if (
            args.world_size > 1
            and booster.units_per_round < len(booster.units)
            and not args.ddp_find_unused_parameters
        ):
            warnings.warn(
                "layers_per_round < 1 under DDP leaves the inactive boosters out of the graph: "
                "set ddp_find_unused_parameters=True in the TrainingArguments",
                stacklevel=2,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._logged.append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs):
        # Called once per optimizer step, also when accelerate's GradScaler skipped it: the
        # booster counts only the optimizer steps that ran (its step post-hook).
        if self._bound:
            losses = self._step_losses
            loss = float(torch.stack(losses).float().sum()) if losses else None
            losses.clear()
        else:
            # Losses logged since the last step (the Trainer logs after on_step_end, so a logged
            # loss lands in the round of the step that follows it).
            loss = sum(self._logged) / len(self._logged) if self._logged else None
            self._logged.clear()
        self.booster.step(loss)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_structure(folder, STATE_NAME, self.booster.state_dict())

    def on_train_end(self, args, state, control, **kwargs):
        self.booster.finish()
        if self.history_path is not None:
            self.booster.save_history(str(self.history_path))


def add_xgblora(
    trainer: Any,
    booster: Booster | XGBLoRAConfig | None = None,
    history_path: str | os.PathLike | None = None,
) -> Booster:
    """Boost ``trainer`` (a transformers ``Trainer`` or a subclass: TRL's ``SFTTrainer``).

    Call it after building the Trainer and before ``train()``. ``booster``: a ``Booster`` on
    ``trainer.model``, or an ``XGBLoRAConfig`` (None: the defaults) to build one, injecting the
    boosters into ``trainer.model`` (base weights frozen). Adds an ``XGBLoRACallback`` bound to
    the Trainer (or binds the one already there) and returns the booster.
    """
    model = trainer.model
    if not isinstance(booster, Booster):
        booster = Booster(model, booster)
    elif booster.model is not model:
        raise ValueError("the booster was built on another model than trainer.model")
    if trainer.optimizer is not None:
        # A Trainer given its own optimizer: the boosters must be in it.
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        if any(id(p) not in held for p in booster.parameters()):
            raise ValueError("trainer.optimizer does not hold the boosters' parameters")
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, XGBLoRACallback) and callback.booster is booster:
            if history_path is not None:
                callback.history_path = history_path
            callback.bind(trainer)
            return booster
    trainer.add_callback(XGBLoRACallback(booster, history_path).bind(trainer))
    return booster


def _resume_dir(args, state) -> str | None:
    """The checkpoint folder the Trainer resumed from, if it resumed (global_step > 0)."""
    if state.global_step == 0:
        return None
    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    return str(folder) if folder.is_dir() else None
