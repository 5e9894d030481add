"""transformers ``Trainer`` integration: ``XGBLoRACallback`` drives a ``Booster``.

    booster = xf.Booster(model, xf.XGBLoRAConfig(kappa=10, kappa_growth=1.5))
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[XGBLoRACallback(booster)])
    trainer.train()          # rounds, merges and optimizer resets happen in the callback
    xf.eject(model).save_pretrained(out)

The Trainer builds its optimizer from every parameter with ``requires_grad``: all boosters are
in it (inactive ones simply get no gradient), so the callback only needs the optimizer for state
resets and re-warm-up. Under DDP the Trainer must use ``ddp_find_unused_parameters=True``
(inactive boosters are not in the graph). The booster's state is written next to every Trainer
checkpoint (``xgblora_booster.*``) and restored by ``on_train_begin`` when the Trainer resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from xgblora_fast.boosting import Booster
from xgblora_fast.checkpoint import load_structure, save_structure

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
        self._losses: list[float] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.booster.attach(optimizer)
        resume = kwargs.get("resume_from_checkpoint") or _resume_dir(args, state)
        if resume is not None and (Path(resume) / f"{STATE_NAME}.json").exists():
            self.booster.load_state_dict(load_structure(Path(resume), STATE_NAME))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._losses.append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs):
        # Losses logged since the last step (the Trainer logs after on_step_end, so a logged
        # loss lands in the round of the step that follows it).
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        self._losses.clear()
        self.booster.step(loss)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_structure(folder, STATE_NAME, self.booster.state_dict())

    def on_train_end(self, args, state, control, **kwargs):
        self.booster.finish()
        if self.history_path is not None:
            self.booster.save_history(str(self.history_path))


def _resume_dir(args, state) -> str | None:
    """The checkpoint folder the Trainer resumed from, if it resumed (global_step > 0)."""
    if state.global_step == 0:
        return None
    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    return str(folder) if folder.is_dir() else None
