"""Ahead-of-time report on the Triton kernels: registers, spills, shared memory, tensor cores.

Every kernel is compiled for sm_80 and sm_90 with ``triton.compile`` (no GPU needed), with the
specialisation the JIT would pick for contiguous tensors of a typical LLM layer, and the
resulting cubin is inspected:

    python -m xgblora_fast.tools.kernel_report            # readable table
    python -m xgblora_fast.tools.kernel_report --json     # one JSON array, one object per row
    python -m xgblora_fast.tools.kernel_report --roofline [--shape N K M] [--json] [--no-compile]

``--roofline`` prints the roofline model of ``xgblora_fast/roofline.py`` for one layer shape
(default ``N=16384, K=4096, M=4096``, the ``--dtype`` of the GEMM): per kernel of the fused path,
of the frozen-GEMM floor and of peft's unfused LoRA path the FLOPs, minimum bytes and the
predicted time at H100 ceilings, with the compile data below joined onto the Triton kernels
(``--no-compile`` skips the compilation); then the operation totals, labelled "measured" where
``bench/results/microbench_cuda.json`` holds a GPU run of that shape (``--measured`` names
another file). Its ``--json`` rows are documented in ``roofline.roofline_rows``.

Each row (``compile_report`` returns them as dicts) has:

- ``kernel``: the kernel name, with the variant in brackets where one kernel is compiled
  several ways (``rank1_gemm_kernel[dx]``, ``rank1_merge_kernel[stochastic]``).
- ``arch``: ``"sm_80"`` or ``"sm_90"``.
- ``config``: the block-size constexprs plus ``num_warps`` and ``num_stages``.
- ``registers``: registers per thread (ptxas).
- ``spills_bytes``: bytes of register spill stores per thread (ptxas); 0 is what we want.
- ``stack_bytes``: per-thread stack frame in local memory, where the spills go (ptxas).
- ``shared_bytes``: shared memory per program, as Triton allocates it.
- ``tensor_core_instructions``: SASS tensor-core opcode family -> static count, e.g.
  ``{"HGMMA": 4}``; empty when the kernel uses none.
- ``ptx_mma``: static count of ``mma.sync`` / ``wgmma.mma_async`` instructions in the PTX.
- ``smem_buffers``: for a kernel with asynchronous wgmma (sm_90), each wgmma operand -> its
  shared-memory buffers, read from the TTGIR (``wgmma_pipeline``), e.g. ``{"a": 3, "b": 3,
  "v": 3}`` for a 3-stage pipeline; 0 for an operand in registers; empty without wgmma.
- ``wgmma_pendings``: the largest ``pendings`` of a ``ttng.warp_group_dot_wait`` (wgmma ops
  left in flight), None without wgmma.
- ``dtype``: element type of the kernel's main tensor (``x``/``W``/``dy``).
- ``error`` (only when something is wrong): why the config cannot run on that arch: a failed
  compile (numbers are then None), or more shared memory than the arch allows per block
  (the JIT would raise ``OutOfResources`` at launch).

Compilation always runs (Triton's cache cannot replay the ptxas log); the Triton cache goes
to ``<repo>/.cache/triton`` unless ``TRITON_CACHE_DIR`` is set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDAOptions
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from xgblora_fast.kernels import merge, rank1_reduce
from xgblora_fast.kernels import rank1_linear as gemm_kernels
from xgblora_fast.kernels.runtime import dot_precision
from xgblora_fast.tools import roofline

ARCHS: tuple[int, ...] = (80, 90)
GEMM_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
# Largest shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 163 KiB, H100 227 KiB. Triton checks this only at launch, so the report checks it here.
MAX_SHARED_BYTES: dict[int, int] = {80: 166912, 90: 232448}

_DIVISIBLE_16 = [["tt.divisibility", 16]]
_SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_PTX_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:wgmma\.mma_async|mma\.sync)\b", re.MULTILINE)
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


@dataclass(frozen=True)
class KernelJob:
    """One compilation: a kernel specialised the way the JIT would specialise a real launch.

    ``types`` maps each runtime argument to its Triton type string (``*bf16``, ``i32``,
    ``fp32``); ``constexprs`` holds the constexpr parameters and the unit strides (the JIT turns
    an int argument equal to 1 into a constexpr); ``divisible`` names the runtime arguments the
    JIT would mark divisible by 16 (16-byte aligned pointers, multiples of 16). ``num_warps``,
    ``num_stages`` and ``enable_fp_fusion`` are the launch options (Triton's defaults where the
    launcher passes none).
    """

    label: str
    arch: int
    dtype: str
    fn_path: str  # "module:attribute" of the kernel, resolved again in the worker process
    types: dict[str, str]
    constexprs: dict[str, Any]
    divisible: frozenset[str]
    block_sizes: dict[str, int]
    num_warps: int = CUDAOptions.num_warps
    num_stages: int = CUDAOptions.num_stages
    enable_fp_fusion: bool = CUDAOptions.enable_fp_fusion


# label: (unit stride of B, bias added, row dot computed in the K loop, rank-1 term added)
GEMM_VARIANTS: dict[str, tuple[str, bool, bool, bool]] = {
    "rank1_gemm_kernel": ("stride_bk", True, True, True),  # forward with bias
    "rank1_gemm_kernel[nobias]": ("stride_bk", False, True, True),
    "rank1_gemm_kernel[rowdot given]": ("stride_bk", True, False, True),  # adapter dropout
    "rank1_gemm_kernel[dx]": ("stride_bm", False, True, True),  # dx = dy W + s v a^T
    "rank1_gemm_kernel[dx,dropout]": ("stride_bm", False, True, False),  # dx = dy W, v = dy.b
}


def gemm_jobs(arch: int, dtype: str, variants: tuple[str, ...] | None = None) -> list[KernelJob]:
    """Variants of ``rank1_gemm_kernel`` (``GEMM_VARIANTS``, all by default) for every autotune
    config of ``arch``.

    Forward: ``A = x [N, K]``, ``B = W [M, K]``, ``out [N, M]``, all row-major, so the unit
    strides are ``stride_ak``, ``stride_bk``, ``stride_om``. dx passes ``B = W.t()``, so
    ``stride_bm`` is the unit stride instead of ``stride_bk``. ``N`` (tokens) is arbitrary and
    never specialised; ``M``, ``K`` and the row strides are hidden sizes, multiples of 16 in
    practice.
    """
    el = f"*{dtype}"
    types = {
        "a_ptr": el,
        "b_ptr": el,
        # the [K, 4] split of the adapter vector (gemm_kernels.split_vector); fp32 vin on sm_80
        "vin_ptr": el if arch >= 90 else "*fp32",
        "vin_unscale_ptr": "*fp32",
        "vout_ptr": "*fp32",  # the adapter vectors a, b are fp32 parameters
        "bias_ptr": el,
        "rowdot_ptr": "*fp32",
        "out_ptr": el,
        "scale": "fp32",
        "N": "i32",
        "M": "i32",
        "K": "i32",
        "N_BUCKET": "i32",
        "stride_an": "i32",
        "stride_bm": "i32",
        "stride_bk": "i32",
        "stride_on": "i32",
    }
    # N_BUCKET, the next power of two of N, is a multiple of 16 for any N > 8.
    divisible = frozenset(
        name
        for name in types
        if name.endswith("_ptr")
        or name in ("M", "K", "N_BUCKET", "stride_an", "stride_bm", "stride_bk", "stride_on")
    )
    jobs = []
    for label in GEMM_VARIANTS if variants is None else variants:
        unit_b_stride, has_bias, rowdot, rank1 = GEMM_VARIANTS[label]
        for cfg in gemm_kernels.GEMM_CONFIGS[arch]:
            constexprs = {
                "stride_ak": 1,
                unit_b_stride: 1,
                "stride_om": 1,
                "HAS_BIAS": has_bias,
                "COMPUTE_ROWDOT": rowdot,
                "ROWDOT_GIVEN": not rowdot,
                "ADD_RANK1": rank1,
                "UPCAST": False,
                "DOT_PRECISION": dot_precision(GEMM_DTYPES[dtype]),
                "VCOLS": gemm_kernels.VIN_COLS,
                "VSTORED": gemm_kernels.VIN_STORED,
                "ROWDOT_DOT": arch >= 90,
                **cfg.kwargs,
            }
            jobs.append(
                KernelJob(
                    label=label,
                    arch=arch,
                    dtype=dtype,
                    fn_path="xgblora_fast.kernels.rank1_linear:rank1_gemm_kernel",
                    types={k: v for k, v in types.items() if k not in constexprs},
                    constexprs=constexprs,
                    divisible=divisible - {unit_b_stride},
                    block_sizes=dict(cfg.kwargs),
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
            )
    return jobs


def _reduce_job(arch: int) -> KernelJob:
    """``weighted_colsum_kernel`` on a row-major bf16 ``dy`` with the column sums (dbias) on."""
    block_sizes = {
        "BLOCK_N": rank1_reduce.REDUCE_BLOCK_N,
        "BLOCK_C": rank1_reduce.REDUCE_BLOCK_C,
    }
    return KernelJob(
        label="weighted_colsum_kernel",
        arch=arch,
        dtype="bf16",
        fn_path="xgblora_fast.kernels.rank1_reduce:weighted_colsum_kernel",
        types={
            "x_ptr": "*bf16",
            "w_ptr": "*fp32",
            "wsum_ptr": "*fp32",
            "csum_ptr": "*fp32",
            "N": "i32",
            "C": "i32",
            "rows_per_split": "i32",
            "stride_xn": "i32",
        },
        constexprs={"stride_xc": 1, "HAS_CSUM": True, **block_sizes},
        # rows_per_split is a multiple of BLOCK_N (32) by construction in the launcher.
        divisible=frozenset(
            {"x_ptr", "w_ptr", "wsum_ptr", "csum_ptr", "C", "rows_per_split", "stride_xn"}
        ),
        block_sizes=block_sizes,
        num_warps=rank1_reduce.REDUCE_NUM_WARPS,
    )


def _split_job(arch: int) -> KernelJob:
    """``split_vector_kernel``: the fp32 booster into the bf16 row-dot source of the sm_90 GEMM."""
    constexprs = {
        "BITS": 8,
        "PARTS": gemm_kernels.VIN_PARTS,
        "STORED": gemm_kernels.VIN_STORED,
        "BLOCK": gemm_kernels.SPLIT_BLOCK,
    }
    return KernelJob(
        label="split_vector_kernel",
        arch=arch,
        dtype="bf16",
        fn_path="xgblora_fast.kernels.rank1_linear:split_vector_kernel",
        types={"v_ptr": "*fp32", "out_ptr": "*bf16", "unscale_ptr": "*fp32", "K": "i32"},
        constexprs=constexprs,
        divisible=frozenset({"v_ptr", "out_ptr", "unscale_ptr", "K"}),
        block_sizes={"BLOCK": gemm_kernels.SPLIT_BLOCK},
    )


def _merge_jobs(arch: int) -> list[KernelJob]:
    """``rank1_merge_kernel`` on a row-major bf16 ``W``: nearest, stochastic and Kahan rounding.

    Without Kahan the launcher passes ``W`` again as the (unread) compensation buffer.
    """
    block_sizes = {"BLOCK_M": merge.MERGE_BLOCK_M, "BLOCK_K": merge.MERGE_BLOCK_K}
    return [
        KernelJob(
            label=f"rank1_merge_kernel[{rounding}]",
            arch=arch,
            dtype="bf16",
            fn_path="xgblora_fast.kernels.merge:rank1_merge_kernel",
            types={
                "w_ptr": "*bf16",
                "c_ptr": "*bf16",
                "a_ptr": "*fp32",
                "b_ptr": "*fp32",
                "scale": "fp32",
                "seed": "i32",
                "row_offset": "i32",
                "M": "i32",
                "K": "i32",
                "stride_wm": "i32",
                "stride_cm": "i32",
            },
            constexprs={
                "stride_wk": 1,
                "stride_ck": 1,
                "STOCHASTIC": rounding == "stochastic",
                "KAHAN": rounding == "kahan",
                "W_DTYPE": tl.bfloat16,
                **block_sizes,
            },
            divisible=frozenset(
                {"w_ptr", "c_ptr", "a_ptr", "b_ptr", "M", "K", "stride_wm", "stride_cm"}
            ),
            block_sizes=block_sizes,
            # As the launcher: the multiply and the add must round separately.
            num_warps=merge.MERGE_NUM_WARPS,
            enable_fp_fusion=False,
        )
        for rounding in ("nearest", "stochastic", "kahan")
    ]


def report_jobs(archs: tuple[int, ...] = ARCHS, dtype: str = "bf16") -> list[KernelJob]:
    """Every compilation of the report, in report order (``dtype`` applies to the GEMM only)."""
    jobs = []
    for arch in archs:
        jobs += gemm_jobs(arch, dtype)
        if arch >= 90:
            jobs.append(_split_job(arch))
        jobs.append(_reduce_job(arch))
        jobs += _merge_jobs(arch)
    return jobs


def _jit_function(fn_path: str) -> JITFunction:
    """The ``JITFunction`` behind ``module:attribute``, unwrapping ``@triton.autotune``."""
    module_name, attr = fn_path.split(":")
    kernel = getattr(importlib.import_module(module_name), attr)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{fn_path} is a {type(fn).__name__}, not a JITFunction: the kernels were imported "
            "with TRITON_INTERPRET=1. Run the report in a process without it "
            "(`python -m xgblora_fast.tools.kernel_report` re-executes itself that way)."
        )
    return fn


def _ptxas_number(pattern: re.Pattern[str], log: str) -> int:
    match = pattern.search(log)
    if match is None:
        raise RuntimeError(f"unexpected ptxas log, no match for {pattern.pattern!r}:\n{log}")
    return int(match.group(1))


def _tensor_core_counts(cubin: bytes) -> dict[str, int]:
    """SASS opcode family (the mnemonic before the first '.') -> count, for ``*MMA`` families."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", f.name],
            check=True,
            capture_output=True,  # cuobjdump warns on stderr about nvdisasm's output format
            text=True,
        ).stdout
    families = Counter()
    for line in sass.splitlines():
        match = _SASS_OPCODE.match(line)
        # HMMA, IMMA, DMMA (mma.sync), HGMMA, QGMMA, IGMMA (wgmma), UTC*MMA (sm_100) ...
        if match is not None and match.group(1).endswith("MMA"):
            families[match.group(1)] += 1
    return dict(sorted(families.items()))


