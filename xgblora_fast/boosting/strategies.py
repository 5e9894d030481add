"""What a round end merges and where the next booster starts: one strategy per ``booster_init``.

The layer knows one merge, ``merge_vectors_(v, b, t)``: ``W += t s b v^T``. A strategy decides
``v`` and ``t`` (``plan``, for every active layer before any merge, so that a refused round draws
nothing and merges nothing) and how the booster goes on afterwards (``restart_``). ``keep`` is the
fraction ``beta`` of the booster a merge leaves in place (``booster_keep``; 0 at ``finish()``).

- ``Restart`` (``"random"``, ``"gradient"``; the paper's recipe): merge everything, ``t = step``,
  ``v = a``; then a fresh seeded ``a`` and ``b = 0`` (``"gradient"`` re-aims ``a`` at the next
  round's first step).
- ``Carry`` (``"carry"``): merge ``(1 - beta)`` of the booster, ``t = step (1 - beta)``, ``v = a``;
  then ``b <- beta b`` and ``a`` kept: with ``step = 1`` the model's function is unchanged and the
  next round goes on from where this one ended.
- ``Orthogonal`` (``"orthogonal"``): as ``Restart``, with each new ``a`` drawn in the orthogonal
  complement of the directions the layer has merged, so that every round explores a new input
  subspace instead of the top directions found before (as BoostLoRA, arXiv 2604.27308, does).
  ``"orthogonal-gradient"`` restarts the same way and re-aims ``a`` at the next round's first
  step along the gradient's top singular pair within that complement.
- ``Redraw`` (``"redraw"``): as ``Carry``, but the kept booster moves to a fresh seeded ``a'``
  with the norm of ``a``, and ``W`` takes the difference: ``v = step (1 - beta) a + beta (a - a')``,
  ``t = 1``; then ``a <- a'``, ``b <- beta b``. The function is unchanged too (``step = 1``).
"""

from __future__ import annotations

import dataclasses

import torch

from xgblora_fast.nn.layer import FastRank1Linear, is_dtensor


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """One layer's merge: ``W += step * s * b direction^T``; ``next_a`` for ``Redraw``."""

    direction: torch.Tensor  # [in], the whole vector (gathered under FSDP2)
    step: float
    next_a: torch.Tensor | None = None


class Restart:
    """Merge all of the booster, then a fresh seeded ``a`` and ``b = 0``."""

    keeps_booster = False

    def plan(
        self, layer: FastRank1Linear, step: float, keep: float, generator: torch.Generator
    ) -> MergePlan:
        if keep:
            raise ValueError(f"{type(self).__name__} merges the whole booster, got keep={keep}")
        return MergePlan(layer.booster_vectors()[0], step)

    @torch.no_grad()
    def restart_(
        self, layer: FastRank1Linear, plan: MergePlan, keep: float, generator: torch.Generator
    ) -> None:
        layer.reset_(generator)


class Orthogonal(Restart):
    """As ``Restart``, with the new ``a`` drawn in the orthogonal complement of the layer's merged
    directions (the draw's norm kept). The layer keeps them orthonormalised on its device
    (``merged_basis [T, in]`` fp32, one Gram-Schmidt step per merge, no W-sized work); after a
    resume the basis is rebuilt from the merge records (hence ``record=True``). Once the merged
    directions span the input space (``T >= in``) the draw is used as it is."""

    @torch.no_grad()
    def restart_(
        self, layer: FastRank1Linear, plan: MergePlan, keep: float, generator: torch.Generator
    ) -> None:
        basis = getattr(layer, "merged_basis", None)
        if basis is None:  # a resumed run: the record's last row is this very merge
            basis = recorded_basis(layer, drop_last=True)
        layer.merged_basis = basis = with_direction(basis, plan.direction.detach().float())
        drawn = layer.draw_a(generator)
        free = orthogonal_part(drawn.float(), basis)
        norm = free.norm()
        # A draw (almost) inside the merged span leaves no complement to move to.
        if norm > 1e-3 * drawn.float().norm():
            drawn = (free * (drawn.float().norm() / norm)).to(drawn.dtype)
        layer.reset_(a=drawn)


