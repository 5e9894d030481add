"""DDP with 2 CPU processes (gloo): ranks see different data, yet hold bit-identical weights."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from helpers.process_group import free_port, leave_process_group

import xgblora_fast as xf

WIDTH = 24
ROUNDS = 4
KAPPA = 3


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()  # the same base model on every rank
    cfg = xf.XGBLoRAConfig(
        kappa=KAPPA, kappa_growth=1.0, layers_per_round=2, rounding="stochastic", seed=11
    )
    booster = xf.Booster(model, cfg)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=5e-2)
    booster.attach(optimizer)
    torch.manual_seed(100 + rank)  # different data on each rank
    local_losses = []
    for _ in range(ROUNDS * KAPPA):
        x = torch.randn(16, WIDTH)
        y = x[:, :1].sin()
        loss = nn.functional.mse_loss(ddp(x.bfloat16()).float(), y)
        loss.backward()
        local_losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
    flat = _base_weights(model)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(
            {
                "weights": torch.stack(gathered),
                "initial": _base_weights(_model()),
                "history": [h["active"] for h in booster.history],
            },
            os.path.join(out_dir, "result.pt"),
        )
    torch.save(torch.tensor(local_losses), os.path.join(out_dir, f"loss{rank}.pt"))
    leave_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)
    ).to(torch.bfloat16)


def _base_weights(model: nn.Module) -> torch.Tensor:
    """Base weights and biases (not the boosters), flattened, in model order."""
    state = model.state_dict()
    return torch.cat([v.float().flatten() for k, v in state.items() if "lora_" not in k])


@pytest.mark.slow
def test_ddp_ranks_hold_bit_identical_weights_after_stochastic_merges(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    rank0, rank1 = result["weights"]
    assert torch.equal(rank0, rank1)
    assert len(result["history"]) == ROUNDS
    # The ranks really saw different data, and the merges really changed the base weights.
    assert not torch.equal(torch.load(tmp_path / "loss0.pt"), torch.load(tmp_path / "loss1.pt"))
    assert rank0.shape == result["initial"].shape
    assert not torch.equal(rank0, result["initial"])
