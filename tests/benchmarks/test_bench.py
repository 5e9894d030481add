"""The benchmark tooling: roofline arithmetic, ``inspect --roofline``, tiny runs of ``bench/``.

Timings are never asserted (the machine is shared and noisy): only the arithmetic of the model,
the structure of the outputs, and that wrong providers are caught before they are timed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xgblora_fast.tools import roofline

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import microbench as mb  # noqa: E402
import microbench_providers as mbp  # noqa: E402
import microbench_report as mbr  # noqa: E402
import timing  # noqa: E402

ROW_KEYS = {
    "row",
    "path",
    "name",
    "operation",
    "flops",
    "bytes",
    "intensity",
    "bound",
    "predicted_us",
    "time_us",
    "source",
    "ratio_to_floor",
    "compile",
}
TOY = roofline.Ceilings("toy", {"bf16": 100.0, "fp16": 100.0, "fp32": 50.0}, 10.0, "test")


def _env_without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# ------------------------------------------------------------------------------------ roofline
def _cost(path: str, name: str, n: int, k: int, m: int, elt: int) -> roofline.KernelCost:
    return next(c for c in roofline.kernel_costs(n, k, m, elt) if (c.path, c.name) == (path, name))


def test_roofline_counts_by_hand():
    n, k, m, elt = 2, 3, 5, 2
    gemm = _cost("linear", "GEMM y = x W^T + bias", n, k, m, elt)
    assert gemm.flops == 2 * n * k * m + n * m  # GEMM + bias add
    assert gemm.bytes == elt * (n * k + m * k + n * m + m)  # read x, W, bias; write y
    fused = _cost("fused", "rank1_gemm_kernel", n, k, m, elt)
    # + row dot as a 16-column dot (2NK x 16, one column block here) + rank-1 FMA and bias (3NM);
    # + the [K, 4] split of a in the input dtype and fp32 b read, fp32 u written.
    assert fused.flops == 2 * n * k * m + 2 * n * k * 16 + 3 * n * m
    assert fused.bytes == gemm.bytes + elt * 4 * k + 4 * (m + n)
    dx = _cost("fused", "rank1_gemm_kernel[dx]", n, k, m, elt)
    # + row dot v (2NM x 16), rank-1 epilogue (2NK); one read of dy, the [M, 4] split of b, fp32
    # a read and v written. No column sums in the GEMM: every tile of its K loop feeds tl.dot.
    assert dx.flops == 2 * n * k * m + 2 * n * m * 16 + 2 * n * k
    assert dx.bytes == elt * (n * m + m * k + n * k) + elt * 4 * m + 4 * (k + n)
    # db and dbias: their own pass over dy (one split: one fp32 partial row each, then summed).
    db = _cost("fused", "weighted_colsum_kernel[db,dbias] (+ partial sums)", n, k, m, elt)
    assert db.bytes == elt * n * m + 4 * (n + 4 * m + 2 * m)
    assert {c.name for c in roofline.kernel_costs(n, k, m, elt) if c.path == "fused"} >= {
        "weighted_colsum_kernel[da] (+ partial sums)"
    }
    merge = _cost("fused", "rank1_merge_kernel[nearest]", n, k, m, elt)
    assert merge.bytes == 2 * elt * m * k + 4 * (m + k)  # one read, one write of W
    copy = _cost("linear", "copy W", n, k, m, elt)
    assert copy.bytes == 2 * elt * m * k and copy.flops == 0


def test_predicted_time_is_the_larger_bound():
    small = _cost("linear", "GEMM y = x W^T + bias", 2, 3, 5, 2)  # 70 FLOPs, 72 bytes
    assert small.predicted_s(TOY, "bf16") == pytest.approx(72 / 10.0)
    assert small.bound(TOY, "bf16") == "memory"
    big = _cost("linear", "GEMM y = x W^T + bias", 64, 64, 64, 2)
    assert big.flops / 100.0 > big.bytes / 10.0
    assert big.predicted_s(TOY, "bf16") == pytest.approx(big.flops / 100.0)
    assert big.bound(TOY, "bf16") == "compute"
    assert big.predicted_s(TOY, "fp32") == pytest.approx(big.flops / 50.0)


def test_peft_casts_only_half_precision():
    names16 = {c.name for c in roofline.kernel_costs(4, 8, 8, 2) if c.path == "peft"}
    names32 = {c.name for c in roofline.kernel_costs(4, 8, 8, 4) if c.path == "peft"}
    assert "x.to(fp32)" in names16 and "x.to(fp32)" not in names32
    assert names32 < names16


def test_roofline_rows_sum_kernels_into_operations():
    n, k, m = 8192, 4096, 4096
    rows = roofline.roofline_rows(n, k, m, "bf16")
    assert all(set(r) == ROW_KEYS for r in rows)
    kernels = [r for r in rows if r["row"] == "kernel"]
    ops = {(r["path"], r["operation"]): r for r in rows if r["row"] == "operation"}
    assert len(ops) == len(roofline.PATHS) * len(roofline.OPERATIONS)
    for (path, op), r in ops.items():
        members = ("forward", "backward") if op == "forward+backward" else (op,)
        mine = [c for c in kernels if c["path"] == path and c["operation"] in members]
        assert r["flops"] == sum(c["flops"] for c in mine)
        assert r["bytes"] == sum(c["bytes"] for c in mine)
        assert r["time_us"] == pytest.approx(sum(c["predicted_us"] for c in mine))
        assert r["source"] == "predicted"
        assert r["ratio_to_floor"] == pytest.approx(r["time_us"] / ops["linear", op]["time_us"])
    assert all(r["ratio_to_floor"] is None and r["source"] == "predicted" for r in kernels)
    # The model's headline: the GEMM dominates the fused path (plus the sm_90 row dot's 16
    # columns per 256-column block of tensor-core work); peft moves several times more.
    rowdot_share = roofline.ROWDOT_COLUMNS / roofline.FUSED_BLOCK_M
    assert 1.0 < ops["fused", "forward"]["ratio_to_floor"] < 1.0 + rowdot_share + 0.01
    assert ops["peft", "forward+backward"]["bytes"] > 5 * ops["fused", "forward+backward"]["bytes"]
    gemm_flops = 2 * n * k * m
    assert ops["linear", "forward+backward"]["flops"] == 2 * gemm_flops + n * m
    assert roofline.operation_cost("merge", n, k, m, 2)[1] == 2 * 2 * m * k + 4 * (m + k)


def test_measured_numbers_replace_predictions(tmp_path):
    n, k, m = 256, 768, 3072
    providers = [roofline.PROVIDER_FLOOR, roofline.provider_fused("triton"), "peft LoRA r=1"]
    shape = {"N": n, "K": k, "M": m, "dtype": "bf16"}
    rows = [
        {"operation": "forward", "provider": p, "p50_ms": t, **shape}
        for p, t in zip(providers, (0.1, 0.11, 0.2), strict=True)
    ]
    rows.append(dict(rows[0], N=n + 1, p50_ms=9.0))  # another N: ignored
    path = tmp_path / "microbench_cuda.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    measured = roofline.load_measured(path, n, k, m, "bf16")
    out = roofline.roofline_rows(n, k, m, "bf16", measured=measured)
    fwd = {r["path"]: r for r in out if r["row"] == "operation" and r["operation"] == "forward"}
    assert {r["source"] for r in fwd.values()} == {"measured"}
    assert fwd["fused"]["time_us"] == pytest.approx(110.0)
    assert fwd["peft"]["ratio_to_floor"] == pytest.approx(2.0)
    assert fwd["fused"]["predicted_us"] != fwd["fused"]["time_us"]
    others = [r for r in out if r["row"] == "operation" and r["operation"] != "forward"]
    assert {r["source"] for r in others} == {"predicted"}
    assert roofline.load_measured(tmp_path / "missing.json", n, k, m, "bf16") is None


def test_compile_rows_join_the_triton_kernels():
    compiled = [
        {
            "kernel": "rank1_gemm_kernel[dx]",
            "arch": "sm_90",
            "dtype": "bf16",
            "config": {"BLOCK_N": 128, "num_warps": 8},
            "registers": 168,
            "spills_bytes": 0,
            "stack_bytes": 0,
            "shared_bytes": 98304,
            "tensor_core_instructions": {"HGMMA": 8},
            "ptx_mma": 8,
        },
        {
            "kernel": "weighted_colsum_kernel",
            "arch": "sm_80",
            "dtype": "bf16",
            "config": {"BLOCK_N": 32},
            "registers": 40,
            "spills_bytes": 0,
            "stack_bytes": 0,
            "shared_bytes": 0,
            "tensor_core_instructions": {},
            "ptx_mma": 0,
        },
    ]
    rows = roofline.roofline_rows(64, 64, 64, "bf16", compile_rows=compiled)
    by_name = {r["name"]: r for r in rows if r["row"] == "kernel"}
    [dx] = by_name["rank1_gemm_kernel[dx]"]["compile"]["sm_90"]
    assert dx["registers"] == 168 and dx["tensor_core_instructions"] == {"HGMMA": 8}
    assert "ptx_mma" not in dx
    da = by_name["weighted_colsum_kernel[da] (+ partial sums)"]
    assert da["compile"]["sm_80"][0]["registers"] == 40
    assert by_name["rank1_gemm_kernel"]["compile"] == {}
    assert all(r["compile"] == {} for r in rows if r["path"] != "fused")
    text = roofline.format_roofline(rows, 64, 64, 64, "bf16")
    assert "PREDICTIONS" in text and "sm_90" in text and "HGMMAx8" in text


def test_inspect_roofline_json():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xgblora_fast.tools.kernel_report",
            "--roofline",
            "--json",
            "--no-compile",
            "--shape",
            "256",
            "768",
            "3072",
            "--measured",
            str(REPO / "no-such-file.json"),
        ],
        cwd=REPO,
        env=_env_without_interpreter(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    assert {r["path"] for r in rows} == set(roofline.PATHS)
    assert {r["source"] for r in rows} == {"predicted"}
    fused_fwd = next(r for r in rows if r["name"] == "rank1_gemm_kernel")
    # GEMM + the row dot as a 16-column dot in each of the 12 column blocks + rank-1 epilogue.
    assert fused_fwd["flops"] == 2 * 256 * 768 * 3072 + 2 * 256 * 768 * 16 * 12 + 3 * 256 * 3072


# ------------------------------------------------------------------------------------ microbench
def test_microbench_tiny_run(tmp_path):
    argv = ["--device", "cpu", "--shape", "48x40", "--tokens", "1", "5", "--rounds", "2"]
    argv += ["--min-sample-ms", "1", "--threads", str(torch.get_num_threads())]
    argv += ["--out", str(tmp_path), "--tag", "_t"]
    assert mb.main(argv) == 0
    stem = tmp_path / "microbench_cpu_t"
    with stem.with_suffix(".csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == timing.COLUMNS
        rows = list(reader)
    layer_providers = {
        mbp.PROVIDER_FLOOR,
        mbp.provider_fused("torch"),
        mbp.PROVIDER_PEFT_R1,
        mbp.PROVIDER_PEFT_R8,
        mbp.PROVIDER_UNFUSED,
    }
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["operation"], r["N"]), {})[r["provider"]] = r
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert (r["M"], r["K"], r["dtype"], r["device"]) == ("48", "40", "fp32", "cpu")
    assert set(groups) == {(op, n) for op in mbp.LAYER_OPS for n in ("1", "5")} | {("merge", "0")}
    for (op, _), by_provider in groups.items():
        floor = mbp.PROVIDER_COPY if op == "merge" else mbp.PROVIDER_FLOOR
        assert float(by_provider[floor]["ratio_to_floor"]) == 1.0
        if op != "merge":
            assert set(by_provider) == layer_providers
    merge_names = set(groups["merge", "0"])
    assert merge_names == {
        mbp.PROVIDER_COPY,
        mbp.provider_fused("torch"),
        mbp.provider_bound_kept("torch"),
        mbp.PROVIDER_PEFT_R1,
        mbp.PROVIDER_UNFUSED,
        mbp.PROVIDER_NAIVE,
    }
    data = json.loads(stem.with_suffix(".json").read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["ceilings"]["copy_gbps"] > 0
    summary = stem.with_suffix(".md").read_text()
    assert "## Goals (issue #5)" in summary and "## merge" in summary
    for suffix in ("_fwdbwd.png", "_merge.png"):
        assert (tmp_path / f"microbench_cpu_t{suffix}").stat().st_size > 0


def test_every_provider_matches_the_reference():
    problem = mbp.make_problem(24, 40, "fp32", "cpu", seed=3)
    x, dy = mbp.make_inputs(problem, 7, 1)[0]
    for provider in mbp.build_providers(problem, "cpu"):
        errors = mbp.check_provider(provider, problem, x, dy)
        assert max(errors.values()) < 1e-5, (provider.name, errors)
        assert ("da" in errors) == (provider.name != mbp.PROVIDER_FLOOR)


def test_a_wrong_provider_is_caught_before_timing():
    problem = mbp.make_problem(24, 40, "fp32", "cpu", seed=4)
    x, dy = mbp.make_inputs(problem, 7, 1)[0]
    wrong = mbp.unfused_provider(problem)
    wrong.module.scale = 1.5 * mbp.SCALE  # the reference uses SCALE: y and all grads disagree
    with pytest.raises(AssertionError, match="disagrees with the float64 reference"):
        mbp.check_provider(wrong, problem, x, dy)
    naive = mbp.naive_provider(problem)
    double = mbp.Provider("double merge", None, None, 1, lambda: (naive.merge(), naive.merge()))
    with pytest.raises(AssertionError, match="merge disagrees"):
        mbp.check_merge(double, problem)


def test_goals_on_synthetic_rows():
    def row(op, provider, n, ratio):
        return {
            "operation": op,
            "provider": provider,
            "M": 64,
            "K": 64,
            "N": n,
            "dtype": "fp32",
            "ratio_to_floor": ratio,
        }

    fused = mbp.provider_fused("torch")
    rows = [row("forward+backward", mbp.PROVIDER_FLOOR, n, 1.0) for n in (1, 256)]
    rows += [row("forward+backward", fused, 1, 1.5), row("forward+backward", fused, 256, 1.05)]
    rows += [row("forward+backward", mbp.PROVIDER_PEFT_R1, n, 1.2) for n in (1, 256)]
    memory = {
        "rows": [
            {"kind": "merge", "provider": fused, "M": 64, "K": 64, "dtype": "fp32"}
            | {"weight_mib": 100.0, "extra_mib": 48.0}
        ]
    }
    goals = mbr.evaluate_goals(rows, {"device": "cpu"}, memory)
    assert [held for _, _, held in goals] == [False, True, True]
    assert "worst 1.500 at 64x64 N=1" in goals[0][1]
    assert mbr.evaluate_goals(rows, {"device": "cpu"}, None)[2][2] is None


def test_gpu_merge_goal_is_held_against_the_steady_state_merge():
    """Training merges keep the bound on max|W| (no safety pass): the goal reads that provider."""
    fused = mbp.provider_fused("triton")
    shape = {"M": 64, "K": 64, "N": 0, "dtype": "bf16", "ratio_to_floor": 1.0}
    rows = [
        {"operation": "merge", "provider": fused, "gbps": 2000.0, **shape},
        {"operation": "merge", "provider": mbp.provider_bound_kept("triton"), **shape}
        | {"gbps": 2700.0},
    ]
    rows += [
        {"operation": "forward+backward", "provider": p, **shape, "N": 4096}
        for p in (mbp.PROVIDER_FLOOR, fused, mbp.PROVIDER_PEFT_R1)
    ]
    meta = {"device": "cuda", "ceilings": {"copy_gbps": 3000.0}}
    merge_goal = mbr.evaluate_goals(rows, meta, None)[-1]
    assert "W bound kept" in merge_goal[0] and merge_goal[2] is True
    assert "worst 0.900" in merge_goal[1]
    rows[1]["gbps"] = 2400.0
    assert mbr.evaluate_goals(rows, meta, None)[-1][2] is False


def test_bound_kept_merge_matches_the_reference():
    problem = mbp.make_problem(24, 40, "fp32", "cpu", seed=5)
    provider = mbp.bound_kept_provider(problem, "torch")
    for _ in range(2):  # the second merge runs on the bound the first returned
        assert mbp.check_merge(provider, problem) < 1e-6


def test_rounds_rotate_the_order_and_rows_take_percentiles():
    class Recorder:
        """A timer whose samples are given, not measured; it records the order of the calls."""

        def __init__(self) -> None:
            self.order: list[str] = []

        def calibrate(self, fn) -> int:
            return 1

        def sample(self, fn, calls: int) -> list[float]:
            return [fn()]

    timer = Recorder()
    floor_ms = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    ours_ms = iter([2.0, 4.0, 6.0, 8.0, 10.0])

    def call(name: str, values) -> float:
        timer.order.append(name)
        return next(values)

    fns = {"floor": lambda: call("floor", floor_ms), "ours": lambda: call("ours", ours_ms)}
    samples = timing.time_interleaved(fns, timer, rounds=5)
    assert timer.order == ["floor", "ours", "ours", "floor"] * 2 + ["floor", "ours"]
    problem = mbp.make_problem(8, 4, "fp32", "cpu")
    rows = {
        r["provider"]: r
        for r in timing.tidy_rows("forward", samples, "floor", problem, 3, "cpu", "toy")
    }
    assert all(tuple(r) == timing.COLUMNS for r in rows.values())
    ours = rows["ours"]
    assert (ours["p20_ms"], ours["p50_ms"], ours["p80_ms"]) == pytest.approx((3.6, 6.0, 8.4))
    assert ours["ratio_to_floor"] == pytest.approx(2.0) and rows["floor"]["ratio_to_floor"] == 1.0
    flops, nbytes = roofline.operation_cost("forward", 3, 4, 8, 4)
    assert ours["tflops"] == pytest.approx(flops / 6e-3 / 1e12)
    assert ours["gbps"] == pytest.approx(nbytes / 6e-3 / 1e9) and ours["samples"] == 5


# ------------------------------------------------------------------------------------ scripts
def test_memory_quick_run(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "memory.py"), "--quick", "--device", "cpu"]
    cmd += ["--methods", "xgblora", "--merges", "xgblora", "naive", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "memory_cpu_quick.json").read_text())
    train, *merges = data["rows"]
    assert train["kind"] == "training" and train["key"] == "xgblora"
    assert train["trainable_params"] > 0 and train["peak_delta_mib"] > 0
    assert [m["key"] for m in merges] == ["xgblora", "naive"]
    for m in merges:
        assert m["kind"] == "merge" and m["weight_mib"] == 64.0 and m["extra_mib"] >= 0
    naive = merges[1]
    assert naive["extra_over_weight"] > 0.9  # torch.outer(b, a) is a full-size temporary
    assert (tmp_path / "memory_cpu_quick.md").is_file()
    assert (tmp_path / "memory_cpu_quick.png").is_file()


def test_pytest_benchmark_file_runs():
    cmd = [sys.executable, "-m", "pytest", str(REPO / "bench" / "bench_pytest.py")]
    cmd += ["--benchmark-disable", "-q", "-p", "no:cacheprovider", "-k", "768x768-N1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "21 passed" in proc.stdout


def test_path_comparison_counts_the_cublas_paths_extra_passes():
    """The cuBLAS path = the frozen GEMMs + passes over x, y (read+write), dy, dx (read+write),
    x and dy for the rank-1 parts; the fused path folds them into its GEMM."""
    n, k, m, elt = 4096, 1024, 2048, 2
    costs = {c.name: c for c in roofline.cublas_path_costs(n, k, m, elt)}
    assert (
        costs["cuBLAS y = x W^T + bias"].bytes
        == _cost("linear", "GEMM y = x W^T + bias", n, k, m, elt).bytes
    )
    assert costs["rank1_epilogue_kernel y += s u b^T"].bytes == 2 * elt * n * m + 4 * (n + m)
    assert costs["rowdot_kernel u = x.a"].bytes == elt * n * k + 4 * (k + n)
    rows = {r["operation"]: r for r in roofline.path_comparison(n, k, m, "bf16")}
    assert list(rows) == ["forward", "backward", "forward+backward"]
    fwd = rows["forward"]
    extra_bytes = fwd["cublas_bytes"] - fwd["linear_bytes"]
    assert extra_bytes == elt * n * k + 4 * (k + n) + 2 * elt * n * m + 4 * (n + m)
    for r in rows.values():
        assert r["linear_us"] <= r["fused_us"] < r["cublas_us"]
        assert r["cublas_over_fused"] == pytest.approx(r["cublas_us"] / r["fused_us"])
    both = rows["forward+backward"]
    assert both["cublas_us"] == pytest.approx(
        rows["forward"]["cublas_us"] + rows["backward"]["cublas_us"]
    )
    # Decode-sized N: weight-bound, the extra passes cost next to nothing.
    decode = roofline.path_comparison(16, 4096, 4096, "bf16")[2]
    assert decode["cublas_over_linear"] < 1.05
    with pytest.raises(ValueError, match="dtype"):
        roofline.path_comparison(16, 8, 8, "int8")
