"""No shared-memory race between asynchronous wgmma and the pipelined loads, sm_90, no GPU.

On sm_90 ``tl.dot`` compiles to an asynchronous wgmma that reads its operands from shared memory
while the software pipeliner's loads for later K iterations land in other buffers of the same
multi-buffered allocation. With ``S = num_stages`` the loop keeps ``S - 1`` loads in flight
(buffers of iterations ``i+1 .. i+S-1``) and, after ``ttng.warp_group_dot_wait {pendings = P}``,
the wgmma of the last ``ceil(P / D)`` iterations (``D`` wgmma per iteration) still reading theirs.
The invariant, for every wgmma operand in shared memory:

    buffers == S   and   buffers >= (S - 1) + ceil(P / D)

so the buffer a load writes is never one an unfinished wgmma reads; and every operand of the loop
has the same number of buffers (a tile with fewer would be recycled ahead of the others). Triton
gives the extra buffer only to tiles whose every user is a dot (Triton issue 6691): the kernel
before this test computed the row dot and column sums from the ``x``/``dy`` tile with ``tl.sum``,
and the 128x256x64/3-stage config got 2 buffers for it, 3 for ``W``, ``P = 1``: a race.
``test_checker_catches_the_race`` keeps that case as a negative control.

The configs are compiled ahead of time in a subprocess without ``TRITON_INTERPRET`` with
``xgblora_fast.tools.kernel_report`` (the jobs of ``python -m xgblora_fast.tools.kernel_report``),
bf16 and fp16 (fp32 with IEEE ``tl.dot`` uses no wgmma).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import triton
import triton.language as tl
from helpers.kernel_checks import run_compiled_json

from xgblora_fast.kernels.rank1_linear import GEMM_CONFIGS
from xgblora_fast.tools.kernel_report import GEMM_VARIANTS

pytestmark = pytest.mark.aot

REPO = Path(__file__).resolve().parents[2]
DTYPES = ("bf16", "fp16")

_COMPILE = """
import json, sys
from xgblora_fast.tools import kernel_report as I
jobs = [job for dtype in sys.argv[1].split(",") for job in I.gemm_jobs(90, dtype)]
print(json.dumps(I.compile_jobs(jobs, 2)))
"""


def _compile(dtypes: tuple[str, ...]) -> list[dict[str, Any]]:
    return run_compiled_json(["-c", _COMPILE, ",".join(dtypes)])


def race_free(row: dict[str, Any], wgmma_per_iteration: int) -> bool:
    """The invariant of the module docstring for one compiled config."""
    stages = row["config"]["num_stages"]
    counts = set(row["smem_buffers"].values()) - {0}  # 0: an operand in registers
    if len(counts) != 1:  # none in shared memory, or operands with unequal buffers
        return False
    [buffers] = counts
    in_flight = math.ceil(row["wgmma_pendings"] / wgmma_per_iteration)
    return buffers == stages and buffers >= stages - 1 + in_flight


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return _compile(DTYPES)


def test_every_sm90_config_of_every_variant_is_compiled(rows):
    for dtype in DTYPES:
        for label in GEMM_VARIANTS:
            got = [r["config"] for r in rows if r["kernel"] == label and r["dtype"] == dtype]
            expected = [
                {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                for cfg in GEMM_CONFIGS[90]
            ]
            assert got == expected, (label, dtype)
    assert all("error" not in r for r in rows), [r["error"] for r in rows if "error" in r]


def test_wgmma_operands_have_a_buffer_per_stage(rows):
    """Every config with 64+ rows per tile runs async wgmma; each operand of it (x or dy, W, and
    the row-dot tile V where the row dot is computed) has ``num_stages`` buffers."""
    bad = []
    for r in rows:
        if r["config"]["BLOCK_N"] < 64:  # 16-row decode tile: synchronous mma.sync (HMMA)
            assert r["smem_buffers"] == {} and "HMMA" in r["tensor_core_instructions"], r
            continue
        rowdot = GEMM_VARIANTS[r["kernel"]][2]
        operands = {"a", "b", "v"} if rowdot else {"a", "b"}
        assert set(r["smem_buffers"]) == operands, r
        assert "HGMMA" in r["tensor_core_instructions"], r
        if not race_free(r, wgmma_per_iteration=2 if rowdot else 1):
            bad.append((r["kernel"], r["dtype"], r["config"], r["smem_buffers"]))
    assert not bad, bad


@triton.jit
def racy_matmul_kernel(a_ptr, b_ptr, v_ptr, c_ptr, r_ptr, K, BLOCK: tl.constexpr):
    """The tutorial matmul plus a row dot ``tl.sum(a * v)`` from the A tile: the race."""
    rn = tl.arange(0, BLOCK)
    rk = tl.arange(0, 64)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    rd = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, 64):
        a = tl.load(a_ptr + rn[:, None] * K + k0 + rk[None, :])
        b = tl.load(b_ptr + (k0 + rk[:, None]) * BLOCK + rn[None, :])
        acc = tl.dot(a, b, acc)
        rd += tl.sum(a.to(tl.float32) * tl.load(v_ptr + k0 + rk)[None, :], axis=1)
    tl.store(c_ptr + rn[:, None] * BLOCK + rn[None, :], acc)
    tl.store(r_ptr + rn, rd)


def test_checker_catches_the_race():
    """Negative control: the tile with a ``tl.sum`` user gets ``num_stages - 1`` buffers."""
    code = """
import json
from xgblora_fast.tools import kernel_report as I
job = I.KernelJob(
    label="racy", arch=90, dtype="bf16", fn_path="test_wgmma_buffers:racy_matmul_kernel",
    types={"a_ptr": "*bf16", "b_ptr": "*bf16", "v_ptr": "*fp32", "c_ptr": "*fp32",
           "r_ptr": "*fp32", "K": "i32"},
    constexprs={"BLOCK": 128}, divisible=frozenset({"a_ptr", "b_ptr", "v_ptr", "c_ptr",
    "r_ptr", "K"}), block_sizes={"BLOCK": 128}, num_warps=8, num_stages=3)
print(json.dumps(I.compile_job(job)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # racy_matmul_kernel lives in this file, which imports the helpers from tests/.
    paths = [str(REPO / "tests" / "kernels"), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout)
    assert row["smem_buffers"] == {"a": 2, "b": 3}, row
    assert row["wgmma_pendings"] == 1
    assert not race_free(row, wgmma_per_iteration=1)