_TTGIR_VALUE = r"%[\w.#]+"
_LOCAL_ALLOC = re.compile(
    rf"^\s*({_TTGIR_VALUE}) = ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([0-9x]+)x\w+,",
    re.MULTILINE,
)
# Views of a buffer: one slot of a multi-buffered allocation, a transposed or sliced view.
_MEMDESC_VIEW = re.compile(
    rf"^\s*({_TTGIR_VALUE})(?::\d+)? = ttg\.memdesc_\w+ ({_TTGIR_VALUE})", re.MULTILINE
)
_WGMMA = re.compile(
    rf"^\s*{_TTGIR_VALUE}(?::\d+)? = ttng\.warp_group_dot ({_TTGIR_VALUE}), ({_TTGIR_VALUE}),",
    re.MULTILINE,
)
_WGMMA_WAIT = re.compile(r"ttng\.warp_group_dot_wait [^{]*\{pendings = (\d+)")


def wgmma_pipeline(ttgir: str) -> dict[str, Any]:
    """The asynchronous-wgmma pipeline of a compiled kernel, read from its TTGIR.

    Returns ``{"wgmma": number of ttng.warp_group_dot, "operands": {name: buffers},
    "pendings": [the pendings of every ttng.warp_group_dot_wait]}``. Each wgmma operand is
    traced through its views (``ttg.memdesc_index`` of one slot, transposes) to the
    ``ttg.local_alloc`` it lives in; ``buffers`` is that allocation's leading dimension when it
    is multi-buffered (``!ttg.memdesc<3x128x64xbf16, ...>``: 3), 1 for a single buffer, 0 for an
    operand held in registers (no shared memory to race on). ``name`` is the allocation's SSA
    name without its number (Triton names values after the Python variable: ``a``, ``b``,
    ``v``), made unique with ``#2``, ... where two allocations share one.
    """
    allocs = {
        m.group(1): [int(d) for d in m.group(2).split("x")] for m in _LOCAL_ALLOC.finditer(ttgir)
    }
    views = {m.group(1): m.group(2) for m in _MEMDESC_VIEW.finditer(ttgir)}
    names: dict[str, str] = {}
    operands: dict[str, int] = {}
    dots = _WGMMA.findall(ttgir)
    for operand in (value for dot in dots for value in dot):
        while operand in views:
            operand = views[operand]
        if operand not in allocs:
            key, buffers = f"registers:{operand}", 0
        else:
            shape = allocs[operand]
            buffers = shape[0] if len(shape) == 3 else 1
            key = names.get(operand)
            if key is None:
                base = re.sub(r"_\d+$", "", operand.lstrip("%"))
                key = base
                n = 2
                while key in names.values():
                    key, n = f"{base}#{n}", n + 1
                names[operand] = key
        operands[key] = buffers
    return {
        "wgmma": len(dots),
        "operands": operands,
        "pendings": [int(p) for p in _WGMMA_WAIT.findall(ttgir)],
    }


