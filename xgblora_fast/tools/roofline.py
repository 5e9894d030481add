"""Roofline model of the fused rank-1 kernels, the frozen GEMM floor and peft's unfused LoRA path.

Pure Python (no GPU, no Triton): for one layer shape it counts the FLOPs and the minimum bytes of
every kernel a training step launches, and predicts each kernel's time at a machine's ceilings.
``python -m xgblora_fast.tools.kernel_report --roofline`` prints these rows next to the
ahead-of-time compile data; ``bench/microbench.py`` uses ``operation_cost`` for its TFLOP/s and
GB/s columns.

Shapes: ``x [N, K]``, ``W [M, K]`` frozen, ``bias [M]``,
adapters ``a [K]``, ``b [M]`` (fp32, as peft and ``FastRank1Linear`` keep them), ``y [N, M]``;
``elt`` is the byte size of x/W/y/dy/dx (2 for bf16/fp16, 4 for fp32).

Counting rules (each kernel in ``kernel_costs`` follows them):

- FLOPs: a multiply-add counts 2, a lone add/multiply 1; a GEMM ``[N, K] x [K, M]`` is
  ``2 N K M``; casts count 0.
- Bytes: the minimum traffic of the kernel: every input read once from memory and every output
  written once (perfect on-chip reuse, which a large-tile GEMM approaches); nothing else.
- Predicted time of a kernel: ``max(flops / peak_flops, bytes / peak_bandwidth)``. Launch
  latency, wave quantisation and cache effects are ignored, so small ``N`` comes out optimistic.
  Every number this module produces is a *prediction*; measured GPU numbers (from
  ``bench/results/microbench_cuda.json``) replace the operation totals when they exist.

The three paths, kernel by kernel:

- ``linear``: frozen ``nn.Linear`` (cuBLAS), the floor: one GEMM forward, one GEMM (``dx``)
  backward; for the merge the floor is one copy of ``W`` (one read, one write).
- ``fused``: xgblora-fast's Triton kernels (``kernels/``): forward ``rank1_gemm_kernel``;
  backward ``rank1_gemm_kernel[dx]``, one read of ``dy`` for ``dx`` and ``v = dy.b``, then one
  ``weighted_colsum_kernel`` pass over ``x`` (``da``) and one over ``dy`` (``db``, ``dbias``:
  their own pass, so that every tile of the GEMM's K loop feeds only ``tl.dot``). On sm_90 the
  row dots are a second ``tl.dot`` against a ``[BLOCK_K, 16]`` tile, in every column block of
  the output: ``16 / FUSED_BLOCK_M`` of the GEMM's tensor-core work again. Merge =
  ``rank1_merge_kernel`` (one read and one write of ``W``), the
  merge a booster runs from a layer's second merge on: ``FastRank1Linear`` keeps a bound on
  ``max |W|`` between merges, so ``merge_``'s overflow check needs no pass over ``W``. A layer's
  first merge (and one after anything else wrote ``W``) adds that check, one more read of ``W``.
  Stochastic rounding moves the same bytes as nearest.
- ``peft``: peft 0.21's LoRA ``Linear`` with r=1 and its default fp32 adapters, op by op as
  autograd runs it (``tuners/lora/layer.py``): half-precision ``x`` is cast to fp32 for the
  adapter, the result is promoted to fp32 and cast back, and the backward mirrors every step.
  Its merge builds the full fp32 delta ``B @ A``, scales it (another full-size tensor), and adds
  it to ``W``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xgblora_fast.kernels.reduce_launch import colsum_split

PATHS = ("linear", "fused", "peft")
OPERATIONS = ("forward", "backward", "forward+backward", "merge")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_SHAPE = (16384, 4096, 4096)  # N, K, M: a 7B attention layer at the largest GPU N
# Column block of the GEMM's large configs (kernels/rank1_linear.py): each recomputes its row
# block's row dot, on sm_90 as a dot with ROWDOT_COLUMNS columns.
FUSED_BLOCK_M = 256
ROWDOT_COLUMNS = 16

# Provider names of bench/microbench.py, the join key with its measured results.
PROVIDER_FLOOR = "nn.Linear (frozen)"
PROVIDER_COPY = "copy_ (floor)"
PROVIDER_PEFT_R1 = "peft LoRA r=1"
PATH_LABELS = {
    "linear": "nn.Linear (frozen)",
    "fused": "xgblora-fast (fused)",
    "peft": "peft LoRA r=1 (unfused)",
}
MEASURED_PATH = Path(__file__).resolve().parents[1] / "bench" / "results" / "microbench_cuda.json"


def provider_fused(backend: str) -> str:
    """The microbenchmark's name of ``FastRank1Linear`` on ``backend`` (triton/cuda/torch)."""
    return f"xgblora-fast[{backend}]"


