"""Checkpoints: resume mid-round is exact; bad checkpoints fail clearly and change nothing."""

import json

import pytest
import torch
import torch.nn as nn

import xgblora_fast as xf
from xgblora_fast.boosting.checkpoint import CheckpointError, resolve_checkpoint

WIDTH = 12


def build(dtype, seed=0, width=WIDTH, rounding="stochastic", booster_init="carry"):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 2)
    ).to(dtype)
    cfg = xf.XGBLoRAConfig(
        kappa=4,
        kappa_growth=1.0,
        layers_per_round=2,
        dropout=0.1,
        rounding=rounding,
        booster_init=booster_init,
        rewarm_steps=2,
        seed=7,
    )
    booster = xf.Booster(model, cfg)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=3e-2)
    booster.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.1 * s))
    return model, booster, optimizer, scheduler


def run_steps(model, booster, optimizer, scheduler, steps, dtype):
    for _ in range(steps):
        # Data from the global RNG: a resumed run must restore it to see the same batches.
        x = torch.randn(6, WIDTH).to(dtype)
        target = torch.randint(0, 2, (6,))
        loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        booster.step(loss.item())


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "rounding, booster_init",
    [
        ("stochastic", "carry"),
        ("kahan", "carry"),
        ("stochastic", "orthogonal"),
        ("nearest", "orthogonal-gradient"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resume_mid_round_ends_with_the_same_weights(tmp_path, dtype, rounding, booster_init):
    """Kahan: the buffers of the merged layers are saved, and a fresh model (which allocates
    them at its first Kahan merge) takes them from the checkpoint. Orthogonal inits: the resumed
    layers rebuild their merged directions from the records, to the same bits."""
    torch.manual_seed(123)
    straight = build(dtype, rounding=rounding, booster_init=booster_init)
    run_steps(*straight, 18, dtype)

    torch.manual_seed(123)
    first = build(dtype, rounding=rounding, booster_init=booster_init)
    run_steps(*first, 10, dtype)  # 10 = 2 rounds of 4 + 2 steps into round 3
    xf.save_checkpoint(tmp_path, first[0], first[1], first[2], first[3], extra={"epoch": 0})
    torch.manual_seed(999)  # a different process would have another RNG state
    resumed = build(dtype, seed=5, rounding=rounding, booster_init=booster_init)
    buffers = [k for k in first[0].state_dict() if k.endswith("compensation")]
    assert bool(buffers) == (rounding == "kahan")
    assert not any(k.endswith("compensation") for k in resumed[0].state_dict())
    extra = xf.load_checkpoint(tmp_path, resumed[0], resumed[1], resumed[2], resumed[3])
    assert extra == {"epoch": 0}
    assert resumed[1].step_in_round == 2 and resumed[1].round == 2
    run_steps(*resumed, 8, dtype)

    got, want = weights(resumed[0]), weights(straight[0])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert resumed[1].history == straight[1].history


def test_checkpoint_folder_holds_no_pickle_and_latest_points_at_newest(tmp_path):
    model, booster, optimizer, scheduler = build(torch.float32)
    run_steps(model, booster, optimizer, scheduler, 3, torch.float32)
    xf.save_checkpoint(tmp_path, model, booster, optimizer, scheduler)
    run_steps(model, booster, optimizer, scheduler, 2, torch.float32)
    newest = xf.save_checkpoint(tmp_path, model, booster, optimizer, scheduler)
    assert newest.name == "checkpoint-000005"
    assert resolve_checkpoint(tmp_path) == newest
    suffixes = {p.suffix for p in newest.iterdir()}
    assert suffixes == {".safetensors", ".json"}
    # keep=2: a third save drops the oldest
    run_steps(model, booster, optimizer, scheduler, 1, torch.float32)
    xf.save_checkpoint(tmp_path, model, booster, optimizer, scheduler)
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == ["checkpoint-000005", "checkpoint-000006"]


def test_leftover_temporary_folder_from_a_crash_is_ignored(tmp_path):
    model, booster, optimizer, scheduler = build(torch.float32)
    done = xf.save_checkpoint(tmp_path, model, booster, optimizer, scheduler)
    # A save killed half-way leaves only a temporary folder behind; latest is untouched.
    half = tmp_path / ".tmp-checkpoint-000009-4242"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert resolve_checkpoint(tmp_path) == done
    xf.load_checkpoint(tmp_path, *build(torch.float32)[:4])


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_truncated_checkpoint_fails_clearly_and_changes_nothing(tmp_path):
    model, booster, optimizer, scheduler = build(torch.float32)
    folder = xf.save_checkpoint(tmp_path, model, booster, optimizer, scheduler)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    other = build(torch.float32, seed=3)
    before = snapshot(other[0])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        xf.load_checkpoint(tmp_path, *other)
    assert_unchanged(other[0], before)


def test_checkpoint_of_another_model_fails_clearly_and_changes_nothing(tmp_path):
    model, booster, optimizer, scheduler = build(torch.float32)
    xf.save_checkpoint(tmp_path, model, booster, optimizer, scheduler)
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(WIDTH + 1, WIDTH), nn.GELU(), nn.Linear(WIDTH, 2))
    xf.inject(wider, "all-linear")
    before = snapshot(wider)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        xf.load_checkpoint(tmp_path, wider)
    assert_unchanged(wider, before)
    bf16 = build(torch.bfloat16)[0]
    before = snapshot(bf16)
    with pytest.raises(CheckpointError, match="saved dtype F32, model has bfloat16"):
        xf.load_checkpoint(tmp_path, bf16)
    assert_unchanged(bf16, before)


def test_booster_config_mismatch_is_refused(tmp_path):
    model, booster, optimizer, scheduler = build(torch.float32)
    folder = xf.save_checkpoint(tmp_path, model, booster, optimizer, scheduler)
    other = build(torch.float32)
    other[1].config.kappa = 5
    with pytest.raises(CheckpointError, match="different XGBLoRAConfig"):
        xf.load_checkpoint(folder, *other)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "optimizer.json", "booster.json"}


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        xf.load_checkpoint(tmp_path, build(torch.float32)[0])
