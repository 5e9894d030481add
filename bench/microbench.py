"""Microbenchmarks: ``FastRank1Linear`` vs frozen ``nn.Linear``, peft LoRA and an unfused rank-1.

For the linear layers of real models (``W [M, K]``: M = out_features, K = in_features) and token
counts ``N`` (``x [N, K]``), times four operations:

- ``forward``: ``y = layer(x)`` with autograd on (``x`` requires grad, as inside a model).
- ``backward``: ``torch.autograd.grad(y, [x, *adapter], dy)`` on graphs built beforehand.
- ``forward+backward``: both (the training cost of the layer).
- ``merge``: ``W += s b a^T`` in place; its floor is one copy of ``W`` (one read, one write).

This file is the entry point: the shapes, the command line and the run loop. It measures this
machine's ceilings, then for every shape, dtype and ``N`` builds the providers on shared
``W``/``bias`` (``microbench_providers.py``: the layers and merges under test), checks each against
float64 (a disagreement stops the run), times the providers of each operation back to back in
rounds (``timing.py``), and finally writes the results (``microbench_report.py``). Merges run
last per shape: each one adds to the shared ``W``.

Shapes on CPU (fp32, ``torch.set_num_threads(--threads)``): see ``CPU_SHAPES``; ``N`` is 1, 256
and 2048, except that the largest layers stop at 256 so that the full run stays under 10 minutes
on 2 cores (a 4096x11008 fp32 GEMM at N=2048 is 185 GFLOP, ~1.5 s there, and each (shape, N)
runs ~150 GEMMs of its size: 5 providers x 3 operations x 7 calls, fwd+bwd counting 2). CUDA:
every shape with N = 1, 256, 2048 and 16384, bf16 and fp16 (16k tokens only there).

    python bench/microbench.py             # full run: bench/results/microbench_<device>.*
    python bench/microbench.py --quick     # two small shapes: microbench_<device>_quick.*
    python bench/microbench.py --shape 4096x4096 --tokens 256 2048 --tag _mine

Outputs (under ``--out``, default ``bench/results``): CSV, JSON, a markdown summary and PNG plots
(see ``microbench_report.py``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from microbench_providers import (
    CHECK_ROWS_CPU,
    DTYPES,
    LAYER_OPS,
    PROVIDER_COPY,
    PROVIDER_FLOOR,
    build_providers,
    check_merge,
    check_provider,
    make_inputs,
    make_problem,
    merge_providers,
    op_fn,
    rotation_count,
)
from microbench_report import write_results
from timing import (
    CpuTimer,
    CudaTimer,
    Timer,
    measure_ceilings,
    tidy_rows,
    time_interleaved,
)
from tqdm import tqdm

import xgblora_fast as xf

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    """A linear layer ``W [m, k]`` of a real model and the token counts benchmarked on CPU."""

    m: int
    k: int
    layer: str
    tokens: tuple[int, ...] = (1, 256, 2048)

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}"


CPU_SHAPES = (
    Shape(768, 768, "hidden 768 (BERT-base, GPT-2) attention"),
    Shape(3072, 768, "hidden 768 MLP up"),
    Shape(768, 3072, "hidden 768 MLP down"),
    Shape(2048, 2048, "hidden 2048 (Llama-3.2-1B) attention q/o"),
    Shape(8192, 2048, "hidden 2048 MLP gate/up", (1, 256)),
    Shape(2048, 8192, "hidden 2048 MLP down", (1, 256)),
    Shape(4096, 4096, "hidden 4096 (Llama-2-7B) attention"),
    Shape(11008, 4096, "hidden 4096 MLP gate/up", (1, 256)),
    Shape(4096, 11008, "hidden 4096 MLP down", (1, 256)),
    Shape(1024, 4096, "hidden 4096 GQA k/v (8 kv heads)"),
)
GPU_TOKENS = (1, 256, 2048, 16384)
QUICK_SHAPES = (
    Shape(768, 768, "hidden 768 (BERT-base, GPT-2) attention", (1, 256)),
    Shape(3072, 768, "hidden 768 MLP up", (1, 256)),
)
QUICK_GPU_SHAPES = (Shape(4096, 4096, "hidden 4096 (Llama-2-7B) attention", (256, 2048)),)


# ------------------------------------------------------------------------------------ the run
@dataclass
class Settings:
    """What one run measures (built from the command line by ``settings_from_args``)."""

    device: str
    shapes: tuple[Shape, ...]
    dtypes: list[str]
    rounds: int
    min_sample_ms: float
    rep_ms: int
    gpu_tokens: tuple[int, ...] | None  # CUDA: the same N for every shape

    def tokens(self, shape: Shape) -> tuple[int, ...]:
        return self.gpu_tokens if self.gpu_tokens is not None else shape.tokens


def bench_shape(
    shape: Shape, dtype_name: str, settings: Settings, timer: Timer, progress: tqdm
) -> list[dict[str, Any]]:
    """Every operation and provider of one layer shape and dtype (token counts, then merge)."""
    device = settings.device
    problem = make_problem(shape.m, shape.k, dtype_name, device)
    providers = build_providers(problem, device)
    rows = []
    for n in settings.tokens(shape):
        progress.set_postfix_str(f"{shape.label} N={n} {dtype_name}")
        inputs = make_inputs(problem, n, rotation_count(problem, n))
        rows_to_check = n if device == "cuda" else min(n, CHECK_ROWS_CPU)
        x, dy = inputs[0]
        for provider in providers:
            check_provider(provider, problem, x[:rows_to_check], dy[:rows_to_check])
        for operation in LAYER_OPS:
            fns = {p.name: op_fn(operation, p, inputs) for p in providers}
            samples = time_interleaved(fns, timer, settings.rounds)
            rows += tidy_rows(operation, samples, PROVIDER_FLOOR, problem, n, device, shape.layer)
            del fns
        del inputs, x, dy
        gc.collect()
        progress.update(1)
    # Merges last: every timed merge adds s b a^T to the shared W (nothing else uses it after).
    mergers = merge_providers(problem, providers, device)
    for provider in mergers:
        check_merge(provider, problem)
    samples = time_interleaved({p.name: p.merge for p in mergers}, timer, settings.rounds)
    rows += tidy_rows("merge", samples, PROVIDER_COPY, problem, 0, device, shape.layer)
    progress.update(1)
    return rows


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run(settings: Settings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All shapes and dtypes: ``(rows, meta)``; meta holds the machine and its ceilings."""
    device = settings.device
    if device == "cuda":
        timer: Timer = CudaTimer(settings.rep_ms)
    else:
        timer = CpuTimer(settings.min_sample_ms / 1e3)
    start = time.perf_counter()
    ceilings = measure_ceilings(device, settings.dtypes, timer)
    items = sum(len(settings.tokens(s)) + 1 for s in settings.shapes) * len(settings.dtypes)
    rows: list[dict[str, Any]] = []
    with tqdm(total=items, desc="microbench", unit="item") as progress:
        for shape in settings.shapes:
            for dtype_name in settings.dtypes:
                rows += bench_shape(shape, dtype_name, settings, timer, progress)
    meta = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "xgblora_fast": xf.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "timer": (
            f"triton do_bench, rep {settings.rep_ms} ms x {settings.rounds} rounds"
            if device == "cuda"
            else f"perf_counter, samples >= {settings.min_sample_ms} ms, {settings.rounds} rounds"
        ),
        "ceilings": ceilings,
        "seconds": time.perf_counter() - start,
    }
    return rows, meta


