"""Replica checks (``xf.distributed``) and per-shard merges.

Multi-process runs use gloo on CPU: the Booster verifies at every round end that all ranks hold
bit-identical weights; a rank whose weight is perturbed, or that runs another seed, is named in
a RuntimeError instead of drifting apart silently.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from kernel_checks import bits_of
from process_group import free_port

import xgblora_fast as xf
from xgblora_fast.distributed import verify_replicas, weights_checksum
from xgblora_fast.ops import reference

WIDTH = 16
KAPPA = 2
ROUNDS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)
    ).to(torch.bfloat16)


def _worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict = {"rank": rank, "rounds_done": 0}
    try:
        model = _model()
        seed = 11 + (rank if mode == "other_seed" and rank == world - 1 else 0)
        cfg = xf.XGBLoRAConfig(kappa=KAPPA, layers_per_round=2, rounding="stochastic", seed=seed)
        booster = xf.Booster(model, cfg)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = torch.optim.AdamW(booster.param_groups(), lr=5e-2)
        booster.attach(optimizer)
        torch.manual_seed(100 + rank)  # different data on each rank
        for step in range(ROUNDS * KAPPA):
            if mode == "perturbed" and rank == world - 1 and step == KAPPA + 1:
                with torch.no_grad():  # one bit of one weight, in the middle of round 1
                    w = model[2].weight.view(torch.int16)
                    w[3, 5] ^= 1
            x = torch.randn(8, WIDTH)
            loss = nn.functional.mse_loss(ddp(x.bfloat16()).float(), x[:, :1].sin())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            booster.step(loss.item())
            result["rounds_done"] = booster.round
        result["checksum"] = weights_checksum(booster).tolist()
        result["merged"] = not torch.equal(model[0].weight, _model()[0].weight)
    except RuntimeError as e:
        result["error"] = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _spawn(tmp_path, world: int, mode: str) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), mode), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_replicas_verified_every_round_and_identical(tmp_path):
    results = _spawn(tmp_path, 2, "clean")
    for r in results:
        assert "error" not in r, r
        assert r["rounds_done"] == ROUNDS and r["merged"]
    assert results[0]["checksum"] == results[1]["checksum"]


@pytest.mark.slow
def test_perturbed_rank_is_named(tmp_path):
    results = _spawn(tmp_path, 3, "perturbed")
    for r in results:  # every rank gets the same verdict, at the end of round 1
        assert r["rounds_done"] == 1, r
        assert "replicas diverged after round 1" in r["error"]
        assert "rank(s) [2] disagree with the majority [0, 1]" in r["error"]
        assert "layer '2' (weight)" in r["error"]


@pytest.mark.slow
def test_rank_with_another_seed_is_caught_at_the_first_round_end(tmp_path):
    results = _spawn(tmp_path, 2, "other_seed")
    for r in results:
        assert r["rounds_done"] == 0, r
        assert "replicas diverged after round 0: ranks split into [0] vs [1]" in r["error"]


# ------------------------------------------------------------------ checksum, one process
def _layers(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return {
        "q": xf.FastRank1Linear(12, 7, dtype=dtype),
        "v": xf.FastRank1Linear(7, 5, bias=False, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_checksum_sees_one_flipped_bit_and_swapped_rows(dtype):
    layers = _layers(dtype)
    base = weights_checksum(layers)
    assert base.shape == (2, 4) and base.dtype == torch.int64
    assert torch.equal(weights_checksum(layers), base)  # deterministic
    for i in range(layers["q"].weight.numel()):
        flat = layers["q"].weight.detach().view(-1)
        bits = flat.view({2: torch.int16, 4: torch.int32}[flat.element_size()])
        bits[i] ^= 1
        changed = weights_checksum(layers)
        bits[i] ^= 1
        assert not torch.equal(changed[0], base[0]), i
        assert torch.equal(changed[1], base[1])
    with torch.no_grad():
        w = layers["v"].weight
        w[[0, 1]] = w[[1, 0]].clone()
    swapped = weights_checksum(layers)
    assert swapped[1, 0] == base[1, 0] and swapped[1, 1] != base[1, 1]
    layers["q"].lora_a.data[0] += 1.0
    assert weights_checksum(layers)[0, 2] != base[0, 2]


def test_checksum_ignores_layout_and_verify_is_a_noop_without_a_process_group():
    layers = _layers()
    base = weights_checksum(layers)
    with torch.no_grad():
        layers["q"].weight = nn.Parameter(layers["q"].weight.t().contiguous().t())
    assert torch.equal(weights_checksum(layers), base)
    assert not dist.is_initialized()
    verify_replicas(layers)  # returns: nothing to compare with


# ------------------------------------------------------------------ per-shard merges (FSDP2)
def _shard_merge_stochastic_(w_shard, a, b_shard, scale, seed, row0, K):
    """The stochastic merge of rows ``row0:`` with bits of the *global* element index."""
    rows = torch.arange(row0, row0 + w_shard.shape[0], dtype=torch.int64)
    idx = rows[:, None] * K + torch.arange(K, dtype=torch.int64)[None, :]
    sb = torch.tensor(scale, dtype=torch.float32) * b_shard.float()
    value = torch.outer(sb, a.float()).add_(w_shard.float())
    w_shard.copy_(
        reference.round_stochastic(value, reference.counter_hash(seed, idx), w_shard.dtype)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_shard_merges_equal_rows_of_the_full_merge(dtype, backend):
    """FSDP shards W by rows (dim 0): a merge of each shard with its rows of b must reproduce the
    full merge bit for bit. Nearest: the shard merge as is. Stochastic: the bits are drawn from
    the global index ``i * K + j``, so a shard merge needs its row offset, which ``merge_`` does
    not take (it indexes from 0): with the offset added (here in PyTorch) the bits agree."""
    M, K, scale, seed = 37, 29, 0.75, 4242
    g = torch.Generator().manual_seed(1)
    w = torch.randn(M, K, generator=g).to(dtype)
    a = torch.randn(K, generator=g) * 1e-2
    b = torch.randn(M, generator=g)
    bounds = [0, 10, 19, 37]  # uneven shards, as torch.chunk / FSDP padding give
    for rounding in ("nearest", "stochastic"):
        full = w.clone()
        xf.merge_(full, a, b, scale, rounding, seed=seed, backend=backend)
        naive, offset = w.clone(), w.clone()
        for r0, r1 in itertools.pairwise(bounds):
            xf.merge_(naive[r0:r1], a, b[r0:r1], scale, rounding, seed=seed, backend=backend)
            if rounding == "stochastic":
                _shard_merge_stochastic_(offset[r0:r1], a, b[r0:r1], scale, seed, r0, K)
        if rounding == "nearest":
            assert torch.equal(bits_of(naive), bits_of(full))
        else:
            assert torch.equal(bits_of(offset), bits_of(full))
            # Without the offset the first shard agrees and the others draw other bits.
            assert torch.equal(bits_of(naive[:10]), bits_of(full[:10]))
            assert not torch.equal(bits_of(naive[10:]), bits_of(full[10:]))
