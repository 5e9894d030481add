"""``MergeRecord``: every rank-1 booster merged into one layer, so the fine-tune can be exported
as a LoRA adapter (``xf.export_lora``) or taken back out of the weights (``xf.unmerge_``).

After ``T`` merges a layer holds ``W_T = W_0 + sum_t alpha_t s b_t a_t^T`` (up to the weight
dtype's rounding): a LoRA of rank ``T``. The record keeps ``a_t``, ``b_t`` (exact fp32 copies of
the booster when it was merged), ``alpha_t`` and the round index, on the CPU.

Vectors on a CUDA device are copied without waiting (``non_blocking`` into pinned buffers): a
merge costs no host synchronisation for its record. Every read of the recorded vectors (``a``,
``b``, ``factors``, ``state_dict``, ...) first waits for the copies still in flight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from xgblora_fast.nn.layer import FastRank1Linear, is_dtensor
from xgblora_fast.nn.patching import _conv1d_type


@dataclasses.dataclass
class MergeRecord:
    """The merged boosters of one layer, in merge order.

    The vectors live in two fp32 buffers that grow by doubling, not one small tensor per merge:
    thousands of small long-lived CPU allocations between the training step's large temporary
    ones fragment the heap (a 1500-step demo run at batch 8 peaked 314 MiB higher that way).

    Attributes:
        alpha: the layer's booster scale ``s``.
        in_features, out_features: the layer's sizes (the lengths of ``a`` and ``b``).
        fan_in_fan_out: the layer wraps a GPT-2 ``Conv1D`` (weight stored ``[in, out]``).
        rounding: rounding of the last recorded merge (``xf.unmerge_`` uses it again).
        rounds: round index of each merge.
        steps: the boosting step ``alpha_t`` of each merge.
    """

    alpha: float
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False
    rounding: str = "nearest"
    rounds: list[int] = dataclasses.field(default_factory=list)
    steps: list[float] = dataclasses.field(default_factory=list)
    _a: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # [capacity, in]
    _b: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # [capacity, out]
    # The CUDA event after the last copy still in flight into _a/_b (None: none).
    _pending: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._a is None:
            self._a = torch.empty(0, self.in_features, dtype=torch.float32)
            self._b = torch.empty(0, self.out_features, dtype=torch.float32)

    @classmethod
    def for_layer(cls, layer: FastRank1Linear) -> MergeRecord:
        conv1d = _conv1d_type()
        source = getattr(layer, "_source_module", None)
        fan_in_fan_out = conv1d is not None and isinstance(source, conv1d)
        return cls(layer.alpha, layer.in_features, layer.out_features, fan_in_fan_out)

    def _wait(self) -> None:
        """Wait for the copies into the buffers still in flight (no-op when none are)."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.query():
            pending.synchronize()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles hold the landed vectors, not the event (``copy.deepcopy``)."""
        self._wait()
        return dict(vars(self))

    @property
    def a(self) -> torch.Tensor:
        """``[T, in]`` fp32: the recorded ``a_t`` (a view: clone it to keep it)."""
        self._wait()
        return self._a[: len(self.rounds)]

    @property
    def b(self) -> torch.Tensor:
        """``[T, out]`` fp32: the recorded ``b_t`` (a view: clone it to keep it)."""
        self._wait()
        return self._b[: len(self.rounds)]

    def add(self, round_index: int, step: float, layer: FastRank1Linear, rounding: str) -> None:
        """Record the booster ``layer`` is about to merge with step ``alpha_t = step``."""
        self.add_vectors(round_index, step, layer.lora_a, layer.lora_b, rounding)

    @torch.no_grad()
    def add_vectors(
        self, round_index: int, step: float, a: torch.Tensor, b: torch.Tensor, rounding: str
    ) -> None:
        """Record the booster ``a [in]``, ``b [out]`` (any float dtype, kept as fp32 copies)."""
        count = len(self.rounds)
        vectors = [v.detach() for v in (a, b)]
        # FSDP2 shards the boosters by rows: the record keeps whole vectors (every rank does).
        vectors = [v.full_tensor() if is_dtensor(v) else v for v in vectors]
        cuda = any(v.is_cuda for v in vectors)
        if count == self._a.shape[0] or (cuda and not self._a.is_pinned()):
            capacity = max(16, 2 * count) if count == self._a.shape[0] else self._a.shape[0]
            self._a, self._b = (self._grown(buf, capacity, cuda) for buf in (self._a, self._b))
        for buffer, vector in zip((self._a, self._b), vectors, strict=True):
            # Into pinned memory without waiting; the event below tells readers when it landed.
            buffer[count].copy_(vector, non_blocking=vector.is_cuda)
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(next(v for v in vectors if v.is_cuda).device))
            self._pending = event
        self.rounds.append(round_index)
        self.steps.append(float(step))
        self.rounding = rounding

    def _grown(self, buffer: torch.Tensor, capacity: int, pin: bool = False) -> torch.Tensor:
        self._wait()
        grown = torch.empty(capacity, buffer.shape[1], dtype=torch.float32, pin_memory=pin)
        grown[: len(self.rounds)] = buffer[: len(self.rounds)]
        return grown

    def remove(self, index: int) -> None:
        """Forget the ``index``-th recorded merge."""
        self._wait()
        count = len(self.rounds)
        for buffer in (self._a, self._b):
            buffer[index : count - 1] = buffer[index + 1 : count].clone()
        del self.rounds[index]
        del self.steps[index]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, T], down [T, in])``, fp32, with ``up @ down`` the merged update.

        ``up[:, t] = fp32(alpha_t * s) * b_t``: the exact vector the merge kernels multiply by
        ``a_t`` (see ``ops.reference.merge_reference_``); ``down[t] = a_t``.
        """
        scales = torch.tensor([step * self.alpha for step in self.steps], dtype=torch.float32)
        return self.b.T * scales, self.a.clone()

    def successive_cosines(self, lag: int = 1) -> dict[str, torch.Tensor]:
        """How each merged piece relates to the one ``lag`` merges before it: ``[T - lag]``
        float64 each.

        ``"piece"``: the cosine between ``P_t = alpha_t s b_t a_t^T`` and ``P_{t-lag}`` as
        ``out x in`` matrices, ``<P_t, P_{t-k}>_F = alpha_t alpha_{t-k} s^2 (a_t . a_{t-k})
        (b_t . b_{t-k})``, computed from the vectors (no matrix is formed): negative when a round
        undoes an earlier one, near 0 for unrelated directions. Steepest descent with exact line
        search zig-zags with 0 at lag 1 and positive cosines at lag 2: look at both.
        ``"a"``, ``"b"``: the cosines of the input vectors and of the scaled output vectors
        ``alpha_t s b_t`` alone (each sign is arbitrary, their product's is not;
        ``piece = a * b``). Empty for ``lag`` or fewer merges.
        """
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        up, down = self.factors()
        out = {}
        for key, vectors in (("a", down.double()), ("b", up.T.double())):
            unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
            out[key] = (unit[lag:] * unit[:-lag]).sum(dim=1)
        out["piece"] = out["a"] * out["b"]
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able fields plus the stacked vectors ``a [T, in]`` and ``b [T, out]``."""
        return {
            "alpha": self.alpha,
            "fan_in_fan_out": self.fan_in_fan_out,
            "rounding": self.rounding,
            "rounds": list(self.rounds),
            "steps": list(self.steps),
            "a": self.a.clone(),
            "b": self.b.clone(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MergeRecord:
        a, b = state["a"].to(torch.float32), state["b"].to(torch.float32)
        return cls(
            alpha=float(state["alpha"]),
            in_features=a.shape[1],
            out_features=b.shape[1],
            fan_in_fan_out=bool(state["fan_in_fan_out"]),
            rounding=state["rounding"],
            rounds=[int(t) for t in state["rounds"]],
            steps=[float(s) for s in state["steps"]],
            _a=a.clone(),
            _b=b.clone(),
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
        self._wait()
        if state:
            loaded = MergeRecord.from_state(state)
        else:
            loaded = dataclasses.replace(self, rounds=[], steps=[], _a=None, _b=None, _pending=None)
        vars(self).update(vars(loaded))
