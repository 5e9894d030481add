"""Replica checks (``xf.verify_replicas``) and per-shard merges (FSDP2).

Multi-process runs use gloo on CPU: the Booster verifies at every round end that all ranks hold
bit-identical weights; a rank whose weight is perturbed, or that runs another seed, is named in
a RuntimeError instead of drifting apart silently. Under FSDP2 (``fully_shard``) each rank merges
its own rows of W with their global row offset, and the gathered weights are bit for bit those
of a single-process run.
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
from helpers.kernel_checks import bits_of
from helpers.process_group import free_port, leave_process_group
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor

import xgblora_fast as xf
from xgblora_fast.boosting.distributed import verify_replicas, weights_checksum
from xgblora_fast.boosting.strategies import Redraw

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
        cfg = xf.XGBLoRAConfig(
            kappa=KAPPA, kappa_growth=1.0, layers_per_round=2, rounding="stochastic", seed=seed
        )
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
    leave_process_group()


def _spawn(tmp_path, world: int, mode: str, worker=_worker) -> list[dict]:
    mp.spawn(worker, args=(world, free_port(), str(tmp_path), mode), nprocs=world, join=True)
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
        # Caught before the gradient init's collectives when the seeds picked other layers,
        # else by the checksums at the round's end; either way on every rank, never a hang.
        assert "ranks split into [0] vs [1]" in r["error"]
        assert (
            "disagree on the active layers of round 0" in r["error"]
            or "replicas diverged after round 0" in r["error"]
        ), r["error"]


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_shard_merges_equal_rows_of_the_full_merge(dtype, backend):
    """FSDP shards W by rows (dim 0): merging each row block ``r0:r1`` alone, with ``b[r0:r1]``,
    ``row_offset=r0`` (and its rows of the Kahan buffer), writes the bits of the full merge.
    Stochastic bits come from the global index ``(row_offset + i) * K + j``: with
    ``row_offset=0`` only the first block would agree."""
    M, K, scale, seed = 37, 29, 0.75, 4242
    g = torch.Generator().manual_seed(1)
    w = torch.randn(M, K, generator=g).to(dtype)
    a = torch.randn(K, generator=g) * 1e-2
    b = torch.randn(M, generator=g)
    comp = (torch.randn(M, K, generator=g) * 1e-3).to(dtype)
    bounds = [0, 10, 19, 37]  # uneven shards, as torch.chunk / FSDP padding give
    for rounding in ("nearest", "stochastic", "kahan"):
        kahan = rounding == "kahan"
        full, c_full = w.clone(), comp.clone() if kahan else None
        xf.merge_(full, a, b, scale, rounding, seed, backend, c_full)
        shards, c_shards, naive = w.clone(), comp.clone() if kahan else None, w.clone()
        for r0, r1 in itertools.pairwise(bounds):
            c = c_shards[r0:r1] if kahan else None
            xf.merge_(shards[r0:r1], a, b[r0:r1], scale, rounding, seed, backend, c, r0)
            if rounding == "stochastic":
                xf.merge_(naive[r0:r1], a, b[r0:r1], scale, rounding, seed, backend)
        assert torch.equal(bits_of(shards), bits_of(full)), rounding
        if kahan:
            assert torch.equal(bits_of(c_shards), bits_of(c_full))
        if rounding == "stochastic" and dtype != torch.float32:  # fp32 rounds to nearest
            assert torch.equal(bits_of(naive[:10]), bits_of(full[:10]))
            assert not torch.equal(bits_of(naive[10:19]), bits_of(full[10:19]))
            assert not torch.equal(bits_of(naive[19:]), bits_of(full[19:]))


@pytest.mark.parametrize("row_offset", [-1, 1.0, True, 2**62])
def test_row_offset_must_be_a_nonnegative_int_within_int64_indices(row_offset):
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises((TypeError, ValueError), match="row_offset"):
        xf.merge_(w, torch.ones(8), torch.ones(4), 1.0, "stochastic", 1, row_offset=row_offset)
    assert not w.any()


FSDP_ROUNDS = 3


def _fsdp_model() -> nn.Module:
    """Uneven row counts over 2 ranks: W [7, 12] -> 4 + 3 rows, [5, 7] -> 3 + 2, [1, 5] -> 1 + 0."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1)
    ).to(torch.bfloat16)


