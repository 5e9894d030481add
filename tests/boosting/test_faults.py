"""Checkpoint faults: truncated, missing, foreign or pickled checkpoints fail clearly and change
nothing; a run SIGKILLed in the middle of writing a checkpoint resumes from the last complete one
and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import copy
import json
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers.kernel_checks import bits_of

import xgblora_fast as xf
from xgblora_fast.boosting.checkpoint import CheckpointError, _sha256

WIDTH = 10


def build(seed=0, dtype=torch.bfloat16, targets="all-linear", width=WIDTH):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 2)
    ).to(dtype)
    cfg = xf.XGBLoRAConfig(
        target_modules=targets,
        kappa=3,
        kappa_growth=1.0,
        layers_per_round=2,
        rounding="stochastic",
        seed=7,
    )
    booster = xf.Booster(model, cfg)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=3e-2)
    booster.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    return model, booster, optimizer, scheduler


def train(model, booster, optimizer, scheduler, steps):
    for _ in range(steps):
        x = torch.randn(6, model[0].in_features).to(model[0].weight.dtype)
        loss = nn.functional.cross_entropy(model(x).float(), torch.randint(0, 2, (6,)))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        booster.step(loss.item())


def full_state(model, booster, optimizer, scheduler):
    """Everything a load could touch: model, booster, optimizer, scheduler and the global RNGs."""
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "booster": booster.state_dict() if booster is not None else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
        }
    )


def assert_same(got, want, where="state"):
    """Bit-for-bit equality of nested dicts/lists/tuples of tensors, arrays and scalars."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        assert got.shape == want.shape, where
        if want.is_floating_point() and want.element_size() in (2, 4):
            assert torch.equal(bits_of(got), bits_of(want)), where
        else:
            assert torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        assert np.array_equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def saved_run(tmp_path):
    """A checkpoint of 4 training steps (mid-round, Adam state present)."""
    run = build()
    train(*run, 4)
    folder = xf.save_checkpoint(tmp_path / "run", *run, extra={"epoch": 1})
    return tmp_path / "run", folder


