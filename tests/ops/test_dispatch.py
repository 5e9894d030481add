"""Path selection of the Triton backend (``ops/dispatch.py``) on CPU, with an injected timer,
comparator and device description: the choice, its disk cache, the overrides, and rank
agreement over gloo."""

import json
import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.kernel_checks import make_inputs, rel_err
from helpers.process_group import free_port, leave_process_group

import xgblora_fast as xf
from xgblora_fast.ops import dispatch
from xgblora_fast.ops.dispatch import (
    CACHE_FILE,
    DECODE_MAX_N,
    PATH_ENV,
    PathSelector,
    bucket_key,
    n_bucket,
)

CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "version": xf.__version__}
KEY = bucket_key("forward", torch.bfloat16, 4096, 4096, 4096, "bias1drop0")


class Harness:
    """A selector whose timer returns set times and whose comparator returns a set error."""

    def __init__(self, folder, fused_s=1.0, cublas_s=2.0, error=0.0, info=H100):
        self.times = {"fused": fused_s, "cublas": cublas_s}
        self.error = error
        self.timed: list[str] = []
        self.compared = 0
        self.selector = PathSelector(
            timer=self.timer,
            comparator=self.compare,
            device_info=lambda device: dict(info),
            cache_path=lambda: folder / CACHE_FILE,
        )
        self.ran: list[str] = []
        self.runners = {
            name: (lambda name=name: self.ran.append(name) or name) for name in self.times
        }

    def timer(self, name, run):
        self.timed.append(name)
        run()
        return self.times[name]

    def compare(self, fused, cublas, dtype):
        assert (fused, cublas) == ("fused", "cublas")
        self.compared += 1
        return self.error <= 1e-2, self.error, 1e-2

    def choose(self, key=KEY, n=4096, backend="auto", device=CUDA):
        return self.selector.choose(backend, device, key, n, torch.bfloat16, self.runners)


@pytest.fixture(autouse=True)
def no_forced_path(monkeypatch):
    monkeypatch.delenv(PATH_ENV, raising=False)


def test_fused_faster_and_agreeing_is_chosen_and_cached(tmp_path):
    h = Harness(tmp_path, fused_s=1.0, cublas_s=2.0)
    assert h.choose() == "fused"
    assert sorted(h.timed) == ["cublas", "fused"] and h.compared == 1
    assert h.choose() == "fused" and len(h.timed) == 2  # in-memory: no second timing
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    (entry,) = data.values()
    assert entry["device"] == H100
    record = entry["choices"][KEY]
    assert record["path"] == "fused" and record["fused_s"] == 1.0 and record["cublas_s"] == 2.0
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_FILE]  # no temporary left over


def test_fused_slower_goes_to_cublas(tmp_path):
    h = Harness(tmp_path, fused_s=2.0, cublas_s=1.0)
    assert h.choose() == "cublas"
    assert h.compared == 1


def test_mismatch_warns_with_the_figures_and_disables_fused(tmp_path, caplog):
    h = Harness(tmp_path, fused_s=0.5, cublas_s=1.0, error=0.25)
    with caplog.at_level(logging.WARNING, logger="xgblora_fast"):
        assert h.choose() == "cublas"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "2.500e-01" in message and "1.0e-02" in message and KEY in message
    # The bucket stays on cuBLAS in this process and in the next one (cache).
    assert h.choose() == "cublas"
    h2 = Harness(tmp_path, fused_s=0.5, cublas_s=1.0)
    assert h2.choose() == "cublas" and h2.timed == []


def test_cache_hit_needs_no_timing(tmp_path):
    Harness(tmp_path, fused_s=1.0, cublas_s=2.0).choose()
    h = Harness(tmp_path, fused_s=9.0, cublas_s=1.0)  # a fresh process: reads the cache
    assert h.choose() == "fused"
    assert h.timed == [] and h.compared == 0 and h.ran == []
    # Another bucket is timed.
    other = bucket_key("forward", torch.bfloat16, 8192, 4096, 4096, "bias1drop0")
    assert h.choose(key=other) == "cublas" and sorted(h.timed) == ["cublas", "fused"]
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    (entry,) = data.values()
    assert set(entry["choices"]) == {KEY, other}  # merged, not overwritten


