"""Validate and benchmark everything on a CUDA machine with one command, in a few minutes.

    python bench/gpu_check.py [--out DIR] [--skip-tests] [--skip-bench] [--timeout-s 450]
    make gpu-check [OUT=DIR]

Needs a CUDA GPU and the package's dependencies already installed; never the network. Steps, in
order, each with its own time limit inside the total budget (``--timeout-s``, default 450 s, so
that the whole run stays under 8 minutes):

1. ``ceilings``: prints the device, driver (nvidia-smi), CUDA, torch, triton and nvcc versions
   (``env.json``) and measures this machine's ceilings with ``bench/microbench.py``'s code: one
   1 GiB device copy (GB/s) and one bf16 8192^3 GEMM (TFLOP/s), CUDA events via
   ``triton.testing.do_bench`` (``ceilings.json``).
2. ``build-cuda``: the CUDA C++ extension, built for this GPU where the JIT loader looks for it
   (``$XGBLORA_FAST_CACHE``; ninja redoes nothing when it is up to date). Skipped when
   ``xgblora_fast._C`` is installed, or without a CUDA toolkit (the tests then skip the ``cuda``
   backend and say why).
3. ``gpu-tests``: ``pytest tests/gpu -m gpu`` with compiled kernels (``XGBLORA_FAST_GPU_TESTS=1``,
   ``TRITON_INTERPRET`` unset), on pytest-xdist workers when it is installed (``gpu_tests.xml``).
4. ``microbench``: ``bench/microbench.py`` in a quick GPU mode: three 7B-class layer shapes,
   N = 2048 and 16384, bf16 (``microbench_cuda.{csv,json,md}``, ``*_fwdbwd.png``, ``*_merge.png``).
5. ``memory``: ``bench/memory.py --device cuda`` (``memory_cuda.{json,md,png}``).
6. ``paths`` (run right after ``gpu-tests``): the Triton backend's two paths
   (``ops/dispatch.py``), fused kernel vs cuBLAS GEMM + rank-1 kernels, next to the frozen
   ``nn.Linear``: forward and backward times per shape (CUDA events), and a race check: many
   launches of the fused path with every candidate GEMM config forced in turn, on large (and
   ragged) shapes, each compared with the cuBLAS path's result within the dtype's tolerance
   (``paths_cuda.json``).

Each step's output is in ``<step>.log``, its status and time in ``steps.json``. Last, the summary
(``summarize``: a pure function of the files in the folder) goes to ``summary.json`` and
``summary.md`` and is printed: steps, test counts, fwd+bwd time over cuBLAS (frozen
``nn.Linear``) and peft LoRA r=1 over ours, merge bandwidth as % of the copy ceiling, memory.

Exit status: 0 when every step ran and every test passed, 1 otherwise, 2 for bad arguments or
when there is no CUDA device (then nothing is written).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
OUT_ENV = "XGBLORA_FAST_OUT"
# 8 minutes on an H100 include the start-up, a killed step's 15 s of grace and the summary.
DEFAULT_TIMEOUT_S = 450
# The most each subprocess step may take (seconds); the total budget caps them further.
STEP_LIMITS_S = {
    "build-cuda": 240,
    "gpu-tests": 240,
    "microbench": 240,
    "memory": 180,
    "paths": 150,
}
MICROBENCH_ARGS = (
    "--device",
    "cuda",
    "--shape",
    "4096x4096",
    "4096x11008",
    "11008x4096",
    "--tokens",
    "2048",
    "16384",
    "--dtype",
    "bf16",
    "--rounds",
    "3",
)
ENV_JSON = "env.json"
CEILINGS_JSON = "ceilings.json"
STEPS_JSON = "steps.json"
JUNIT_XML = "gpu_tests.xml"
MICROBENCH_JSON = "microbench_cuda.json"
MEMORY_JSON = "memory_cuda.json"
PATHS_JSON = "paths_cuda.json"
# The paths step: (M, K) layer shapes, token counts N and dtypes of the timing table, and the
# race check's (N, K, M) shapes (the largest, and a ragged one that fills no block) and launches.
PATH_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
PATH_TOKENS = (16, 2048, 16384)
PATH_DTYPES = ("bf16",)
RACE_SHAPES = ((16384, 4096, 11008), (16383, 4095, 4097))
RACE_LAUNCHES = 5  # per shape, op and candidate config (6 on sm_90)
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
# Files of an earlier run in the same folder: replaced, so that no stale result is summarised.
OWN_OUTPUTS = (
    ENV_JSON,
    CEILINGS_JSON,
    STEPS_JSON,
    JUNIT_XML,
    PATHS_JSON,
    SUMMARY_JSON,
    SUMMARY_MD,
    *(f"{step}.log" for step in STEP_LIMITS_S),
    "microbench_cuda*",
    "memory_cuda*",
)
FUSED = {"triton": "xgblora-fast[triton]", "cuda": "xgblora-fast[cuda]"}
FLOOR = "nn.Linear (frozen)"
COPY = "copy_ (floor)"
PEFT_R1 = "peft LoRA r=1"
BENIGN = ("ok", "skipped")  # step statuses that do not fail the run


# ------------------------------------------------------------------------------ arguments
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``out`` defaults to ``$XGBLORA_FAST_OUT``, else ``gpu_check_<time>``."""
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default ${OUT_ENV}, else ./gpu_check_<date>-<time>); "
        "files of an earlier run of this command there are replaced",
    )
    parser.add_argument("--skip-tests", action="store_true", help="no GPU tests")
    parser.add_argument(
        "--skip-bench", action="store_true", help="no microbenchmarks, no memory benchmark"
    )
    parser.add_argument(
        "--timeout-s",
        type=_positive_int,
        default=DEFAULT_TIMEOUT_S,
        help=f"total time budget in seconds (default {DEFAULT_TIMEOUT_S}); steps that would "
        "start after it are not run",
    )
    # Internal: the "paths" step's subprocess (needs the GPU to itself, like the other steps).
    parser.add_argument("--paths-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        default = os.environ.get(OUT_ENV) or f"gpu_check_{time.strftime('%Y%m%d-%H%M%S')}"
        args.out = Path(default)
    return args


def no_gpu_reason() -> str | None:
    """One line saying why this machine cannot run the check, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    return (
        "gpu_check: no CUDA device (torch.cuda.is_available() is False; torch "
        f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): this command needs "
        "a CUDA GPU; the CPU suite is `make test`"
    )


# ------------------------------------------------------------------------------ environment
def _command_output(cmd: list[str]) -> str | None:
    """Stripped stdout of a short command, or None when it is missing or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Device, driver, toolkit and library versions of this machine."""
    import torch
    import triton

    import xgblora_fast as xf
    from xgblora_fast.ops import _native

    props = torch.cuda.get_device_properties(0)
    smi = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    cuda_home = _native.find_cuda_home()
    nvcc = _command_output([f"{cuda_home}/bin/nvcc", "--version"]) if cuda_home else None
    nvcc_release = re.search(r"release ([\d.]+)", nvcc or "")
    return {
        "device": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
        "driver": smi.splitlines()[0] if smi else "unknown (no nvidia-smi)",
        "cuda": torch.version.cuda,
        "nvcc": nvcc_release.group(1) if nvcc_release else "none (no CUDA toolkit)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "xgblora_fast": xf.__version__,
        "commit": _command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure_ceilings() -> dict[str, Any]:
    """Copy GB/s (1 GiB) and bf16 GEMM TFLOP/s (8192^3), with ``bench/microbench.py``'s code."""
    import torch

    sys.path.insert(0, str(BENCH))  # bench/ is not a package
    import timing

    ceilings = timing.measure_ceilings("cuda", ["bf16"], timing.CudaTimer(rep_ms=50))
    torch.cuda.empty_cache()  # the subprocess steps get the memory back
    return ceilings


# ------------------------------------------------------------------------------ steps
def child_env(gpu_tests: bool = False, no_jit: bool = False) -> dict[str, str]:
    """The environment of the step subprocesses: compiled kernels, caches in the repo, offline.

    ``no_jit``: the CUDA extension's build failed; later steps do not try it again.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(REPO / ".cache" / "triton"))
    env.setdefault("XGBLORA_FAST_CACHE", str(REPO / ".cache"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    if gpu_tests:
        env["XGBLORA_FAST_GPU_TESTS"] = "1"  # tests/conftest.py then leaves the kernels compiled
    if no_jit:
        env["XGBLORA_FAST_JIT_CUDA"] = "0"
    return env


def step_record(name: str, status: str, detail: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """One entry of ``steps.json``; ``status`` is ok, skipped, failed, timeout or not run."""
    return {"name": name, "status": status, "detail": detail, "seconds": round(seconds, 1)}


def _stop(proc: subprocess.Popen) -> None:
    """End a step's process group (the step and its children, e.g. xdist workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group had already exited
        pass
    proc.wait()


def run_step(
    name: str, cmd: list[str], out: Path, limit_s: float, env: dict[str, str]
) -> dict[str, Any]:
    """Run ``cmd`` in the repo root, output to ``out/<name>.log``, within ``limit_s`` seconds."""
    log = out / f"{name}.log"
    print(f"[{name}] {shlex.join(cmd)}  (limit {limit_s:.0f} s, log {log.name})", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            record = step_record(name, "timeout", f"killed after {limit_s:.0f} s")
        else:
            status = "ok" if rc == 0 else "failed"
            record = step_record(name, status, f"exit status {rc}")
    record["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{name}] {record['status']} ({record['detail']}) in {record['seconds']:.0f} s")
    if record["status"] != "ok":
        print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:]))
    return record


