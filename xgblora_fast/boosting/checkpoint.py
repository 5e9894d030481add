"""Atomic, pickle-free checkpoints: model, boosters, optimizer, scheduler, RNG, round counter.

Layout under a run folder::

    run/checkpoint-000120/   one folder per save, complete or absent
        model.safetensors    the whole state_dict (base weights and boosters)
        optimizer.safetensors + optimizer.json   tensors / everything else
        booster.safetensors + booster.json       generator state / counters and history
        rng.safetensors + rng.json                torch (CPU, CUDA) / Python and NumPy states
        scheduler.json, extra.json
        manifest.json        size and sha256 of every file above, written last
    run/latest               name of the newest complete checkpoint, replaced atomically

A save writes into a temporary folder, fsyncs it, renames it into place and only then points
``latest`` at it: a process killed mid-save leaves the previous checkpoint in charge. Loading
verifies the manifest (a truncated file is caught), checks every key, shape and dtype against
the model *before* touching it, and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from xgblora_fast.boosting.booster import Booster
from xgblora_fast.nn.layer import FastRank1Linear

LATEST = "latest"
PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model."""


# ------------------------------------------------------------------ helpers
def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a ``{"__tensor__": key}`` marker."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_structure(folder: Path, name: str, obj: Any) -> None:
    """Write a nested dict/list with tensors as ``name.safetensors`` + ``name.json``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(obj, name, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_structure(folder: Path, name: str) -> Any:
    """Read what ``save_structure`` wrote (no pickle)."""
    tensors = load_file(folder / f"{name}.safetensors")
    return _join_tensors(json.loads((folder / f"{name}.json").read_text()), tensors)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with storage shared between entries (tied weights) saved once."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen[ident] = key
        out[key] = t.detach().cpu().contiguous()
    return out


def _expected_tensors(model: nn.Module, saved: Any) -> dict[str, torch.Tensor]:
    """``_model_tensors`` as loading ``saved`` (its keys) will leave the model: the Kahan buffer
    of a ``FastRank1Linear``, allocated on first use, exists iff it was saved (W's shape, dtype).
    """
    expected = _model_tensors(model)
    for name, module in model.named_modules():
        if isinstance(module, FastRank1Linear):
            key = f"{name}.compensation" if name else "compensation"
            if key in saved:
                expected[key] = module.weight
            else:
                expected.pop(key, None)
    return expected


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ save
def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    booster: Booster | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    step: int | None = None,
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint under ``run_dir`` and point ``run_dir/latest`` at it.

    Args:
        step: names the folder; defaults to ``booster.global_step`` (or 0).
        keep: how many complete checkpoints to keep (older ones are deleted after the save).
    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if step is None:
        step = booster.global_step if booster is not None else 0
    final = run_dir / f"{PREFIX}{step:06d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_model_tensors(model), tmp / "model.safetensors")
    if optimizer is not None:
        save_structure(tmp, "optimizer", optimizer.state_dict())
    if booster is not None:
        save_structure(tmp, "booster", booster.state_dict())
    if scheduler is not None:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    save_structure(tmp, "rng", _rng_state())
    (tmp / "extra.json").write_text(json.dumps(extra or {}))
    manifest = {
        "step": step,
        "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name)
    with open(pointer, "rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer, run_dir / LATEST)
    _fsync_dir(run_dir)
    complete = sorted(p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir())
    for old in complete[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------ load
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for a run folder (via ``latest``) or a checkpoint folder."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return path
    pointer = path / LATEST
    if not pointer.exists():
        raise CheckpointError(f"no checkpoint in {path}: neither a manifest nor '{LATEST}'")
    target = path / pointer.read_text().strip()
    if not (target / "manifest.json").exists():
        raise CheckpointError(f"{pointer} points at {target.name}, which is incomplete")
    return target


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file of the manifest (size and sha256); return the manifest."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable manifest ({e})") from e
    for name, info in manifest["files"].items():
        p = folder / name
        if not p.exists():
            raise CheckpointError(f"{folder}: {name} is missing")
        if p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{folder}: {name} is truncated or corrupted")
    return manifest


def _check_model_fits(folder: Path, model: nn.Module) -> None:
    """Every saved tensor must match the model's key, shape and dtype, and cover the model."""
    try:
        handle = safe_open(folder / "model.safetensors", framework="pt")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: model.safetensors is not a safetensors file ({e})") from e
    with handle as f:
        saved = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        expected = _expected_tensors(model, saved)
        problems = [f"unexpected key {k}" for k in saved if k not in expected]
        problems += [f"missing key {k}" for k in expected if k not in saved]
        for k in saved.keys() & expected.keys():
            shape = tuple(saved[k].get_shape())
            dtype = saved[k].get_dtype()
            want = expected[k]
            want_dtype = str(want.dtype).removeprefix("torch.")
            if shape != tuple(want.shape):
                problems.append(f"{k}: saved shape {shape}, model has {tuple(want.shape)}")
            elif _DTYPE_NAMES.get(dtype) != want_dtype:
                problems.append(f"{k}: saved dtype {dtype}, model has {want_dtype}")
    if problems:
        more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
        shown = "; ".join(problems[:6]) + more
        raise CheckpointError(f"{folder} does not fit this model: {shown}")


_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    booster: Booster | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; return its ``extra`` dict.

    ``path`` is a run folder (its ``latest`` checkpoint) or a checkpoint folder. Nothing is
    changed unless every check passes (manifest, keys, shapes, dtypes).
    """
    folder = resolve_checkpoint(path)
    verify_checkpoint(folder)
    _check_model_fits(folder, model)
    for name, obj in (("optimizer", optimizer), ("booster", booster)):
        if obj is not None and not (folder / f"{name}.json").exists():
            raise CheckpointError(f"{folder} holds no {name} state")
    try:
        booster_state = load_structure(folder, "booster") if booster is not None else None
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: unreadable booster state ({type(e).__name__})") from e
    if booster is not None:
        try:  # config, layer names and merge records, before anything is changed
            booster.check_state(booster_state)
        except ValueError as e:
            raise CheckpointError(f"{folder}: {e}") from e
    # Everything is read and checked before anything is changed: no failure leaves a half-load.
    try:
        opt_state = _read_optimizer_state(folder, optimizer) if optimizer is not None else None
        sched_state = _read_json(folder, "scheduler.json") if scheduler is not None else None
        rng_state = load_structure(folder, "rng") if restore_rng else None
        extra = _read_json(folder, "extra.json")
        tensors = load_file(folder / "model.safetensors")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    with torch.no_grad():
        # Not strict: a tied weight was saved under one of its keys. Layers allocate or drop
        # their lazily allocated buffers to match (FastRank1Linear._load_from_state_dict).
        model.load_state_dict(tensors, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if booster is not None:
        booster.load_state_dict(booster_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    if restore_rng:
        _set_rng_state(rng_state)
    return extra


def _read_json(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())


def _read_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The saved optimizer state, checked against ``optimizer``'s groups and parameter shapes."""
    state = load_structure(folder, "optimizer")
    # JSON turned the per-parameter index keys into strings; the optimizer wants ints.
    state["state"] = {int(k): v for k, v in state["state"].items()}
    saved = [len(g["params"]) for g in state["param_groups"]]
    have = [len(g["params"]) for g in optimizer.param_groups]
    if saved != have:
        raise CheckpointError(
            f"{folder}: optimizer state has param groups of sizes {saved}, this optimizer {have}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue  # step counters
            if index >= len(params) or value.shape != params[index].shape:
                raise CheckpointError(
                    f"{folder}: optimizer state {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter has "
                    f"{tuple(params[index].shape) if index < len(params) else 'none'}"
                )
    return state
