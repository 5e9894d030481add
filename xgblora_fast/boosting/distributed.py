"""Replica checks for data-parallel runs: every rank must hold bit-identical weights.

XGBLoRA merges into the base weights outside the optimizer, so DDP's gradient all-reduce does
not keep them in sync by itself: the ranks stay identical only because they sample the same
layers, draw the same ``a`` and the same stochastic-rounding bits from the same seed. A rank with
another seed, another model or a skipped step would drift apart silently. ``verify_replicas``
turns that into an error at the end of the round where it happens (``Booster`` calls it when
``XGBLoRAConfig.verify_replicas`` is set and ``torch.distributed`` runs more than one rank).

Cost per round: one read of every boosted weight (integer sums of its raw bits, exact, so the
result does not depend on reduction order or device) and one all-gather of ``4 * layers`` int64.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FIELDS = ("weight", "weight rows", "lora_a", "lora_b")


def _raw_bits(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers of the same width (a view: no copy)."""
    t = t.detach()
    if type(t) is not torch.Tensor and hasattr(t, "to_local"):
        raise TypeError(
            f"{name} is a sharded DTensor (FSDP?): replica checks compare replicated weights; "
            "set XGBLoRAConfig(verify_replicas=False)"
        )
    return t.view(_INT_VIEW[t.element_size()])


def _named_layers(source: Any) -> list[tuple[str, Any]]:
    layers = getattr(source, "layers", source)
    if isinstance(layers, Mapping):
        return list(layers.items())
    return [(str(i), layer) for i, layer in enumerate(layers)]


def weights_checksum(source: Any) -> torch.Tensor:
    """Exact fingerprint of the layers' merged weights and boosters: int64 ``[layers, 4]``.

    ``source``: a ``Booster``, a ``{name: FastRank1Linear}`` dict or a list of layers. Per layer:
    the sum of ``W``'s raw bits, the sum of its row sums weighted by row number (so swapped rows
    count), and the sums of ``lora_a``'s and ``lora_b``'s bits. Integer sums are exact (int64,
    wrapping), hence identical on every rank that holds identical tensors. Any single changed
    element changes the first column.
    """
    rows = []
    for name, layer in _named_layers(source):
        w = _raw_bits(f"{name}.weight", layer.weight)
        row_sums = w.sum(dim=1, dtype=torch.int64) if w.numel() else w.new_zeros(0, torch.int64)
        weights = torch.arange(1, row_sums.numel() + 1, device=w.device, dtype=torch.int64)
        rows.append(
            torch.stack(
                [
                    row_sums.sum(),
                    (row_sums * weights).sum(),
                    _raw_bits(f"{name}.lora_a", layer.lora_a).sum(dtype=torch.int64).to(w.device),
                    _raw_bits(f"{name}.lora_b", layer.lora_b).sum(dtype=torch.int64).to(w.device),
                ]
            )
        )
    if not rows:
        return torch.zeros(0, len(FIELDS), dtype=torch.int64)
    return torch.stack(rows)


def _groups(values: Iterable[tuple[int, tuple[int, ...]]]) -> list[list[int]]:
    by_value: dict[tuple[int, ...], list[int]] = {}
    for rank, value in values:
        by_value.setdefault(value, []).append(rank)
    return sorted(by_value.values(), key=lambda ranks: (-len(ranks), ranks))


def agree_across_ranks(values: list[str], what: str, group: Any = None) -> None:
    """Raise RuntimeError on every rank unless all ranks pass the same ``values``.

    One all-gather of a fixed-size digest, so it is safe to call before collectives whose sizes
    depend on ``values`` (a rank that disagrees would otherwise hang or abort inside them).
    No-op without an initialised process group or with one rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    digest = hashlib.sha256("\0".join(values).encode()).digest()[:8]
    local = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        local = local.cuda()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group)
    groups = _groups((i, (int(g),)) for i, g in enumerate(gathered))
    if len(groups) > 1:
        split = " vs ".join(str(g) for g in groups)
        raise RuntimeError(
            f"ranks disagree on {what}: ranks split into {split}. Every data-parallel rank must "
            "use the same model and config (seed included)"
        )


def verify_replicas(source: Any, group: Any = None, where: str = "") -> None:
    """Raise RuntimeError unless every rank of ``group`` holds bit-identical weights.

    ``source``: a ``Booster``, a ``{name: FastRank1Linear}`` dict or a list of layers (the same
    layers in the same order on every rank). No-op without an initialised process group or with
    one rank. Every rank gets the same verdict (the checksums are all-gathered), so all of them
    raise together and none waits forever in a later collective. ``where`` goes into the message.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    named = _named_layers(source)
    local = weights_checksum(source)
    device = local.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    local = local.to(device)

    def rank_of(i: int) -> int:
        return dist.get_global_rank(group, i) if group is not None else i

    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=device), group)
    sizes = torch.cat(counts).tolist()  # one host read for every rank's count
    if len(set(sizes)) > 1:
        per_rank = ", ".join(f"rank {rank_of(i)}: {n}" for i, n in enumerate(sizes))
        raise RuntimeError(f"replicas diverged{where}: different numbers of layers ({per_rank})")
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group)
    table = list(torch.stack(gathered).cpu())  # one host read (exact int64, not host_values)
    groups = _groups((rank_of(i), tuple(t.flatten().tolist())) for i, t in enumerate(table))
    if len(groups) == 1:
        return
    reference, other = table[0], next(t for t in table[1:] if not torch.equal(t, table[0]))
    row, col = (reference != other).nonzero()[0].tolist()
    layer = named[row][0] if row < len(named) else str(row)
    if len(groups[0]) > len(groups[1]):
        odd = sorted(r for g in groups[1:] for r in g)
        who = f"rank(s) {odd} disagree with the majority {groups[0]}"
    else:
        who = "ranks split into " + " vs ".join(str(g) for g in groups)
    raise RuntimeError(
        f"replicas diverged{where}: {who}; first difference in layer {layer!r} "
        f"({FIELDS[col]}). Every data-parallel rank must use the same model, config (seed "
        "included) and optimizer steps; set XGBLoRAConfig(verify_replicas=False) if the ranks "
        "are not meant to be replicas"
    )