def build_skip_reason() -> str | None:
    """Why the extension needs no build here (prebuilt), or cannot be built (no toolkit)."""
    from xgblora_fast.ops import _native

    if importlib.util.find_spec("xgblora_fast._C") is not None:
        return "prebuilt xgblora_fast._C installed"
    if _native.find_cuda_home() is None:
        return "no CUDA toolkit (nvcc): set CUDA_HOME; the cuda backend's tests are skipped"
    return None


def planned_steps(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str] | str]]:
    """``(name, command)`` per subprocess step, or ``(name, reason)`` for a step not run."""
    python = sys.executable
    build_cmd = [python, "-c", "import xgblora_fast.ops._native as n; n.main()", "build"]
    pytest_cmd = [python, "-m", "pytest", "tests/gpu", "-m", "gpu", f"--junitxml={out / JUNIT_XML}"]
    if importlib.util.find_spec("xdist") is not None:
        # Workers compile kernels in parallel (most of the tests' time); one GPU serves them all.
        pytest_cmd += ["-n", str(max(1, min(12, (os.cpu_count() or 2) - 4)))]
    skip_build = build_skip_reason()
    if args.skip_tests and args.skip_bench:
        skip_build = "--skip-tests and --skip-bench"
    return [
        ("build-cuda", skip_build or build_cmd),
        ("gpu-tests", "--skip-tests" if args.skip_tests else pytest_cmd),
        (
            "paths",
            "--skip-bench"
            if args.skip_bench
            else [python, str(BENCH / "gpu_check.py"), "--paths-step", "--out", str(out)],
        ),
        (
            "microbench",
            "--skip-bench"
            if args.skip_bench
            else [python, str(BENCH / "microbench.py"), *MICROBENCH_ARGS, "--out", str(out)],
        ),
        (
            "memory",
            "--skip-bench"
            if args.skip_bench
            else [python, str(BENCH / "memory.py"), "--device", "cuda", "--out", str(out)],
        ),
    ]