def _boost(shard: bool, guided: bool = False) -> dict[str, list]:
    """``FSDP_ROUNDS`` rounds of stochastic merges; the full weights' bits per layer.

    ``guided``: gradient-aligned boosters and gradient-norm selection (the defaults), else the
    paper's random init and uniform selection."""
    model = _fsdp_model()
    # verify_replicas compares replicated weights: sharded ones are refused.
    cfg = xf.XGBLoRAConfig(
        kappa=KAPPA,
        kappa_growth=1.0,
        layers_per_round=2,
        rounding="stochastic",
        seed=11,
        verify_replicas=False,
        booster_init="gradient" if guided else "random",
        select="gradient" if guided else "uniform",
        rewarm_steps=3,  # finds the boosters' groups by the Parameters fully_shard put in place
    )
    booster = xf.Booster(model, cfg)
    if shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in booster.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=5e-2)
    booster.attach(optimizer)
    # The same data on every rank: FSDP averages identical gradients, exactly, so the run is
    # the single-process one unless a merge or re-init differs.
    torch.manual_seed(100)
    for _ in range(FSDP_ROUNDS * KAPPA):
        x = torch.randn(8, 12)
        loss = nn.functional.mse_loss(model(x.bfloat16()).float(), x[:, :1].sin())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
    assert booster.round == FSDP_ROUNDS
    out = {}
    for name, layer in booster.layers.items():
        w = layer.weight.full_tensor() if shard else layer.weight
        out[name] = bits_of(w.detach()).tolist()
    return out


def _refusals(mesh) -> dict[str, str]:
    """The NotImplementedError message of each unsupported call on a DTensor weight."""
    sharded = xf.FastRank1Linear(6, 5, dtype=torch.bfloat16)
    fully_shard(sharded, mesh=mesh)
    replicated = xf.FastRank1Linear(6, 5, dtype=torch.bfloat16)
    replicated.weight = nn.Parameter(
        distribute_tensor(replicated.weight.detach(), mesh, [Replicate()]), requires_grad=False
    )
    refused = {}
    for what, call in (
        ("kahan", lambda: sharded.merge_("kahan")),
        ("redraw", lambda: Redraw().plan(sharded, 1.0, 0.5, torch.Generator())),
        ("merged_weight", sharded.merged_weight),
        ("to_linear", sharded.to_linear),
        ("replicate", lambda: replicated.merge_("stochastic", seed=3)),
    ):
        with pytest.raises(NotImplementedError) as info:
            call()
        refused[what] = str(info.value)
    return refused


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict = {"rank": rank}
    try:
        result["weights"] = _boost(shard=True)
        result["weights_guided"] = _boost(shard=True, guided=True)
        result["refused"] = _refusals(init_device_mesh("cpu", (world,)))
    except BaseException as e:  # pytest.raises fails with an Exception subclass too
        result["error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    leave_process_group()


@pytest.mark.slow
def test_fsdp2_boosting_gathers_the_single_process_weights_bit_for_bit(tmp_path):
    """Booster rounds of stochastic merges on ``fully_shard``-ed layers (uneven row shards, one
    empty) gather to the weights of the same run in one process, with random boosters and with
    gradient-aligned ones (each rank writes its rows of ``a`` and of the gradients); Kahan,
    merged_weight and to_linear on sharded layers, and merges of replicated DTensors, are refused
    clearly."""
    results = _spawn(tmp_path, 2, "fsdp", worker=_fsdp_worker)
    single = _boost(shard=False)
    single_guided = _boost(shard=False, guided=True)
    assert single["0"] != bits_of(_fsdp_model()[0].weight).tolist()  # merged
    assert single_guided != single  # the gradient init and selection change the run
    for r in results:
        assert "error" not in r, r
        assert r["weights"] == single
        assert r["weights_guided"] == single_guided
        refused = r["refused"]
        assert "FSDP2-sharded weight" in refused["kahan"]
        assert "booster_init='redraw' on an FSDP2-sharded weight" in refused["redraw"]
        assert "full_tensor()" in refused["merged_weight"]
        assert "full_tensor()" in refused["to_linear"]
        assert "(Replicate(),)" in refused["replicate"]
