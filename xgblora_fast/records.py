"""``MergeRecord``: every rank-1 booster merged into one layer, so the fine-tune can be exported
as a LoRA adapter (``xf.export_lora``) or taken back out of the weights (``xf.unmerge_``).

After ``T`` merges a layer holds ``W_T = W_0 + sum_t alpha_t s b_t a_t^T`` (up to the weight
dtype's rounding): a LoRA of rank ``T``. The record keeps ``a_t``, ``b_t`` (exact fp32 copies of
the booster when it was merged), ``alpha_t`` and the round index, on the CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from xgblora_fast.layer import FastRank1Linear
from xgblora_fast.patching import _conv1d_type


@dataclasses.dataclass
class MergeRecord:
    """The merged boosters of one layer, in merge order.

    Attributes:
        alpha: the layer's booster scale ``s``.
        fan_in_fan_out: the layer wraps a GPT-2 ``Conv1D`` (weight stored ``[in, out]``).
        rounding: rounding of the last recorded merge (``xf.unmerge_`` uses it again).
        rounds: round index of each merge.
        steps: the boosting step ``alpha_t`` of each merge.
        a: ``[in]`` fp32 per merge; b: ``[out]`` fp32 per merge (the raw booster vectors).
    """

    alpha: float
    fan_in_fan_out: bool = False
    rounding: str = "nearest"
    rounds: list[int] = dataclasses.field(default_factory=list)
    steps: list[float] = dataclasses.field(default_factory=list)
    a: list[torch.Tensor] = dataclasses.field(default_factory=list)
    b: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @classmethod
    def for_layer(cls, layer: FastRank1Linear) -> MergeRecord:
        conv1d = _conv1d_type()
        source = getattr(layer, "_source_module", None)
        return cls(layer.alpha, conv1d is not None and isinstance(source, conv1d))

    @torch.no_grad()
    def add(self, round_index: int, step: float, layer: FastRank1Linear, rounding: str) -> None:
        """Record the booster ``layer`` is about to merge with step ``alpha_t = step``."""
        self.rounds.append(round_index)
        self.steps.append(float(step))
        self.a.append(layer.lora_a.detach().to("cpu", torch.float32, copy=True))
        self.b.append(layer.lora_b.detach().to("cpu", torch.float32, copy=True))
        self.rounding = rounding

    def remove(self, index: int) -> None:
        """Forget the ``index``-th recorded merge."""
        for values in (self.rounds, self.steps, self.a, self.b):
            del values[index]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, T], down [T, in])``, fp32, with ``up @ down`` the merged update.

        ``up[:, t] = fp32(alpha_t * s) * b_t``: the exact vector the merge kernels multiply by
        ``a_t`` (see ``ops.reference.merge_reference_``); ``down[t] = a_t``.
        """
        scales = torch.tensor([step * self.alpha for step in self.steps], dtype=torch.float32)
        return torch.stack(self.b, dim=1) * scales, torch.stack(self.a)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able fields plus the stacked vectors ``a [T, in]`` and ``b [T, out]``."""
        return {
            "alpha": self.alpha,
            "fan_in_fan_out": self.fan_in_fan_out,
            "rounding": self.rounding,
            "rounds": list(self.rounds),
            "steps": list(self.steps),
            "a": torch.stack(self.a),
            "b": torch.stack(self.b),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MergeRecord:
        return cls(
            alpha=float(state["alpha"]),
            fan_in_fan_out=bool(state["fan_in_fan_out"]),
            rounding=state["rounding"],
            rounds=[int(t) for t in state["rounds"]],
            steps=[float(s) for s in state["steps"]],
            a=[v.to(torch.float32).clone() for v in state["a"]],
            b=[v.to(torch.float32).clone() for v in state["b"]],
        )

    @staticmethod
    def check_state(state: dict[str, Any], in_features: int, out_features: int) -> None:
        """Raise ``ValueError`` unless ``state`` fits a layer of this size (nothing changes)."""
        count = len(state["rounds"])
        shapes = (tuple(state["a"].shape), tuple(state["b"].shape))
        if len(state["steps"]) != count or shapes != ((count, in_features), (count, out_features)):
            raise ValueError(
                f"merge record of {count} rounds has a, b of shapes {shapes[0]}, {shapes[1]} "
                f"and {len(state['steps'])} steps; the layer is [{out_features}, {in_features}]"
            )

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Replace the record in place (``None``: empty), so every holder sees the change."""
        if state:
            loaded = MergeRecord.from_state(state)
        else:
            loaded = dataclasses.replace(self, rounds=[], steps=[], a=[], b=[])
        vars(self).update(vars(loaded))