def merged_basis(layer: FastRank1Linear) -> torch.Tensor:
    """The layer's merged directions, orthonormal rows ``[T, in]`` fp32 on its device (rebuilt
    from its merge record after a resume; ``[0, in]`` before any merge)."""
    basis = getattr(layer, "merged_basis", None)
    if basis is None:
        layer.merged_basis = basis = recorded_basis(layer)
    return basis


def recorded_basis(layer: FastRank1Linear, drop_last: bool = False) -> torch.Tensor:
    """Gram-Schmidt over the ``a`` of the layer's recorded merges, in merge order (the steps a
    live run took, so the same bits), without the last one if ``drop_last``."""
    basis = torch.zeros(0, layer.in_features, device=layer.lora_a.device)
    record = getattr(layer, "merge_record", None)
    rows = len(record.rounds) - drop_last if record is not None else 0
    for direction in record.a[:rows] if rows > 0 else ():
        basis = with_direction(basis, direction.to(basis.device))
    return basis


def orthogonal_part(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``v`` minus its projection on the rows of ``basis`` (orthonormal), twice: Gram-Schmidt
    projected once loses orthogonality to rounding when ``v`` is nearly inside the span."""
    for _ in range(2):
        v = v - basis.T @ (basis @ v)
    return v


def with_direction(basis: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``basis [T, in]`` with ``direction``'s orthonormalised new part as a row (unchanged when
    ``direction`` is already inside the span)."""
    free = orthogonal_part(direction.float(), basis)
    norm = free.norm()
    if not norm > 1e-6 * direction.float().norm():
        return basis
    return torch.cat([basis, (free / norm)[None]])


class Carry:
    """Merge ``(1 - keep)`` of the booster; ``a`` kept, ``b <- keep * b``."""

    keeps_booster = True

    def plan(
        self, layer: FastRank1Linear, step: float, keep: float, generator: torch.Generator
    ) -> MergePlan:
        check_keep(keep)
        return MergePlan(layer.booster_vectors()[0], step * (1.0 - keep))

    @torch.no_grad()
    def restart_(
        self, layer: FastRank1Linear, plan: MergePlan, keep: float, generator: torch.Generator
    ) -> None:
        layer.lora_b.mul_(keep)  # b is finite here (the merge checked): 0 * b is 0


class Redraw(Carry):
    """As ``Carry``, with the kept booster moved to a fresh seeded ``a'`` (``W`` takes the
    difference). Not on FSDP2-sharded layers (NotImplementedError)."""

    def plan(
        self, layer: FastRank1Linear, step: float, keep: float, generator: torch.Generator
    ) -> MergePlan:
        check_keep(keep)
        if is_dtensor(layer.weight):
            raise NotImplementedError(
                "booster_init='redraw' on an FSDP2-sharded weight: use 'carry' or 'random'"
            )
        a = layer.booster_vectors()[0]
        drawn = layer.draw_a(generator)
        next_a = drawn * (a.detach().float().norm() / drawn.float().norm().clamp_min(1e-30))
        next_a = next_a.to(a.dtype)
        return MergePlan(step * (1.0 - keep) * a + keep * (a - next_a), 1.0, next_a)

    @torch.no_grad()
    def restart_(
        self, layer: FastRank1Linear, plan: MergePlan, keep: float, generator: torch.Generator
    ) -> None:
        super().restart_(layer, plan, keep, generator)
        layer.lora_a.copy_(plan.next_a)


def check_keep(keep: float) -> None:
    if not 0.0 <= keep < 1.0:
        raise ValueError(f"keep (what a merge leaves of the booster) must be in [0, 1), got {keep}")


STRATEGIES: dict[str, Restart | Carry] = {
    "random": Restart(),
    "gradient": Restart(),
    "orthogonal": Orthogonal(),
    "orthogonal-gradient": Orthogonal(),
    "carry": Carry(),
    "redraw": Redraw(),
}


def strategy_for(booster_init: str) -> Restart | Carry:
    """The strategy of ``XGBLoRAConfig.booster_init``."""
    if booster_init not in STRATEGIES:
        raise ValueError(f"booster_init must be one of {tuple(STRATEGIES)}, got {booster_init!r}")
    return STRATEGIES[booster_init]