# ------------------------------------------------------------------------------ paths step
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _layer(n: int, k: int, m: int, dtype: str, device: str, seed: int = 0):
    """``(x, weight, bias, a, b, dy, u)`` for one layer (fp32 adapters, as peft keeps them)."""
    import torch

    dt = getattr(torch, _TORCH_DTYPES[dtype])
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, k, device=device, generator=g).to(dt)
    weight = (torch.randn(m, k, device=device, generator=g) / k**0.5).to(dt)
    bias = torch.randn(m, device=device, generator=g).to(dt)
    a = torch.randn(k, device=device, generator=g) / k**0.5
    b = torch.randn(m, device=device, generator=g)
    dy = torch.randn(n, m, device=device, generator=g).to(dt)
    return x, weight, bias, a, b, dy, x.float() @ a


def _path_runners(layer, scale: float = 0.5) -> dict[str, dict[str, Any]]:
    """Per operation, the frozen ``nn.Linear``'s work and the two paths, as no-arg callables."""
    import torch
    import torch.nn.functional as F

    from xgblora_fast.ops import rank1_linear as rl

    x, weight, bias, a, b, dy, u = layer
    bwd = (dy, x, weight, a, b, u, scale, None, True, True, True)
    return {
        "forward": {
            "linear": lambda: F.linear(x, weight, bias),
            "fused": lambda: rl._forward_triton(x, weight, bias, a, b, scale, None),
            "cublas": lambda: rl._forward_cublas(x, weight, bias, a, b, scale, None),
        },
        "backward": {
            "linear": lambda: torch.mm(dy, weight),
            "fused": lambda: rl._backward_triton(*bwd),
            "cublas": lambda: rl._backward_cublas(*bwd),
        },
    }


