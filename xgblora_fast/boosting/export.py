"""Export a boosted fine-tune as a standard peft LoRA adapter, and take merges back out.

Every round XGBLoRA merges ``W += alpha_t s b_t a_t^T`` into the layers it trained, so the whole
fine-tune of a layer is ``delta = sum_t (alpha_t s b_t) a_t^T``: a LoRA of rank ``T``, the number
of rounds the layer was active. The ``Booster`` records each merged booster (``MergeRecord``);

- ``export_lora`` stacks them into peft's ``lora_B [out, T]`` / ``lora_A [T, in]`` (optionally
  truncated to rank ``R`` by SVD) next to the fully trained task head (``modules_to_save``), so
  ``peft.PeftModel.from_pretrained(base_model, folder)`` reproduces the fine-tuned model;
- ``export_lora_from_checkpoint`` does the same from a checkpoint folder, without the model;
- ``unmerge_`` subtracts recorded boosters from the weights again (all rounds, or some: "what did
  round t contribute?").
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from xgblora_fast.boosting.booster import Booster
from xgblora_fast.boosting.checkpoint import (
    CheckpointError,
    load_structure,
    resolve_checkpoint,
    verify_checkpoint,
)
from xgblora_fast.boosting.records import MergeRecord
from xgblora_fast.nn.layer import FastRank1Linear
from xgblora_fast.nn.patching import _is_adaptable, _wrap

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_REPORT = "xgblora_export.json"
# Key under which the trainer stores ``adapter_metadata`` in a checkpoint's extra.json.
CHECKPOINT_METADATA = "lora_export"
_PEFT_PREFIX = "base_model.model."  # peft's key prefix (adapter name removed), as save_pretrained
_BOOSTER_KEYS = (".lora_a", ".lora_b")  # FastRank1Linear's own tensors: never part of a head
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
)
_PEFT_CLASSIFIERS = ("classifier", "score")  # heads peft's SEQ_CLS model always saves and loads


def _model_of(model_or_booster: nn.Module | Booster) -> nn.Module:
    return model_or_booster.model if isinstance(model_or_booster, Booster) else model_or_booster


def _records(model_or_booster: nn.Module | Booster) -> dict[str, MergeRecord]:
    """``{layer name: record}`` of every layer with at least one recorded merge, model order.

    A ``Booster`` holds its records itself (also after ``xf.eject``); a model only in its
    ``FastRank1Linear`` layers."""
    if isinstance(model_or_booster, Booster):
        return {n: r for n, r in model_or_booster.records.items() if r.rounds}
    return {
        name: module.merge_record
        for name, module in model_or_booster.named_modules()
        if isinstance(module, FastRank1Linear)
        and hasattr(module, "merge_record")
        and module.merge_record.rounds
    }


def _check_not_ejected(model_or_booster: nn.Module | Booster, action: str) -> None:
    """A plain model without any ``FastRank1Linear`` carries no records: say what to do."""
    if isinstance(model_or_booster, Booster):
        return
    if not any(isinstance(m, FastRank1Linear) for m in model_or_booster.modules()):
        raise ValueError(
            f"nothing to {action}: {type(model_or_booster).__name__} holds no FastRank1Linear "
            "layer (after xf.eject the records are not in the model): export before eject, or "
            "pass the Booster"
        )


@contextlib.contextmanager
def _as_layer(module: nn.Module, record: MergeRecord):
    """``module`` as a ``FastRank1Linear`` sharing its weight storage: the module itself, or,
    once ejected (a plain ``nn.Linear``/``Conv1D``), a temporary wrapper whose merges land in
    the module's weight; the module's ``requires_grad`` flags are restored afterwards."""
    if isinstance(module, FastRank1Linear):
        yield module
        return
    with torch.random.fork_rng(devices=[]):  # the wrapper's booster init draws nothing seen
        layer = _wrap(module, alpha=record.alpha)
    weight_grad, bias_grad = layer._source_requires_grad
    try:
        yield layer
    finally:
        module.weight.requires_grad_(weight_grad)
        if module.bias is not None:
            module.bias.requires_grad_(bias_grad)


def _with_live_boosters(
    records: Mapping[str, MergeRecord],
    live: Mapping[str, tuple[MergeRecord, torch.Tensor, torch.Tensor]],
    round_index: int | None,
) -> dict[str, MergeRecord]:
    """``records`` plus each ``live`` layer's unmerged booster ``(a, b)`` as one more merge of
    step 1: what ``Booster.finish()`` would merge (a round in progress, or what
    ``booster_keep`` left in place). ``live`` maps a name to its record (possibly empty) and
    vectors; the records passed in are not changed (the extended ones are copies). The new
    entry's round is ``round_index``, or (None) the round after the layer's last recorded one."""
    out = dict(records)
    for name, (record, a, b) in live.items():
        extended = copy.deepcopy(record)
        current = max(record.rounds, default=-1) + 1 if round_index is None else round_index
        extended.add_vectors(current, 1.0, a, b, record.rounding)
        out[name] = extended
    return out


def _nothing_recorded(where: str) -> ValueError:
    return ValueError(
        f"nothing recorded in {where}: no booster was merged with XGBLoRAConfig(record=True) "
        "(or every recorded round was unmerged)"
    )


def adapter_metadata(model: nn.Module) -> dict[str, Any]:
    """What the adapter config needs from ``model`` besides the records.

    Returns ``{"base_model_name_or_path", "task_type", "modules_to_save"}``: the model's
    ``config._name_or_path`` (None if empty), peft's task type from the class name (e.g.
    ``...ForSequenceClassification`` -> ``"SEQ_CLS"``, else None), and the modules that own a
    trainable parameter other than a booster: the fully trained task head (finetune.py unfreezes
    the freshly initialised head, as peft's ``modules_to_save``). For ``"SEQ_CLS"`` the
    classification head is always included: peft's sequence-classification model adds it to
    ``modules_to_save`` itself and refuses an adapter without its weights.
    """
    boosters = {
        id(p)
        for m in model.modules()
        if isinstance(m, FastRank1Linear)
        for p in (m.lora_a, m.lora_b)
    }
    trained = {
        name.rpartition(".")[0]
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in boosters
    }
    cls = type(model).__name__
    task_type = next((t for suffix, t in _TASK_TYPES if cls.endswith(suffix)), None)
    if task_type == "SEQ_CLS":
        trained |= {name for name, _ in model.named_children() if name in _PEFT_CLASSIFIERS}
    return {
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "task_type": task_type,
        "modules_to_save": sorted(trained),
    }


# ------------------------------------------------------------------ factors
def _frobenius_sq(up: torch.Tensor, down: torch.Tensor) -> float:
    """``|up @ down|_F^2`` from the ``[T, T]`` Gram matrices, in float64."""
    up, down = up.double(), down.double()
    return float(((up.T @ up) * (down @ down.T)).sum())


def _truncate(
    up: torch.Tensor, down: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``up [out, T] @ down [T, in]`` and the squared norm dropped.

    QR of each thin factor and an SVD of the small core ``R_up R_down^T`` (at most T x T), in
    float64: the ``[out, in]`` product is never formed. The singular values are split evenly
    (``sqrt(S)`` into each factor) so neither factor carries the whole scale.
    """
    q_up, r_up = torch.linalg.qr(up.double())  # [out, k], [k, T]
    q_down, r_down = torch.linalg.qr(down.double().T)  # [in, k'], [k', T]
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)  # core [k, k']
    root = s[:rank].sqrt()
    new_up = (q_up @ u[:, :rank]) * root
    new_down = root[:, None] * (vh[:rank] @ q_down.T)
    return new_up.float(), new_down.float(), float(s[rank:].square().sum())