def compile_job(job: KernelJob) -> dict[str, Any]:
    """Compile one job and return its report row (see the module docstring for the fields)."""
    fn = _jit_function(job.fn_path)
    signature = {
        name: "constexpr" if name in job.constexprs else job.types[name] for name in fn.arg_names
    }
    attrs = {(fn.arg_names.index(name),): _DIVISIBLE_16 for name in job.divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=job.constexprs, attrs=attrs)
    row: dict[str, Any] = {
        "kernel": job.label,
        "arch": f"sm_{job.arch}",
        "dtype": job.dtype,
        "config": {**job.block_sizes, "num_warps": job.num_warps, "num_stages": job.num_stages},
    }
    options = {
        "num_warps": job.num_warps,
        "num_stages": job.num_stages,
        "enable_fp_fusion": job.enable_fp_fusion,
    }
    ptxas_log = io.StringIO()
    try:
        # Triton prints the ptxas log (registers, spills) only when it really runs ptxas: force
        # the compile past the cache, and capture the print so stdout stays valid JSON.
        with (
            knobs.compilation.scope(),
            knobs.nvidia.scope(),
            contextlib.redirect_stdout(ptxas_log),
        ):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options)
    except Exception as e:  # a config that does not compile is reported, not fatal
        row.update(
            registers=None,
            spills_bytes=None,
            stack_bytes=None,
            shared_bytes=None,
            tensor_core_instructions={},
            ptx_mma=None,
            smem_buffers={},
            wgmma_pendings=None,
            error=f"{type(e).__name__}: {str(e).strip()}",
        )
        return row
    log = ptxas_log.getvalue()
    row.update(
        registers=_ptxas_number(_PTXAS_REGISTERS, log),
        spills_bytes=_ptxas_number(_PTXAS_SPILLS, log),
        stack_bytes=_ptxas_number(_PTXAS_STACK, log),
        shared_bytes=compiled.metadata.shared,
        tensor_core_instructions=_tensor_core_counts(compiled.asm["cubin"]),
        ptx_mma=len(_PTX_MMA.findall(compiled.asm["ptx"])),
    )
    pipeline = wgmma_pipeline(compiled.asm["ttgir"])
    row.update(
        smem_buffers=pipeline["operands"],
        wgmma_pendings=max(pipeline["pendings"], default=None),
    )
    if compiled.metadata.shared > MAX_SHARED_BYTES[job.arch]:
        row["error"] = (
            f"needs {compiled.metadata.shared} bytes of shared memory, "
            f"sm_{job.arch} allows {MAX_SHARED_BYTES[job.arch]} per block"
        )
    return row


