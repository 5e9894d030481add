"""Ahead-of-time kernel report (``xgblora_fast.tools.kernel_report``), sm_80 and sm_90, no GPU.

The report runs once, in a subprocess without ``TRITON_INTERPRET``: the test session imports the
kernels under the interpreter, and interpreter objects cannot be compiled ahead of time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.kernel_checks import run_compiled_json

from xgblora_fast.kernels.rank1_linear import GEMM_CONFIGS
from xgblora_fast.tools.kernel_report import GEMM_VARIANTS

pytestmark = pytest.mark.aot

REPO = Path(__file__).resolve().parents[2]
ARCHS = ("sm_80", "sm_90")
GEMM_KERNELS = tuple(GEMM_VARIANTS)
OTHER_KERNELS = (
    "weighted_colsum_kernel",
    "rank1_merge_kernel[nearest]",
    "rank1_merge_kernel[stochastic]",
    "rank1_merge_kernel[kahan]",
)


@pytest.fixture(scope="module")
def report() -> list[dict[str, Any]]:
    return run_compiled_json(["-m", "xgblora_fast.tools.kernel_report", "--json"])


def _rows(report: list[dict[str, Any]], kernel: str, arch: str) -> list[dict[str, Any]]:
    return [row for row in report if row["kernel"] == kernel and row["arch"] == arch]


def _expected_configs(arch: str) -> list[dict[str, int]]:
    """Every autotune config of the arch (each variant of the GEMM compiles all of them)."""
    configs = GEMM_CONFIGS[int(arch.removeprefix("sm_"))]
    return [
        {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages} for cfg in configs
    ]


def test_every_kernel_compiles_for_both_archs(report):
    for arch in ARCHS:
        for kernel in GEMM_KERNELS + OTHER_KERNELS:
            assert _rows(report, kernel, arch), f"{kernel} missing for {arch}"
    for row in report:
        assert "error" not in row, row
        assert isinstance(row["kernel"], str)
        assert row["arch"] in ARCHS
        assert isinstance(row["config"], dict)
        assert isinstance(row["config"]["num_warps"], int)
        assert isinstance(row["config"]["num_stages"], int)
        assert isinstance(row["registers"], int)
        assert 0 < row["registers"] <= 255
        assert isinstance(row["spills_bytes"], int)
        assert row["spills_bytes"] >= 0
        assert isinstance(row["shared_bytes"], int)
        assert row["shared_bytes"] >= 0
        counts = row["tensor_core_instructions"]
        assert all(isinstance(k, str) and isinstance(v, int) for k, v in counts.items())


def test_every_gemm_autotune_config_is_compiled(report):
    for arch in ARCHS:
        for kernel in GEMM_KERNELS:
            got = [row["config"] for row in _rows(report, kernel, arch)]
            assert got == _expected_configs(arch), (kernel, arch)


def test_bf16_gemm_uses_tensor_cores(report):
    for arch in ARCHS:
        for kernel in GEMM_KERNELS:
            for row in _rows(report, kernel, arch):
                # wgmma (HGMMA) needs a multiple of 64 rows per warp group: Triton compiles
                # the 16-row decode tile to mma.sync (HMMA) even on sm_90.
                use_wgmma = arch == "sm_90" and row["config"]["BLOCK_N"] >= 64
                family = "HGMMA" if use_wgmma else "HMMA"
                assert row["tensor_core_instructions"].get(family, 0) > 0, row
                assert row["ptx_mma"] > 0, row


def test_sm90_gemm_configs_do_not_spill(report):
    """Every variant and config on sm_90. (sm_80 keeps the FMA row dot, no race there; its
    4-warp 128x128 dx-with-dropout config spills 4 bytes, as it did before.)"""
    spilling = [
        (row["kernel"], row["config"], row["registers"], row["spills_bytes"])
        for kernel in GEMM_KERNELS
        for row in _rows(report, kernel, "sm_90")
        if row["spills_bytes"] != 0
    ]
    assert not spilling, spilling


def test_report_carries_the_wgmma_buffers(report):
    """sm_90 wgmma configs: every operand has ``num_stages`` shared-memory buffers (the
    invariant of tests/test_wgmma_buffers.py); mma.sync configs and sm_80 report none."""
    for row in report:
        uses_wgmma = "HGMMA" in row["tensor_core_instructions"]
        if uses_wgmma:
            stages = row["config"]["num_stages"]
            assert row["smem_buffers"], row
            assert set(row["smem_buffers"].values()) == {stages}, row
            assert row["wgmma_pendings"] >= 1, row
        else:
            assert row["smem_buffers"] == {} and row["wgmma_pendings"] is None, row


def test_table_shows_the_wgmma_buffers(report):
    from xgblora_fast.tools.kernel_report import format_table

    table = format_table(report).splitlines()
    assert "wgmma buffers" in table[0]
    [line] = [
        line
        for line in table
        if line.startswith("rank1_gemm_kernel ")
        and "sm_90" in line
        and "BLOCK_N=128 BLOCK_M=256" in line
    ]
    assert "a=3 b=3 v=3" in line and "HGMMA" in line


def test_merge_and_reduce_use_no_tensor_cores(report):
    for arch in ARCHS:
        for kernel in OTHER_KERNELS:
            for row in _rows(report, kernel, arch):
                assert row["tensor_core_instructions"] == {}, row
                assert row["ptx_mma"] == 0, row


def test_reexecs_without_interpreter(monkeypatch):
    from xgblora_fast.tools import kernel_report

    calls = []

    def fake_run(cmd, env, check):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernel_report.subprocess, "run", fake_run)
    assert kernel_report.main(["--json", "--arch", "90"]) == 3
    [(cmd, env)] = calls
    module = "xgblora_fast.tools.kernel_report"
    assert cmd == [sys.executable, "-m", module, "--json", "--arch", "90"]
    assert "TRITON_INTERPRET" not in env


def test_merge_seed_and_row_offset_are_never_specialised_by_the_jit():
    """A seed of 1 would become a constexpr Python int and break ``seed.to(tl.uint32)``; a row
    offset of 0 or 1 (every first shard) would compile its own kernel."""
    code = (
        "from xgblora_fast.kernels.merge import rank1_merge_kernel as k; "
        "print([p.do_not_specialize for p in k.params if p.name in ('seed', 'row_offset')])"
    )
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[True, True]"


def test_gemm_autotuning_is_per_shape_bucket_and_cached_across_processes():
    """N (the batch's token count) is neither specialised nor a key (N_BUCKET is), the tuned
    config is cached on disk, and no config prune depends on the call: every rank tunes over
    the same candidates for the same (M, K, N_BUCKET, stride_bk)."""
    code = (
        "from xgblora_fast.kernels.rank1_linear import rank1_gemm_kernel as k; "
        "print([p.do_not_specialize for p in k.fn.params if p.name == 'N'], k.cache_results, "
        "k.keys, k.early_config_prune)"
    )
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[True] True ['M', 'K', 'N_BUCKET', 'stride_bk'] None"