def _lora_factors(
    records: Mapping[str, MergeRecord], rank: int | None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Per layer ``(lora_B [out, r], lora_A [r, in])`` fp32 and the error report."""
    factors = {}
    layers = {}
    dropped_total, norm_total = 0.0, 0.0
    for name, record in records.items():
        up, down = record.factors()
        norm = _frobenius_sq(up, down)
        dropped = 0.0
        if rank is not None and rank < up.shape[1]:
            up, down, dropped = _truncate(up, down, rank)
        factors[name] = (up.contiguous(), down.contiguous())
        layers[name] = {
            "rounds": list(record.rounds),
            "rank": up.shape[1],
            "relative_error": (dropped / norm) ** 0.5 if norm > 0 else 0.0,
        }
        dropped_total += dropped
        norm_total += norm
    overall = (dropped_total / norm_total) ** 0.5 if norm_total > 0 else 0.0
    return factors, {"rank": rank, "relative_error": overall, "layers": layers}


# ------------------------------------------------------------------ writing
def _write_adapter(
    path: Path,
    records: Mapping[str, MergeRecord],
    heads: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    rank: int | None,
) -> dict[str, Any]:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the error report."""
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 (or None for the exact adapter), got {rank}")
    modules_to_save = list(metadata.get("modules_to_save") or [])
    # A fully trained module is saved whole (its weight already holds its merges); peft would
    # not put a LoRA on it either.
    records = {
        n: r
        for n, r in records.items()
        if not any(n == m or n.startswith(m + ".") for m in modules_to_save)
    }
    if not records:
        raise _nothing_recorded("the boosted layers")
    factors, report = _lora_factors(records, rank)
    ranks = {name: up.shape[1] for name, (up, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # peft scales each module by lora_alpha / r; lora_alpha = r (per module through
    # alpha_pattern) makes that 1: the scales alpha_t * s already sit in lora_B. Pattern keys
    # are regexes matched against module names, hence escaped.
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": metadata.get("task_type"),
        "base_model_name_or_path": metadata.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": list(factors),
        "modules_to_save": modules_to_save or None,
        # GPT-2 Conv1D stores [in, out]; peft flips this per module type anyway.
        "fan_in_fan_out": any(records[n].fan_in_fan_out for n in factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    tensors = {}
    for name, (up, down) in factors.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = down
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = up
    for key, value in heads.items():
        tensors[_PEFT_PREFIX + key] = value.detach().cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    report |= {
        "modules_to_save": modules_to_save,
        "adapter_bytes": (path / ADAPTER_WEIGHTS).stat().st_size,
    }
    (path / EXPORT_REPORT).write_text(json.dumps(report, indent=1))
    return report


def _head_keys(keys: Iterable[str], modules_to_save: list[str]) -> list[str]:
    """The state-dict keys of the fully trained modules (without booster vectors)."""
    prefixes = tuple(m + "." for m in modules_to_save)
    return [k for k in keys if k.startswith(prefixes) and not k.endswith(_BOOSTER_KEYS)]


def export_lora(
    model_or_booster: nn.Module | Booster,
    path: str | os.PathLike,
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
    modules_to_save: list[str] | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """Write the recorded fine-tune as a peft LoRA adapter folder.

    Layer ``l`` active in ``T_l`` rounds gets ``lora_A [T_l, in]`` (the ``a_t``) and ``lora_B
    [out, T_l]`` (the ``alpha_t s b_t``), fp32, with peft's scaling 1, so
    ``peft.PeftModel.from_pretrained(base_model, path)`` computes ``W_0 x + B (A x)``: the merged
    fine-tune, with the update in fp32 (no merge rounding). Layers never active get no entry.
    An active booster not yet merged (a round in progress, or the part ``booster_keep`` left in
    place) is one more rank with step 1, so the adapter is the model as it computes now: what
    ``Booster.finish()`` would merge.

    Args:
        model_or_booster: a ``Booster`` (also after ``xf.eject``: it keeps the records), or the
            model holding its ``FastRank1Linear`` layers (before ``xf.eject``). Module names are
            relative to that model.
        path: the adapter folder (created).
        rank: truncate each layer to at most this rank by SVD (None: exact).
        base_model_name_or_path, modules_to_save, task_type: override what
            ``adapter_metadata(model)`` finds.
    Returns:
        The report, also written to ``path/xgblora_export.json``: ``rank``, ``relative_error``
        (Frobenius norm of the dropped part over that of the whole update, all layers), per
        layer ``rounds``, ``rank`` and ``relative_error``, ``modules_to_save``,
        ``adapter_bytes``.
    Raises:
        ValueError: nothing recorded, a model without ``FastRank1Linear`` layers (ejected:
            export before eject, or pass the Booster), or ``rank < 1``.
    """
    _check_not_ejected(model_or_booster, "export")
    model = _model_of(model_or_booster)
    live = {
        name: (getattr(m, "merge_record", None) or MergeRecord.for_layer(m), m.lora_a, m.lora_b)
        for name, m in model.named_modules()
        if isinstance(m, FastRank1Linear) and m.active and bool(m.lora_b.any())
    }
    current = model_or_booster.round if isinstance(model_or_booster, Booster) else None
    records = _with_live_boosters(_records(model_or_booster), live, current)
    if not records:
        raise _nothing_recorded(type(model).__name__)
    found = adapter_metadata(model)
    metadata = {
        "base_model_name_or_path": base_model_name_or_path or found["base_model_name_or_path"],
        "task_type": task_type or found["task_type"],
        "modules_to_save": found["modules_to_save"] if modules_to_save is None else modules_to_save,
    }
    state = model.state_dict()
    heads = {k: state[k] for k in _head_keys(state, metadata["modules_to_save"])}
    return _write_adapter(Path(path), records, heads, metadata, rank)


def export_lora_from_checkpoint(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """``export_lora`` from a checkpoint folder (or a run folder: its latest), no model needed.

    The records come from the booster state; base model, task type and ``modules_to_save``
    from what the trainer stored in ``extra.json`` (``extra["lora_export"]``, see
    ``adapter_metadata``), the head's weights from ``model.safetensors``; so do the boosters not
    yet merged (mid-round, or what ``booster_keep`` left in place), which the adapter includes
    as ``export_lora`` does.
    """
    folder = resolve_checkpoint(checkpoint)
    verify_checkpoint(folder)
    if not (folder / "booster.json").exists():
        raise CheckpointError(f"{folder} holds no booster state, so no merge records")
    state = load_structure(folder, "booster")
    records = {n: MergeRecord.from_state(s) for n, s in state["records"].items()}
    extra = json.loads((folder / "extra.json").read_text())
    metadata = dict(extra.get(CHECKPOINT_METADATA, {}))
    if base_model_name_or_path is not None:
        metadata["base_model_name_or_path"] = base_model_name_or_path
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = _head_keys(f.keys(), list(metadata.get("modules_to_save") or []))
        heads = {k: f.get_tensor(k) for k in keys}
        # Mid-round, or at a round boundary with booster_keep: the boosters not yet merged.
        live = {}
        for name in state["active"]:
            b = f.get_tensor(f"{name}.lora_b")
            if bool(b.any()):
                a = f.get_tensor(f"{name}.lora_a")
                record = records.get(name) or MergeRecord(
                    float(state["config"]["alpha"]), a.numel(), b.numel(),
                    any(r.fan_in_fan_out for r in records.values()),
                )  # fmt: skip
                live[name] = (record, a, b)
    records = _with_live_boosters(records, live, int(state["round"]))
    if not records:
        raise _nothing_recorded(str(folder))
    return _write_adapter(Path(path), records, heads, metadata, rank)


# ------------------------------------------------------------------ unmerge
@torch.no_grad()
def unmerge_(
    model_or_booster: nn.Module | Booster,
    rounds: int | Iterable[int] | None = None,
    rounding: str | None = None,
) -> list[int]:
    """Subtract recorded boosters from the weights in place and drop them from the record.

    Each recorded merge ``W += alpha_t s b_t a_t^T`` is undone by the layer's own merge with
    step ``-alpha_t`` (latest first), so the result is exact up to the weight dtype's rounding.
    Afterwards ``export_lora`` exports the remaining rounds; ``Booster.history`` is unchanged.

    Args:
        model_or_booster: a ``Booster`` (also after ``xf.eject``: the merges are taken out of
            the plain modules' weights) or the model holding its ``FastRank1Linear`` layers.
        rounds: round indices to remove (an int or several); None: every recorded round.
        rounding: rounding of the un-merges; None: the rounding the merges used.
    Returns:
        The removed round indices, sorted.
    Raises:
        ValueError before anything changes: nothing recorded, a model without
        ``FastRank1Linear`` layers (ejected: pass the Booster), a round that was never
        recorded, or a layer whose scale ``s`` changed since its merges.
    """
    _check_not_ejected(model_or_booster, "unmerge")
    model = _model_of(model_or_booster)
    records = _records(model_or_booster)
    recorded = {t for r in records.values() for t in r.rounds}
    if not recorded:
        raise _nothing_recorded(type(model).__name__)
    wanted = recorded if rounds is None else {rounds} if isinstance(rounds, int) else set(rounds)
    unknown = sorted(wanted - recorded)
    if unknown:
        raise ValueError(f"rounds {unknown} were never recorded; recorded: {sorted(recorded)}")
    modules = {name: model.get_submodule(name) for name in records}
    changed = [
        n
        for n, r in records.items()
        if isinstance(modules[n], FastRank1Linear) and modules[n].alpha != r.alpha
    ]
    if changed:
        raise ValueError(f"the scale alpha of {changed[:4]} changed since the recorded merges")
    gone = [
        n for n, m in modules.items() if not (isinstance(m, FastRank1Linear) or _is_adaptable(m))
    ]
    if gone:
        raise ValueError(f"{gone[:4]} are no linear layers any more: nothing was unmerged")
    for index, (name, record) in enumerate(records.items()):
        with _as_layer(modules[name], record) as layer:
            for i in reversed(range(len(record.rounds))):
                if record.rounds[i] not in wanted:
                    continue
                # A seed of its own per (round, layer): fresh stochastic-rounding bits.
                seed = (record.rounds[i] * 10_007 + index + 0x5EED) % (2**31)
                step = -record.steps[i]
                # Through the layer's merge (rounding, Kahan buffer), its booster untouched.
                layer.merge_vectors_(
                    record.a[i], record.b[i], step, rounding or record.rounding, seed
                )
                record.remove(i)
    return sorted(wanted)