def _default_cache_dir() -> None:
    """Keep Triton's cache inside the repository (an ignored path) when run from a checkout."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        os.environ.setdefault("TRITON_CACHE_DIR", str(repo / ".cache" / "triton"))


def compile_report(
    archs: tuple[int, ...] = ARCHS, dtype: str = "bf16", jobs: int = 2
) -> list[dict[str, Any]]:
    """Compile every kernel for ``archs`` and return one row per (kernel, arch, config).

    Args:
        archs: compute capabilities as ints (80, 90).
        dtype: element type of the GEMM's ``x``/``W``/``out`` (``bf16``, ``fp16``, ``fp32``);
            the reduction and merge kernels are always compiled for bf16.
        jobs: worker processes; 1 compiles in this process.
    """
    if dtype not in GEMM_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(GEMM_DTYPES)}, got {dtype!r}")
    return compile_jobs(report_jobs(tuple(archs), dtype), jobs)


def compile_jobs(todo: list[KernelJob], jobs: int = 2) -> list[dict[str, Any]]:
    """``compile_job`` of each of ``todo``, in order, over ``jobs`` worker processes."""
    _default_cache_dir()
    if jobs == 1:
        return [compile_job(job) for job in todo]
    # spawn, not fork: the caller may hold CUDA state or threads (torch) that fork would copy.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(compile_job, todo))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table; errors (often multi-line) are listed after it."""
    header = (
        "kernel",
        "arch",
        "config",
        "regs",
        "spills",
        "stack",
        "shared",
        "wgmma buffers",
        "tensor cores",
    )
    lines = [header]
    errors = []
    for row in rows:
        config = " ".join(f"{k}={v}" for k, v in row["config"].items())
        cores = " ".join(f"{k}x{v}" for k, v in row["tensor_core_instructions"].items()) or "-"
        if "error" in row:
            number = len(errors) + 1
            cores += f"  (error {number})"
            message = textwrap.indent(row["error"], "    ")
            errors.append(f"error {number}: {row['kernel']} {row['arch']} {config}\n{message}")
        lines.append(
            (
                row["kernel"],
                row["arch"],
                config,
                str(row["registers"]),
                str(row["spills_bytes"]),
                str(row["stack_bytes"]),
                str(row["shared_bytes"]),
                " ".join(f"{k}={v}" for k, v in row["smem_buffers"].items()) or "-",
                cores,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    table = [
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    ]
    return "\n".join(table + errors)


def main(argv: list[str] | None = None) -> int:
    """``xgblora-fast inspect`` / ``python -m xgblora_fast.tools.kernel_report``: exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Under the interpreter @triton.jit builds interpreter objects, which cannot be
        # compiled ahead of time: run the report in a fresh process without the variable.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "xgblora_fast.tools.kernel_report", *argv]
        return subprocess.run(cmd, env=env, check=False).returncode

    parser = argparse.ArgumentParser(
        prog="xgblora-fast inspect", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON array")
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--dtype", choices=sorted(GEMM_DTYPES), default="bf16", help="GEMM dtype")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--roofline", action="store_true", help="the roofline model (see above)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("N", "K", "M"),
        default=list(roofline.DEFAULT_SHAPE),
        help="--roofline: tokens N, in_features K, out_features M",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="--roofline without the compile data"
    )
    parser.add_argument(
        "--measured",
        type=Path,
        default=roofline.MEASURED_PATH,
        help="--roofline: microbenchmark JSON of a GPU run (default bench/results/...cuda.json)",
    )
    args = parser.parse_args(argv)

    if args.roofline:
        n, k, m = args.shape
        compiled = (
            [] if args.no_compile else compile_report(tuple(args.arch), args.dtype, args.jobs)
        )
        measured = roofline.load_measured(args.measured, n, k, m, args.dtype)
        rows = roofline.roofline_rows(n, k, m, args.dtype, compile_rows=compiled, measured=measured)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(roofline.format_roofline(rows, n, k, m, args.dtype))
        return 0

    start = time.perf_counter()
    rows = compile_report(tuple(args.arch), args.dtype, args.jobs)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} compilations in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