def provider_bound_kept(backend: str) -> str:
    """The name of a booster's steady-state merge on ``backend`` (bound on max|W| kept)."""
    return f"{provider_fused(backend)}, W bound kept"


def measured_provider(path: str, operation: str) -> str:
    """Which microbenchmark provider stands for ``path`` when measured numbers exist."""
    if path == "linear":
        return PROVIDER_COPY if operation == "merge" else PROVIDER_FLOOR
    if path == "fused":  # the booster's merge: the bound on max|W| kept (microbench.py)
        return provider_bound_kept("triton") if operation == "merge" else provider_fused("triton")
    return PROVIDER_PEFT_R1


@dataclass(frozen=True)
class Ceilings:
    """Peak rates of a machine: FLOP/s per dtype and memory bandwidth in bytes/s."""

    name: str
    flops_per_s: dict[str, float]
    bytes_per_s: float
    source: str


# Measured on an H100 80GB (one large copy, one large bf16 GEMM on random data). fp16 runs
# on the same tensor cores as bf16; fp32 (IEEE tl.dot, no TF32) is the datasheet's non-tensor rate.
H100 = Ceilings(
    name="H100 SXM",
    flops_per_s={"bf16": 798e12, "fp16": 798e12, "fp32": 67e12},
    bytes_per_s=3.0e12,
    source="measured on an H100 80GB: copy 3.0 TB/s, bf16 GEMM 798 TFLOP/s; "
    "fp16 assumed equal to bf16, fp32 = datasheet 67 TFLOP/s",
)


@dataclass(frozen=True)
class KernelCost:
    """One kernel of one path: its FLOPs and minimum bytes (see the module docstring)."""

    path: str
    operation: str  # "forward", "backward" or "merge"
    name: str
    flops: int
    bytes: int

    def predicted_s(self, ceilings: Ceilings, dtype: str) -> float:
        """``max(flops / peak_flops, bytes / peak_bandwidth)`` in seconds."""
        return max(self.flops / ceilings.flops_per_s[dtype], self.bytes / ceilings.bytes_per_s)

    def bound(self, ceilings: Ceilings, dtype: str) -> str:
        """``"compute"`` or ``"memory"``: which ceiling sets the predicted time."""
        compute_s = self.flops / ceilings.flops_per_s[dtype]
        return "compute" if compute_s > self.bytes / ceilings.bytes_per_s else "memory"


def colsum_costs(path: str, n: int, k: int, m: int, elt: int) -> list[KernelCost]:
    """The backward's two ``weighted_colsum_kernel`` passes, shared by both Triton paths:
    ``da = s x^T v`` over ``x`` and ``db = s dy^T u``, ``dbias = dy^T 1`` over ``dy``, each with
    its fp32 ``[split, C]`` partial rows written, then summed by torch."""
    f4 = 4
    nk, nm = n * k, n * m
    split_k, split_m = colsum_split(n, k)[0], colsum_split(n, m)[0]
    return [
        KernelCost(
            path,
            "backward",
            "weighted_colsum_kernel[da] (+ partial sums)",
            2 * nk + split_k * k,
            elt * nk + f4 * (n + 2 * split_k * k + k),
        ),
        KernelCost(
            path,
            "backward",
            "weighted_colsum_kernel[db,dbias] (+ partial sums)",
            3 * nm + 2 * split_m * m,
            elt * nm + f4 * (n + 4 * split_m * m + 2 * m),
        ),
    ]