def _do_bench_s(run) -> float:
    import triton.testing

    return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median") / 1e3


def path_timings(
    shapes=PATH_SHAPES, tokens=PATH_TOKENS, dtypes=PATH_DTYPES, device="cuda", timer=_do_bench_s
) -> list[dict[str, Any]]:
    """Forward and backward seconds of ``nn.Linear``, the fused path and the cuBLAS path per
    (shape, N, dtype), with the two paths' agreement and what ``backend="auto"`` would pick."""
    import torch

    from xgblora_fast.ops.dispatch import DECODE_MAX_N, agreement

    rows = []
    for (m, k), n, dtype in ((s, n, d) for s in shapes for n in tokens for d in dtypes):
        layer = _layer(n, k, m, dtype, device)
        for op, runners in _path_runners(layer).items():
            agree, err, tol = agreement(runners["fused"](), runners["cublas"](), layer[0].dtype)
            times = {p: timer(run) for p, run in runners.items()}
            fused_wins = agree and times["fused"] < times["cublas"] and n > DECODE_MAX_N
            rows.append(
                {
                    "operation": op,
                    "shape": f"{m}x{k}",
                    "N": n,
                    "dtype": dtype,
                    **{f"{p}_ms": t * 1e3 for p, t in times.items()},
                    "fused_over_linear": times["fused"] / times["linear"],
                    "cublas_over_linear": times["cublas"] / times["linear"],
                    "error": err,
                    "tolerance": tol,
                    "auto": "fused" if fused_wins else "cublas",
                }
            )
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def race_check(
    shapes=RACE_SHAPES, launches=RACE_LAUNCHES, dtype="bf16", device="cuda"
) -> dict[str, Any]:
    """``launches`` fused forwards and backwards per shape and per candidate GEMM config (each
    forced in turn, not only the autotuner's pick), back to back, each compared with the cuBLAS
    path's result (computed once) within the dtype's tolerance; a race in the fused kernels (a
    tile read before its writer finished) shows as a mismatch."""
    import torch

    from xgblora_fast.kernels.rank1_linear import forced_config, gemm_configs
    from xgblora_fast.ops.dispatch import agreement

    worst, failures, total = 0.0, [], 0
    tolerance = None
    configs = gemm_configs()
    for n, k, m in shapes:
        layer = _layer(n, k, m, dtype, device, seed=n + k + m)
        for op, runners in _path_runners(layer).items():
            reference = runners["cublas"]()
            for config in configs:
                with forced_config(config):
                    for i in range(launches):
                        fused = runners["fused"]()
                        agree, err, tolerance = agreement(fused, reference, layer[0].dtype)
                        worst, total = max(worst, err), total + 1
                        if not agree:
                            failures.append(
                                {
                                    "shape": f"{n}x{k}x{m}",
                                    "op": op,
                                    "config": str(config),
                                    "launch": i,
                                    "error": err,
                                }
                            )
            del reference
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    return {
        "launches": total,
        "shapes": [f"{n}x{k}x{m}" for n, k, m in shapes],
        "dtype": dtype,
        "max_error": worst,
        "tolerance": tolerance,
        "failures": failures,
    }


def paths_step(out: Path) -> int:
    """The ``paths`` step: ``paths_cuda.json``; exit status 1 when the race check failed."""
    import torch

    data = {"device": torch.cuda.get_device_name(), "timings": [], "race": None}
    for shape in PATH_SHAPES:  # written after each shape: a step killed at its limit keeps them
        data["timings"] += path_timings(shapes=(shape,))
        (out / PATHS_JSON).write_text(json.dumps(data, indent=1))
    data["race"] = race_check()
    (out / PATHS_JSON).write_text(json.dumps(data, indent=1))
    print(json.dumps(data["race"], indent=1))
    return 1 if data["race"]["failures"] else 0