@pytest.mark.parametrize("field", ["gpu", "driver", "version"])
def test_cache_of_another_gpu_driver_or_version_is_ignored(tmp_path, field):
    Harness(tmp_path, fused_s=1.0, cublas_s=2.0).choose()
    info = dict(H100, **{field: "something else"})
    h = Harness(tmp_path, fused_s=2.0, cublas_s=1.0, info=info)
    assert h.choose() == "cublas"
    assert sorted(h.timed) == ["cublas", "fused"]
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    assert len(data) == 2  # both devices' choices kept


def test_corrupt_cache_is_ignored_and_replaced(tmp_path):
    (tmp_path / CACHE_FILE).write_text("{not json")
    h = Harness(tmp_path)
    assert h.choose() == "fused"
    assert json.loads((tmp_path / CACHE_FILE).read_text())


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XGBLORA_FAST_CACHE", str(tmp_path))
    assert dispatch.cache_file() == tmp_path / CACHE_FILE


@pytest.mark.parametrize("forced", ["fused", "cublas"])
def test_env_override(tmp_path, monkeypatch, forced):
    monkeypatch.setenv(PATH_ENV, forced)
    h = Harness(tmp_path, fused_s=1.0, cublas_s=2.0)
    assert h.choose() == forced
    assert h.choose(n=1) == forced
    assert h.choose(backend="triton") == forced
    assert h.timed == [] and not (tmp_path / CACHE_FILE).exists()


def test_env_override_must_name_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv(PATH_ENV, "fastest")
    with pytest.raises(ValueError, match=PATH_ENV):
        Harness(tmp_path).choose()


def test_decode_sized_n_goes_to_cublas_untimed(tmp_path):
    h = Harness(tmp_path, fused_s=1.0, cublas_s=2.0)
    for n in (1, 7, DECODE_MAX_N):
        assert h.choose(n=n) == "cublas"
    assert h.timed == []
    assert h.choose(n=DECODE_MAX_N + 1) == "fused"


def test_explicit_triton_backend_and_cpu_run_the_fused_path(tmp_path):
    h = Harness(tmp_path, fused_s=2.0, cublas_s=1.0)
    assert h.choose(backend="triton") == "fused"
    assert h.choose(device=torch.device("cpu")) == "fused"
    assert h.timed == []


def test_buckets():
    assert [n_bucket(n) for n in (1, 2, 3, 17, 32, 33, 4096, 4097)] == [
        1,
        2,
        4,
        32,
        32,
        64,
        4096,
        8192,
    ]
    assert bucket_key("forward", torch.float16, 33, 5, 7, "v") == "forward|float16|n64|k5|m7|v"


def test_auto_on_cpu_is_still_torch(monkeypatch):
    """The selector is never consulted for CPU tensors under backend="auto"."""

    def boom(*args):
        raise AssertionError("selector consulted")

    monkeypatch.setattr(dispatch.SELECTOR, "choose", boom)
    x, weight, bias, a, b, _ = make_inputs((20,), 12, 9, torch.float32, True, seed=0)
    y = xf.rank1_linear(x, weight, bias, a, b, 0.5)
    assert (
        rel_err(
            y,
            x.double() @ weight.double().t()
            + bias.double()
            + 0.5 * (x.double() @ a.double())[:, None] * b.double(),
        )
        < 1e-6
    )


def test_triton_backend_asks_the_selector_per_op(monkeypatch):
    """backend="triton": forward and backward each ask with their own bucket; the answer runs."""
    seen = []

    def choose(backend, device, key, n, dtype, runners):
        seen.append((backend, key, n, dtype, sorted(runners)))
        return "cublas"

    monkeypatch.setattr(dispatch.SELECTOR, "choose", choose)
    x, weight, bias, a, b, dy = make_inputs((3, 7), 12, 9, torch.float16, True, seed=0)
    xl = x.clone().requires_grad_()
    y = xf.rank1_linear(xl, weight, bias, a.requires_grad_(), b, 0.5, backend="triton")
    y.backward(dy)
    assert [s[1].split("|")[0] for s in seen] == ["forward", "backward"]
    assert seen[0] == (
        "triton",
        "forward|float16|n32|k12|m9|bias1drop0",
        21,
        torch.float16,
        ["cublas", "fused"],
    )
    assert seen[1][1] == "backward|float16|n32|k12|m9|need110drop0"