def kernel_costs(n: int, k: int, m: int, elt: int) -> list[KernelCost]:
    """Every kernel of the three paths for ``x [n, k]``, ``W [m, k]``, ``elt``-byte elements.

    Adapter vectors, row dots ``u``/``v`` and peft's adapter tensors are fp32 (4 bytes). Bias
    is present (as in the compile report). The order is path, then operation, then launch order.
    """
    f4 = 4
    nk, nm, mk = n * k, n * m, m * k
    gemm = 2 * n * k * m
    column_blocks = -(-m // FUSED_BLOCK_M)

    def rowdot_flops(rows: int, inner: int, blocks: int) -> int:
        """The row dot as the sm_90 kernel runs it: a 16-column dot in every column block."""
        return 2 * rows * inner * ROWDOT_COLUMNS * blocks

    cast = elt != f4  # peft casts half-precision activations to its fp32 adapters' dtype

    def kc(path: str, op: str, name: str, flops: int, nbytes: int) -> KernelCost:
        return KernelCost(path, op, name, flops, nbytes)

    rows = [
        kc("linear", "forward", "GEMM y = x W^T + bias", gemm + nm, elt * (nk + mk + nm + m)),
        kc("linear", "backward", "GEMM dx = dy W", gemm, elt * (nm + mk + nk)),
        kc("linear", "merge", "copy W", 0, 2 * elt * mk),
        # Forward: GEMM + row dot u = x.a in the K loop + epilogue s u b^T + bias (3NM); reads
        # the [K, 4] split of a (input dtype) and b, writes u.
        kc(
            "fused",
            "forward",
            "rank1_gemm_kernel",
            gemm + rowdot_flops(n, k, column_blocks) + 3 * nm,
            elt * (nk + mk + nm + m) + elt * 4 * k + f4 * (m + n),
        ),
        # dx: GEMM + row dot v = dy.b in the K loop + epilogue s v a^T (2NK); reads the [M, 4]
        # split of b and a, writes v.
        kc(
            "fused",
            "backward",
            "rank1_gemm_kernel[dx]",
            gemm + rowdot_flops(n, m, -(-k // FUSED_BLOCK_M)) + 2 * nk,
            elt * (nm + mk + nk) + elt * 4 * m + f4 * (k + n),
        ),
        *colsum_costs("fused", n, k, m, elt),
        kc("fused", "merge", "rank1_merge_kernel[nearest]", 2 * mk, 2 * elt * mk + f4 * (m + k)),
        # peft forward: result = base(x); result = result + lora_B(lora_A(x.to(f32))) * s.
        kc("peft", "forward", "base GEMM y0 = x W^T + bias", gemm + nm, elt * (nk + mk + nm + m)),
    ]
    if cast:
        rows.append(kc("peft", "forward", "x.to(fp32)", 0, (elt + f4) * nk))
    rows += [
        kc("peft", "forward", "lora_A: t = x A^T", 2 * nk, f4 * (nk + k + n)),
        kc("peft", "forward", "lora_B: z = t B^T", nm, f4 * (n + m + nm)),
        kc("peft", "forward", "z * scaling", nm, 2 * f4 * nm),
        kc("peft", "forward", "y0 + z (promoted to fp32)", nm, (elt + f4) * nm + f4 * nm),
    ]
    if cast:
        rows += [
            kc("peft", "forward", "result.to(dtype)", 0, (f4 + elt) * nm),
            kc("peft", "backward", "dy.to(fp32) (cast backward)", 0, (elt + f4) * nm),
            kc("peft", "backward", "dy0 = dr.to(dtype) (add backward)", 0, (f4 + elt) * nm),
        ]
    rows += [
        kc("peft", "backward", "dz = dr * scaling", nm, 2 * f4 * nm),
        kc("peft", "backward", "dB = dz^T t", 2 * nm, f4 * (nm + n + m)),
        kc("peft", "backward", "dt = dz B", 2 * nm, f4 * (nm + m + n)),
        kc("peft", "backward", "dA = dt^T x", 2 * nk, f4 * (nk + n + k)),
        kc("peft", "backward", "dx_lora = dt A", nk, f4 * (n + k + nk)),
    ]
    if cast:
        rows.append(kc("peft", "backward", "dx_lora.to(dtype)", 0, (f4 + elt) * nk))
    rows += [
        kc("peft", "backward", "base GEMM dx_base = dy0 W", gemm, elt * (nm + mk + nk)),
        kc("peft", "backward", "dx = dx_base + dx_lora", nk, 3 * elt * nk),
        kc("peft", "merge", "delta = B @ A (fp32)", 2 * mk, f4 * (m + k + mk)),
        kc("peft", "merge", "delta * scaling", mk, 2 * f4 * mk),
        kc("peft", "merge", "W += delta", mk, (2 * elt + f4) * mk),
    ]
    return rows


def _members(operation: str) -> tuple[str, ...]:
    return ("forward", "backward") if operation == "forward+backward" else (operation,)


def path_cost(path: str, operation: str, n: int, k: int, m: int, elt: int) -> tuple[int, int]:
    """``(flops, bytes)`` of one operation (see ``OPERATIONS``) on one path, summed over kernels."""
    kernels = [
        c
        for c in kernel_costs(n, k, m, elt)
        if c.path == path and c.operation in _members(operation)
    ]
    return sum(c.flops for c in kernels), sum(c.bytes for c in kernels)


def operation_cost(operation: str, n: int, k: int, m: int, elt: int) -> tuple[int, int]:
    """The useful work of an operation, ``(flops, bytes)``, to turn a time into TFLOP/s and GB/s.

    The fused path's counts for forward/backward (what any provider must at least do), and for
    the merge the in-place update: one read and one write of ``W`` (what the copy floor moves).
    """
    if operation == "merge":
        merge = next(c for c in kernel_costs(n, k, m, elt) if c.name.startswith("rank1_merge"))
        return merge.flops, merge.bytes
    return path_cost("fused", operation, n, k, m, elt)


def load_measured(
    path: Path, n: int, k: int, m: int, dtype: str
) -> dict[tuple[str, str], float] | None:
    """Measured p50 seconds ``{(provider, operation): s}`` for this shape, or None.

    Reads a ``bench/microbench.py`` JSON (``{"meta": ..., "rows": [...]}``); rows match on
    ``N``, ``K``, ``M`` and ``dtype`` (``merge`` rows on ``K``, ``M`` and ``dtype`` only).
    """
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    found = {}
    for row in rows:
        same_n = row["operation"] == "merge" or row["N"] == n
        if same_n and row["K"] == k and row["M"] == m and row["dtype"] == dtype:
            found[(row["provider"], row["operation"])] = row["p50_ms"] / 1e3
    return found or None


def _compile_label(kernel: str) -> str | None:
    """The ``inspect.compile_report`` label of a fused Triton kernel row (None otherwise)."""
    if kernel.startswith("weighted_colsum_kernel"):
        return "weighted_colsum_kernel"  # the report's one compilation stands for every use
    if kernel.startswith(("rank1_gemm_kernel", "rank1_merge_kernel")):
        return kernel
    return None


def _compile_data(kernel: str, compile_rows: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """``{arch: [{config, registers, spills_bytes, shared_bytes, tensor_core_instructions}]}``."""
    label = _compile_label(kernel)
    keep = ("config", "registers", "spills_bytes", "shared_bytes", "tensor_core_instructions")
    data: dict[str, list[dict]] = {}
    for row in compile_rows:
        if label is not None and row["kernel"] == label:
            entry = {key: row[key] for key in keep}
            if "error" in row:
                entry["error"] = row["error"]
            data.setdefault(row["arch"], []).append(entry)
    return data


def roofline_rows(
    n: int,
    k: int,
    m: int,
    dtype: str = "bf16",
    ceilings: Ceilings = H100,
    compile_rows: list[dict[str, Any]] | None = None,
    measured: dict[tuple[str, str], float] | None = None,
) -> list[dict[str, Any]]:
    """Kernel rows, then operation rows, each a dict with the same keys.

    Keys: ``row`` ("kernel"/"operation"), ``path`` (``PATHS``), ``name`` (kernel, or the
    path's label), ``operation``, ``flops``, ``bytes``, ``intensity`` (FLOP/byte), ``bound``
    ("compute"/"memory"), ``predicted_us``, ``time_us`` and ``source`` ("predicted", or
    "measured" where ``measured`` has all three paths of that operation), ``ratio_to_floor``
    (operation rows: time over the ``linear`` path's time, both from the same source; None for
    kernels) and ``compile`` (fused Triton kernels: ``{arch: [per-config data]}`` from
    ``compile_rows``; ``{}`` otherwise).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    kernels = kernel_costs(n, k, m, DTYPE_BYTES[dtype])
    rows: list[dict[str, Any]] = []

    def row(kind: str, path: str, name: str, op: str, flops: int, nbytes: int, pred_s: float):
        compute_s = flops / ceilings.flops_per_s[dtype]
        return {
            "row": kind,
            "path": path,
            "name": name,
            "operation": op,
            "flops": flops,
            "bytes": nbytes,
            "intensity": flops / nbytes,  # every kernel moves at least W or x
            "bound": "compute" if compute_s > nbytes / ceilings.bytes_per_s else "memory",
            "predicted_us": pred_s * 1e6,
            "time_us": pred_s * 1e6,
            "source": "predicted",
            "ratio_to_floor": None,
            "compile": {},
        }

    for c in kernels:
        r = row(
            "kernel", c.path, c.name, c.operation, c.flops, c.bytes, c.predicted_s(ceilings, dtype)
        )
        r["compile"] = _compile_data(c.name, compile_rows or []) if c.path == "fused" else {}
        rows.append(r)
    for op in OPERATIONS:
        members = [c for c in kernels if c.operation in _members(op)]
        op_rows = {}
        for path in PATHS:
            mine = [c for c in members if c.path == path]
            pred_s = sum(c.predicted_s(ceilings, dtype) for c in mine)
            flops, nbytes = sum(c.flops for c in mine), sum(c.bytes for c in mine)
            label = "copy W (floor)" if (path, op) == ("linear", "merge") else PATH_LABELS[path]
            op_rows[path] = row("operation", path, label, op, flops, nbytes, pred_s)
        keys = [(measured_provider(path, op), op) for path in PATHS]
        if measured and all(key in measured for key in keys):
            for path, key in zip(PATHS, keys, strict=True):
                op_rows[path]["time_us"] = measured[key] * 1e6
                op_rows[path]["source"] = "measured"
        for path in PATHS:
            op_rows[path]["ratio_to_floor"] = (
                op_rows[path]["time_us"] / op_rows["linear"]["time_us"]
            )
        rows += op_rows.values()
    return rows


def _fmt_compile(arch: str, entry: dict[str, Any]) -> str:
    config = " ".join(f"{key}={value}" for key, value in entry["config"].items())
    cores = " ".join(f"{key}x{v}" for key, v in entry["tensor_core_instructions"].items()) or "-"
    text = (
        f"{arch} {config}: {entry['registers']} regs, {entry['spills_bytes']} B spills, "
        f"{entry['shared_bytes']} B shared, tensor cores {cores}"
    )
    return text + (f"  ERROR: {entry['error'].splitlines()[0]}" if "error" in entry else "")


def goals(rows: list[dict[str, Any]]) -> list[tuple[str, float, bool, str]]:
    """The GPU goals of issue #5 on the operation rows: ``(goal, value, held, source)``."""
    ops = {(r["path"], r["operation"]): r for r in rows if r["row"] == "operation"}
    fb_fused, fb_peft = ops["fused", "forward+backward"], ops["peft", "forward+backward"]
    merge_fused, merge_copy = ops["fused", "merge"], ops["linear", "merge"]
    speedup = fb_peft["time_us"] / fb_fused["time_us"]
    copy_share = merge_copy["time_us"] / merge_fused["time_us"]
    return [
        (
            "fused fwd+bwd <= 1.05x frozen linear (for N >= 2048)",
            fb_fused["ratio_to_floor"],
            fb_fused["ratio_to_floor"] <= 1.05,
            fb_fused["source"],
        ),
        ("fused fwd+bwd >= 1.3x faster than peft r=1", speedup, speedup >= 1.3, fb_peft["source"]),
        (
            "booster merge (max|W| bound kept) >= 85% of copy bandwidth",
            copy_share,
            copy_share >= 0.85,
            merge_fused["source"],
        ),
    ]


def format_roofline(
    rows: list[dict[str, Any]], n: int, k: int, m: int, dtype: str, ceilings: Ceilings = H100
) -> str:
    """The rows as text: kernels (with their compile data), operation totals, ratios, goals."""
    lines = [
        f"Roofline model, x [N={n}, K={k}], W [M={m}, K={k}], {dtype}, fp32 adapters; "
        f"ceilings: {ceilings.name}, {ceilings.source}.",
        "Kernel times are PREDICTIONS (max of FLOPs/peak and bytes/bandwidth); operation totals "
        "say 'measured' where bench/results/microbench_cuda.json has this shape.",
        "",
        f"{'path':<7} {'op':<9} {'kernel':<40} {'GFLOP':>9} {'MB':>9} {'FLOP/B':>8} "
        f"{'bound':<7} {'pred us':>9}",
    ]
    for r in rows:
        if r["row"] != "kernel":
            continue
        lines.append(
            f"{r['path']:<7} {r['operation']:<9} {r['name']:<40} {r['flops'] / 1e9:>9.3f} "
            f"{r['bytes'] / 1e6:>9.2f} {r['intensity']:>8.1f} {r['bound']:<7} "
            f"{r['predicted_us']:>9.1f}"
        )
        for arch, entries in r["compile"].items():
            lines += ["      " + _fmt_compile(arch, e) for e in entries]
    lines += [
        "",
        f"{'operation':<17} {'path':<26} {'GFLOP':>9} {'MB':>9} {'time us':>9} {'source':<9} "
        f"{'x floor':>7}",
    ]
    for r in rows:
        if r["row"] == "operation":
            lines.append(
                f"{r['operation']:<17} {r['name']:<26} {r['flops'] / 1e9:>9.3f} "
                f"{r['bytes'] / 1e6:>9.2f} {r['time_us']:>9.1f} {r['source']:<9} "
                f"{r['ratio_to_floor']:>7.3f}"
            )
    lines += ["", "Goals (issue #5, GPU):"]
    for goal, value, held, source in goals(rows):
        lines.append(f"  {goal}: {value:.3f} -> {'held' if held else 'NOT held'} ({source})")
    return "\n".join(lines)


# ------------------------------------------------------------------ the Triton backend's two paths
CUBLAS_PATH_LABEL = "xgblora-fast (cuBLAS + rank-1 kernels)"


def cublas_path_costs(n: int, k: int, m: int, elt: int) -> list[KernelCost]:
    """The kernels of the "cublas" path (``ops/rank1_linear.py``'s ``_forward_cublas`` and
    ``_backward_cublas``), counted as in ``kernel_costs``: cuBLAS GEMMs exactly as the frozen
    ``nn.Linear`` runs them, plus one pass each over x (row dot), y (epilogue: one read, one
    write), dy (row dot v), dx (epilogue), x (da) and dy (db, dbias) for the rank-1 parts."""
    f4 = 4
    nk, nm, mk = n * k, n * m, m * k
    gemm = 2 * n * k * m

    def kc(op: str, name: str, flops: int, nbytes: int) -> KernelCost:
        return KernelCost("cublas", op, name, flops, nbytes)

    return [
        kc("forward", "rowdot_kernel u = x.a", 2 * nk, elt * nk + f4 * (k + n)),
        kc("forward", "cuBLAS y = x W^T + bias", gemm + nm, elt * (nk + mk + nm + m)),
        kc("forward", "rank1_epilogue_kernel y += s u b^T", 3 * nm, 2 * elt * nm + f4 * (n + m)),
        kc("backward", "rowdot_kernel v = dy.b", 2 * nm, elt * nm + f4 * (m + n)),
        kc("backward", "cuBLAS dx = dy W", gemm, elt * (nm + mk + nk)),
        kc("backward", "rank1_epilogue_kernel dx += s v a^T", 3 * nk, 2 * elt * nk + f4 * (n + k)),
        *colsum_costs("cublas", n, k, m, elt),
    ]


def path_comparison(
    n: int, k: int, m: int, dtype: str = "bf16", ceilings: Ceilings = H100
) -> list[dict[str, Any]]:
    """Predicted times of the Triton backend's two paths next to the frozen ``nn.Linear``.

    One dict per operation (forward, backward, forward+backward): ``linear_us``, ``fused_us``,
    ``cublas_us`` (predictions, ``KernelCost.predicted_s`` summed over each path's kernels),
    the bytes of each, and ``cublas_over_fused`` / ``cublas_over_linear``. The cuBLAS path pays
    the extra passes over x, y, dy and dx that the fused kernel folds into its GEMM; it never
    pays a slower GEMM.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    elt = DTYPE_BYTES[dtype]
    kernels = kernel_costs(n, k, m, elt) + cublas_path_costs(n, k, m, elt)
    out = []
    for op in ("forward", "backward", "forward+backward"):
        row: dict[str, Any] = {"operation": op, "N": n, "K": k, "M": m, "dtype": dtype}
        for path in ("linear", "fused", "cublas"):
            mine = [c for c in kernels if c.path == path and c.operation in _members(op)]
            row[f"{path}_us"] = sum(c.predicted_s(ceilings, dtype) for c in mine) * 1e6
            row[f"{path}_bytes"] = sum(c.bytes for c in mine)
        row["cublas_over_fused"] = row["cublas_us"] / row["fused_us"]
        row["cublas_over_linear"] = row["cublas_us"] / row["linear_us"]
        out.append(row)
    return out