# ------------------------------------------------------------------------------------ CLI
def _parse_shape(text: str) -> tuple[int, int]:
    m, _, k = text.lower().partition("x")
    return int(m), int(k)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    if args.shape:
        shapes = tuple(
            Shape(m, k, "custom", tuple(args.tokens or (1, 256)))
            for m, k in map(_parse_shape, args.shape)
        )
    elif args.quick:
        shapes = QUICK_GPU_SHAPES if on_gpu else QUICK_SHAPES
    else:
        shapes = CPU_SHAPES
    if args.tokens and not args.shape:
        shapes = tuple(Shape(s.m, s.k, s.layer, tuple(args.tokens)) for s in shapes)
    gpu_tokens = None
    if on_gpu and not args.tokens and not args.quick:
        gpu_tokens = GPU_TOKENS
    dtypes = args.dtype or (["bf16", "fp16"] if on_gpu else ["fp32"])
    if on_gpu and args.quick and not args.dtype:
        dtypes = ["bf16"]
    return Settings(
        device=device,
        shapes=shapes,
        dtypes=dtypes,
        rounds=args.rounds or (3 if args.quick or on_gpu else 5),
        min_sample_ms=args.min_sample_ms or (20.0 if args.quick else 40.0),
        rep_ms=args.rep_ms,
        gpu_tokens=gpu_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes (CPU, < 3 min)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shape", nargs="+", help="layer shapes MxK (out x in) instead")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts N for every shape")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default fp32 on CPU")
    parser.add_argument("--rounds", type=int, help="rounds (default 5 on CPU; 3 on CUDA, quick)")
    parser.add_argument("--min-sample-ms", type=float, help="CPU: ms per sample (default 40)")
    parser.add_argument("--rep-ms", type=int, default=25, help="CUDA: do_bench rep per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--tag", help="file name suffix (default: '_quick' with --quick)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    stem = f"microbench_{settings.device}{tag}"
    rows, meta = run(settings)
    for path in write_results(rows, meta, args.out, stem, plots=not args.no_plots):
        print(f"wrote {path}")
    print((args.out / f"{stem}.md").read_text().split("## forward:")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