def rewrite_manifest(folder: Path) -> None:
    """Make the manifest agree with the files as they are now (a consistently bad checkpoint)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in list(manifest["files"]):
        p = folder / name
        manifest["files"][name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


FAULTS = {
    # name: (damage(run_dir, folder), message fragment)
    "model.safetensors cut short": (
        lambda run, f: cut(f / "model.safetensors"),
        "model.safetensors is truncated",
    ),
    "optimizer.safetensors cut short": (
        lambda run, f: cut(f / "optimizer.safetensors", 0.9),
        "optimizer.safetensors is truncated",
    ),
    "booster.json cut short": (lambda run, f: cut(f / "booster.json"), "booster.json is truncated"),
    "manifest.json cut short": (lambda run, f: cut(f / "manifest.json"), "unreadable manifest"),
    "rng.safetensors missing": (
        lambda run, f: (f / "rng.safetensors").unlink(),
        "rng.safetensors is missing",
    ),
    "latest points at a deleted folder": (
        lambda run, f: (run / "latest").write_text("checkpoint-000099"),
        "incomplete",
    ),
    "no checkpoint at all": (
        lambda run, f: [p.unlink() for p in (run / "latest",)],
        "no checkpoint",
    ),
    "optimizer.json cut short, manifest agrees": (
        lambda run, f: (cut(f / "optimizer.json"), rewrite_manifest(f)),
        "unreadable checkpoint",
    ),
    "scheduler.json cut short, manifest agrees": (
        lambda run, f: (cut(f / "scheduler.json"), rewrite_manifest(f)),
        "unreadable checkpoint",
    ),
    "model.safetensors header garbage, manifest agrees": (
        lambda run, f: ((f / "model.safetensors").write_bytes(b"\xff" * 64), rewrite_manifest(f)),
        "not a safetensors file",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_checkpoint_fails_clearly_and_changes_nothing(tmp_path, fault):
    run_dir, folder = saved_run(tmp_path)
    damage, fragment = FAULTS[fault]
    damage(run_dir, folder)
    target = build(seed=3)
    train(*target, 2)  # a live run with its own Adam state, scheduler position and history
    before = full_state(*target)
    with pytest.raises(CheckpointError, match=fragment):
        xf.load_checkpoint(run_dir, *target)
    assert_same(full_state(*target), before)


def other_targets(tmp):
    return build(targets=["0", "4"])[:1], "unexpected key 2.lora_a"


def wider(tmp):
    return build(width=WIDTH + 2)[:1], "saved shape"


def fp32_model(tmp):
    return build(dtype=torch.float32)[:1], "saved dtype BF16, model has float32"


def two_param_groups(tmp):
    model, booster, _, _ = build()
    params = booster.parameters()
    optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3)
    return (model, None, optimizer), "param groups of sizes"


def other_booster_config(tmp):
    model, booster, optimizer, scheduler = build()
    booster.config.kappa = 4
    return (model, booster, optimizer, scheduler), "different XGBLoRAConfig"


def missing_booster_state(tmp):
    run = build()
    folder = xf.save_checkpoint(tmp / "bare", run[0])  # model only
    return (build(seed=4)[:2], folder), "holds no booster state"


@pytest.mark.parametrize(
    "other",
    [other_targets, wider, fp32_model, two_param_groups, other_booster_config,
     missing_booster_state],
    ids=lambda f: f.__name__,
)  # fmt: skip
def test_checkpoint_of_another_model_or_run_fails_clearly_and_changes_nothing(tmp_path, other):
    run_dir, _ = saved_run(tmp_path)
    objects, fragment = other(tmp_path)
    if isinstance(objects[-1], Path):
        objects, run_dir = objects
    objects = (*objects, *[None] * (4 - len(objects)))
    before = full_state(*objects)
    with pytest.raises(CheckpointError, match=fragment):
        xf.load_checkpoint(run_dir, *objects)
    assert_same(full_state(*objects), before)


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: proof that something unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_save_and_load_work_without_pickle(tmp_path, no_unpickling):
    run = build()
    train(*run, 5)
    xf.save_checkpoint(tmp_path, *run, extra={"k": [1, 2]})
    want = full_state(*run)
    torch.manual_seed(12345)
    target = build(seed=9)
    assert xf.load_checkpoint(tmp_path, *target) == {"k": [1, 2]}
    assert_same(full_state(*target), want)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "booster.json"])
def test_pickle_payload_is_refused_and_never_unpickled(tmp_path, victim):
    run_dir, folder = saved_run(tmp_path)
    marker = tmp_path / "unpickled"
    (folder / victim).write_bytes(pickle.dumps(_Payload(marker)))
    rewrite_manifest(folder)  # the manifest cannot tell: the file itself must be refused
    target = build(seed=3)
    before = full_state(*target)
    with pytest.raises(CheckpointError):
        xf.load_checkpoint(run_dir, *target)
    assert not marker.exists(), "the payload ran"
    assert_same(full_state(*target), before)


# ------------------------------------------------------------------ SIGKILL during a save
TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path

    import torch, torch.nn as nn
    import xgblora_fast as xf
    import xgblora_fast.boosting.checkpoint as ckpt

    run_dir, out, fault, fault_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    STEPS, EVERY = 12, 2
    saves = 0
    real_save_file, real_replace = ckpt.save_file, os.replace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def save_file(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if fault == "mid_file" and saves == fault_at and Path(path).name == "booster.safetensors":
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])  # killed half-way through this file
            die()

    def replace(src, dst):
        name = Path(src).name
        if saves == fault_at and (
            (fault == "before_rename" and name.startswith(".tmp-checkpoint"))
            or (fault == "before_latest" and name.startswith(".latest"))
        ):
            die()
        real_replace(src, dst)

    ckpt.save_file = save_file
    os.replace = replace

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
    ).to(torch.bfloat16)
    cfg = xf.XGBLoRAConfig(
        kappa=3, kappa_growth=1.0, layers_per_round=2, rounding="stochastic", dropout=0.1, seed=3
    )
    booster = xf.Booster(model, cfg)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=5e-2)
    booster.attach(optimizer)
    torch.manual_seed(1)  # the data stream (restored from the checkpoint on resume)
    start = 0
    if (run_dir / "latest").exists():
        xf.load_checkpoint(run_dir, model, booster, optimizer)
        start = booster.global_step
    for step in range(start, STEPS):
        x = torch.randn(8, 8)
        loss = nn.functional.mse_loss(model(x.bfloat16()).float(), x[:, :1].sin())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
        if (step + 1) % EVERY == 0:
            saves += 1
            xf.save_checkpoint(run_dir, model, booster, optimizer)
    booster.finish()
    ckpt.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    Path(out + ".json").write_text(json.dumps({"start": start, "rounds": booster.round}))
    """
)