def test_measure_runs_both_paths_on_the_real_inputs_and_compares(tmp_path):
    """The default comparator on the real fused and cuBLAS paths (interpreter): they agree."""
    from xgblora_fast.ops.rank1_linear import _forward_cublas, _forward_triton

    x, weight, bias, a, b, _ = make_inputs((40,), 24, 20, torch.float32, True, seed=2)
    selector = PathSelector(
        timer=lambda name, run: {"fused": 1.0, "cublas": 3.0}[name],
        device_info=lambda device: dict(H100),
        cache_path=lambda: tmp_path / CACHE_FILE,
    )
    runners = {
        "fused": lambda: _forward_triton(x, weight, bias, a, b, 0.5, None),
        "cublas": lambda: _forward_cublas(x, weight, bias, a, b, 0.5, None),
    }
    assert selector.choose("auto", CUDA, KEY, 40, torch.float32, runners) == "fused"
    record = json.loads((tmp_path / CACHE_FILE).read_text())
    (entry,) = record.values()
    assert entry["choices"][KEY]["agree"] and entry["choices"][KEY]["error"] < 1e-5


# --- rank agreement over gloo ------------------------------------------------------------------


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.pop(PATH_ENV, None)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pathlib import Path

        folder = Path(out_dir) / f"cache{rank}"
        folder.mkdir()
        # Each rank's own timings would pick differently: rank 0 says fused, rank 1 cublas.
        h = Harness(folder, fused_s=1.0 + 2 * rank, cublas_s=2.0)
        first = h.choose()
        second = h.choose()  # memoised: no collective
        other = bucket_key("backward", torch.bfloat16, 64, 8, 8, f"rank{rank}")
        with_mismatch = h.choose(key=other)  # ranks disagree on the bucket: cuBLAS, warned
        result = {"first": first, "second": second, "mismatch": with_mismatch, "timed": h.timed}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        leave_process_group()


def test_ranks_run_the_path_rank_0_chose(tmp_path):
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["first"] == r1["first"] == "fused"
    assert r0["second"] == r1["second"] == "fused"
    assert r1["timed"] == []  # only rank 0 measures
    assert sorted(r0["timed"]) == ["cublas", "cublas", "fused", "fused"]
    assert r1["mismatch"] == "cublas"
    assert not (tmp_path / "cache1" / CACHE_FILE).exists()  # only rank 0 writes the cache


def test_agreement_treats_nan_as_a_mismatch():
    good = torch.ones(4, 3)
    bad = good.clone()
    bad[1, 2] = float("nan")
    assert dispatch.agreement((good, None), (good.clone(), None), torch.float32)[0]
    for f, c in ((bad, good), (good, bad)):
        ok, err, _ = dispatch.agreement(f, c, torch.float32)
        assert not ok and err == float("inf")
    assert not dispatch.agreement((good,), (good, good), torch.float32)[0]
    assert not dispatch.agreement(good, good[:2], torch.float32)[0]


def test_a_failing_fused_path_falls_back_to_cublas(tmp_path, caplog):
    h = Harness(tmp_path, fused_s=0.1, cublas_s=1.0)

    def broken():
        raise RuntimeError("no kernel for this GPU")

    h.runners["fused"] = broken
    with caplog.at_level(logging.WARNING, logger="xgblora_fast"):
        assert h.choose() == "cublas"
    assert "no kernel for this GPU" in caplog.text and h.timed == []
    (entry,) = json.loads((tmp_path / CACHE_FILE).read_text()).values()
    assert entry["choices"][KEY]["failed"] == "RuntimeError"


def test_device_description_is_read_once_per_device(tmp_path):
    """The driver version comes from a file: a call after the first asks nothing of the device
    (it is on the path of every forward and backward)."""
    h = Harness(tmp_path)
    asked = []
    h.selector.device_info = lambda device: asked.append(device) or dict(H100)
    for n in (4096, 4096, 2048, 1024):
        h.choose(key=bucket_key("forward", torch.bfloat16, n, 64, 64), n=n)
    assert asked == [CUDA]