# ------------------------------------------------------------------------------ summary
def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when the file is missing."""
    return json.loads(path.read_text()) if path.is_file() else None


def junit_counts(path: Path) -> dict[str, Any] | None:
    """Passed/failed/errors/skipped of a pytest junit XML, with failing tests and skip reasons.

    None when the file is missing or unreadable (a run killed while writing it).
    """
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    skip_reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        outcome = {child.tag: child for child in case}
        test = f"{case.get('classname')}::{case.get('name')}"
        if "error" in outcome or "failure" in outcome:
            counts["errors" if "error" in outcome else "failed"] += 1
            failing.append(test)
        elif "skipped" in outcome:
            counts["skipped"] += 1
            reason = outcome["skipped"].get("message", "")
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "total": sum(counts.values()), "failing": failing, "skips": skip_reasons}


def microbench_ratios(data: dict[str, Any]) -> tuple[list[dict], list[dict], float]:
    """Key ratios of ``bench/microbench.py``'s JSON: ``(fwd_bwd, merge, copy GB/s)``.

    fwd_bwd: per (shape, N, dtype), p50 time over the cuBLAS floor (frozen ``nn.Linear``) of
    each fused backend and of peft LoRA r=1, and peft's time over ours (> 1: we are faster).
    merge: per (shape, dtype), each fused backend's merge GB/s as % of the copy ceiling measured
    in the same microbenchmark run.
    """
    rows = data["rows"]
    copy_gbps = data["meta"]["ceilings"]["copy_gbps"]
    index = {(r["operation"], r["provider"], r["M"], r["K"], r["N"], r["dtype"]): r for r in rows}
    fwd_bwd, merges = [], []
    cases = dict.fromkeys((r["M"], r["K"], r["N"], r["dtype"]) for r in rows)
    for m, k, n, dtype in cases:
        floor = index.get(("forward+backward", FLOOR, m, k, n, dtype))
        copy = index.get(("merge", COPY, m, k, n, dtype))
        if floor is not None:
            peft = index.get(("forward+backward", PEFT_R1, m, k, n, dtype))
            entry = {"shape": f"{m}x{k}", "N": n, "dtype": dtype, "floor_ms": floor["p50_ms"]}
            for backend, provider in FUSED.items():
                ours = index.get(("forward+backward", provider, m, k, n, dtype))
                entry[f"{backend}_vs_cublas"] = ours["ratio_to_floor"] if ours else None
                entry[f"peft_over_{backend}"] = (
                    peft["p50_ms"] / ours["p50_ms"] if ours and peft else None
                )
            entry["peft_vs_cublas"] = peft["ratio_to_floor"] if peft else None
            fwd_bwd.append(entry)
        if copy is not None:
            entry = {"shape": f"{m}x{k}", "dtype": dtype, "copy_ms": copy["p50_ms"]}
            for backend, provider in FUSED.items():
                ours = index.get(("merge", provider, m, k, n, dtype))
                entry[f"{backend}_gbps"] = ours["gbps"] if ours else None
                entry[f"{backend}_pct_of_copy"] = 100 * ours["gbps"] / copy_gbps if ours else None
            merges.append(entry)
    return fwd_bwd, merges, copy_gbps


def memory_rows(data: dict[str, Any]) -> dict[str, list[dict]]:
    """Training-step peaks (and over XGBLoRA's) and merges' extra memory of ``bench/memory.py``."""
    train = [r for r in data["rows"] if r["kind"] == "training"]
    ours = next((r for r in train if r["key"] == "xgblora"), None)
    return {
        "training": [
            {
                "method": r["method"],
                "peak_mib": r["peak_delta_mib"],
                "over_xgblora": r["peak_delta_mib"] / ours["peak_delta_mib"] if ours else None,
            }
            for r in train
        ],
        "merge": [
            {
                "provider": r["provider"],
                "extra_mib": r["extra_mib"],
                "weight_mib": r["weight_mib"],
                "shape": f"{r['M']}x{r['K']} {r['dtype']}",
            }
            for r in data["rows"]
            if r["kind"] == "merge"
        ],
    }


def summarize(out: Path) -> dict[str, Any]:
    """Everything the summary shows, read from the files in ``out`` (missing ones: not run)."""
    steps = read_json(out / STEPS_JSON) or []
    tests = junit_counts(out / JUNIT_XML)
    micro = read_json(out / MICROBENCH_JSON)
    memory = read_json(out / MEMORY_JSON)
    paths = read_json(out / PATHS_JSON)
    fwd_bwd, merges, copy_gbps = microbench_ratios(micro) if micro else ([], [], None)
    # A test run that passed nothing (e.g. every test skipped) is no validation.
    tests_ok = tests is None or (tests["failed"] + tests["errors"] == 0 and tests["passed"] > 0)
    race = paths.get("race") if paths else None
    race_ok = race is None or not race["failures"]
    ok = bool(steps) and all(s["status"] in BENIGN for s in steps) and tests_ok and race_ok
    return {
        "ok": ok,
        "environment": read_json(out / ENV_JSON),
        "ceilings": read_json(out / CEILINGS_JSON),
        "steps": steps,
        "tests": tests,
        "fwd_bwd": fwd_bwd,
        "merge": merges,
        "merge_copy_gbps": copy_gbps,
        "memory": memory_rows(memory) if memory else None,
        "paths": paths,
    }


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


FWD_BWD_HEAD = [
    "fwd+bwd",
    "N",
    "dtype",
    "cuBLAS ms",
    "triton / cuBLAS",
    "cuda / cuBLAS",
    "peft r=1 / cuBLAS",
    "peft r=1 / triton",
    "peft r=1 / cuda",
]
MERGE_HEAD = [
    "merge",
    "dtype",
    "copy ms",
    "triton GB/s",
    "triton % of copy",
    "cuda GB/s",
    "cuda % of copy",
]


def _render_tests(tests: dict[str, Any] | None) -> list[str]:
    if tests is None:
        return ["GPU tests: no results"]
    return [
        f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
        f"errors, {tests['skipped']} skipped ({tests['total']} in {JUNIT_XML})",
        *(f"- FAILED {name}" for name in tests["failing"][:20]),
        *(f"- skipped {n}: {reason}" for reason, n in tests["skips"].items()),
    ]


def _render_microbench(summary: dict[str, Any]) -> list[str]:
    if not summary["fwd_bwd"]:
        return ["Microbenchmarks: no results"]
    fwd_bwd = [
        [
            e["shape"],
            str(e["N"]),
            e["dtype"],
            f"{e['floor_ms']:.3f}",
            _fmt(e["triton_vs_cublas"], ".3f"),
            _fmt(e["cuda_vs_cublas"], ".3f"),
            _fmt(e["peft_vs_cublas"], ".3f"),
            _fmt(e["peft_over_triton"], ".2f", "x"),
            _fmt(e["peft_over_cuda"], ".2f", "x"),
        ]
        for e in summary["fwd_bwd"]
    ]
    merge = [
        [
            e["shape"],
            e["dtype"],
            f"{e['copy_ms']:.3f}",
            _fmt(e["triton_gbps"], ".0f"),
            _fmt(e["triton_pct_of_copy"], ".0f", "%"),
            _fmt(e["cuda_gbps"], ".0f"),
            _fmt(e["cuda_pct_of_copy"], ".0f", "%"),
        ]
        for e in summary["merge"]
    ]
    return [
        *_table(FWD_BWD_HEAD, fwd_bwd),
        "",
        *_table(MERGE_HEAD, merge),
        "",
        f"% of copy: of the copy ceiling measured in the microbenchmark run "
        f"({summary['merge_copy_gbps']:.0f} GB/s). Goals of issue #5 and every ratio: "
        "microbench_cuda.md.",
    ]


def _render_memory(memory: dict[str, list[dict]] | None) -> list[str]:
    if memory is None:
        return ["Memory benchmark: no results"]
    training = [
        [r["method"], f"{r['peak_mib']:.1f}", _fmt(r["over_xgblora"], ".2f")]
        for r in memory["training"]
    ]
    merge = [
        [r["provider"], r["shape"], f"{r['extra_mib']:.1f}", f"{r['weight_mib']:.0f}"]
        for r in memory["merge"]
    ]
    return [
        *_table(["training step", "peak extra MiB", "x XGBLoRA"], training),
        "",
        *_table(["merge", "W", "extra MiB", "W MiB"], merge),
    ]


PATHS_HEAD = [
    "op",
    "shape",
    "N",
    "dtype",
    "nn.Linear ms",
    "fused ms",
    "cuBLAS path ms",
    "fused / nn.Linear",
    "cuBLAS path / nn.Linear",
    "auto",
]


def _render_paths(paths: dict[str, Any] | None) -> list[str]:
    if paths is None:
        return ["Fused vs cuBLAS path: no results"]
    rows = [
        [
            r["operation"],
            r["shape"],
            str(r["N"]),
            r["dtype"],
            f"{r['linear_ms']:.3f}",
            f"{r['fused_ms']:.3f}",
            f"{r['cublas_ms']:.3f}",
            f"{r['fused_over_linear']:.3f}",
            f"{r['cublas_over_linear']:.3f}",
            r["auto"],
        ]
        for r in paths["timings"]
    ]
    race = paths.get("race")
    if race is None:
        verdict = "Race check: no results"
    else:
        verdict = (
            f"Race check: {race['launches']} fused launches on {', '.join(race['shapes'])} "
            f"({race['dtype']}), max error vs the cuBLAS path {race['max_error']:.2e} "
            f"(tolerance {race['tolerance']:.0e}): "
            + ("PASS" if not race["failures"] else f"FAIL, {len(race['failures'])} mismatches")
        )
    return [*_table(PATHS_HEAD, rows), "", verdict]


def render_summary(summary: dict[str, Any]) -> str:
    """The summary as markdown: verdict, machine, steps, tests, ratios, merge, memory."""
    env, ceil = summary["environment"], summary["ceilings"]
    lines = [f"# gpu_check: {'PASS' if summary['ok'] else 'FAIL'}", ""]
    if env:
        lines.append(
            f"{env['device']} ({env['capability']}, {env['memory_gib']} GiB), driver "
            f"{env['driver']}, CUDA {env['cuda']}, nvcc {env['nvcc']}, torch {env['torch']}, "
            f"triton {env['triton']}, xgblora-fast {env['xgblora_fast']} ({env['commit']}), "
            f"{env['date']}"
        )
    if ceil:
        gemm = ", ".join(f"{d} GEMM {v:.0f} TFLOP/s" for d, v in ceil["gemm_tflops"].items())
        lines.append(f"Ceilings: copy {ceil['copy_gbps']:.0f} GB/s, {gemm}")
    steps = [[s["name"], s["status"], f"{s['seconds']:.0f}", s["detail"]] for s in summary["steps"]]
    sections = [
        _table(["step", "status", "seconds", "detail"], steps),
        _render_tests(summary["tests"]),
        _render_microbench(summary),
        _render_memory(summary["memory"]),
        _render_paths(summary.get("paths")),
    ]
    for section in sections:
        lines += ["", *section]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main
def _clear_own_outputs(out: Path) -> None:
    for pattern in OWN_OUTPUTS:
        for path in out.glob(pattern):
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    """Refuse without a GPU (2), run the steps, write and print the summary (0: all passed)."""
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before xgblora_fast is imported: compiled kernels
    reason = no_gpu_reason()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    if args.paths_step:
        args.out.mkdir(parents=True, exist_ok=True)
        return paths_step(args.out.resolve())
    deadline = time.monotonic() + args.timeout_s
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _clear_own_outputs(out)

    env = environment()
    (out / ENV_JSON).write_text(json.dumps(env, indent=1))
    print("\n".join(f"{k:>13}: {v}" for k, v in env.items()), flush=True)
    start = time.perf_counter()
    try:
        ceilings = measure_ceilings()
    except Exception as exc:  # a failed measurement must not keep the tests from running
        status, detail = "failed", f"{type(exc).__name__}: {exc}"
    else:
        (out / CEILINGS_JSON).write_text(json.dumps(ceilings, indent=1))
        gemm = ceilings["gemm_tflops"]["bf16"]
        detail = f"copy {ceilings['copy_gbps']:.0f} GB/s, bf16 GEMM {gemm:.0f} TFLOP/s"
        status = "ok"
    steps = [step_record("ceilings", status, detail, time.perf_counter() - start)]
    print(f"[ceilings] {status}: {detail}", flush=True)
    (out / STEPS_JSON).write_text(json.dumps(steps, indent=1))

    build_failed = False
    for name, plan in planned_steps(args, out):
        left = deadline - time.monotonic()
        if isinstance(plan, str):
            record = step_record(name, "skipped", plan)
        elif left < 10:
            record = step_record(name, "not run", f"time budget of {args.timeout_s} s spent")
        else:
            env_vars = child_env(gpu_tests=name == "gpu-tests", no_jit=build_failed)
            record = run_step(name, plan, out, min(STEP_LIMITS_S[name], left), env_vars)
        build_failed = build_failed or (name == "build-cuda" and record["status"] not in BENIGN)
        steps.append(record)
        (out / STEPS_JSON).write_text(json.dumps(steps, indent=1))

    summary = summarize(out)
    markdown = render_summary(summary)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    (out / SUMMARY_MD).write_text(markdown)
    print(f"\nresults in {out}\n")
    print(markdown)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