def _train(tmp_path: Path, run_dir: Path, out: Path, fault: str = "none", at: int = 0):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(run_dir), str(out), fault, str(at)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run, once for every fault."""
    tmp = tmp_path_factory.mktemp("straight")
    done = _train(tmp, tmp / "run", tmp / "straight.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "straight.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "at", "resume_step"),
    [
        ("mid_file", 3, 4),  # half of booster.safetensors written into the temporary folder
        ("before_rename", 3, 4),  # every file written and fsynced, folder not renamed
        ("before_latest", 3, 4),  # folder renamed into place, `latest` still the old one
        ("mid_file", 1, 0),  # the very first save: nothing to resume, start over
    ],
)
def test_sigkill_during_checkpoint_write_resumes_bit_identical(
    tmp_path, straight_run, fault, at, resume_step
):
    run_dir = tmp_path / "run"
    killed = _train(tmp_path, run_dir, tmp_path / "never.safetensors", fault, at)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert not (tmp_path / "never.safetensors").exists()
    leftovers = [p.name for p in run_dir.iterdir()]
    if fault != "before_latest":
        assert any(n.startswith(".tmp-checkpoint") for n in leftovers), leftovers
    if resume_step:
        assert (run_dir / "latest").read_text() == f"checkpoint-{resume_step:06d}"

    resumed = _train(tmp_path, run_dir, tmp_path / "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((tmp_path / "resumed.safetensors.json").read_text())
    assert info["start"] == resume_step
    want = _weights(straight_run)
    got = _weights(tmp_path / "resumed.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(bits_of(got[k]), bits_of(want[k])), k
    initial = json.loads(Path(f"{straight_run}.json").read_text())
    assert initial["rounds"] == info["rounds"] == 4  # 12 steps of kappa=3: merges really ran


# ------------------------------------------------------------------ NaN in a booster
def test_nan_booster_stops_the_round_before_any_merge_and_weights_stay_bit_identical():
    model, booster, optimizer, scheduler = build()
    train(model, booster, optimizer, scheduler, 2)  # one step before the round of 3 ends
    assert len(booster.active) >= 2
    last = booster.layers[booster.active[-1]]  # merged last: an early raise must spare the rest
    with torch.no_grad():
        last.lora_b[1] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    round_before = booster.round
    optimizer.step()  # the round's last optimizer step (no gradients: it changes nothing)
    with pytest.raises(FloatingPointError, match=r"contain NaN/Inf .* nothing was merged"):
        booster.step(0.0)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(bits_of(v), bits_of(weights[k])), k
    assert booster.round == round_before and booster.history == []
    # Direct merges refuse as well and leave the layer untouched.
    w = last.weight.clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        last.merge_("stochastic", seed=1)
    assert torch.equal(bits_of(last.weight), bits_of(w))
