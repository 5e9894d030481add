"""Outputs of ``bench/microbench.py``: CSV, JSON, markdown summary with the goals, PNG plots.

Under ``--out`` (default ``bench/results``), named ``microbench_<device><tag>``: a tidy CSV and a
JSON (``{"meta", "rows"}``) with one row per (operation, provider, shape, N, dtype) (fields:
``timing.COLUMNS``), a markdown summary (ratio tables and the goals of issue #5, held or not on
these rows; the merge-memory goal reads ``bench/memory.py``'s JSON of the same device and tag
when it is there) and PNG plots (fwd+bwd ratio vs N per shape; merge time vs copy).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from microbench_providers import LAYER_OPS
from timing import COLUMNS

from xgblora_fast.tools.roofline import (
    PROVIDER_FLOOR,
    PROVIDER_PEFT_R1,
    provider_bound_kept,
    provider_fused,
)


# ------------------------------------------------------------------------------------ outputs
def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["operation"], r["provider"], r["M"], r["K"], r["N"], r["dtype"]): r for r in rows}


def _fused_backend(rows: list[dict[str, Any]]) -> str:
    """The backend the goals are held against: Triton on CUDA, else torch."""
    return "triton" if provider_fused("triton") in {r["provider"] for r in rows} else "torch"


def _fused_name(rows: list[dict[str, Any]]) -> str:
    """The fused provider the goals are held against."""
    return provider_fused(_fused_backend(rows))


def evaluate_goals(
    rows: list[dict[str, Any]], meta: dict[str, Any], memory: dict[str, Any] | None
) -> list[tuple[str, str, bool | None]]:
    """Issue #5's goals on these rows: ``(goal, evidence, held)``; None when not measured here."""
    index = _index(rows)
    fused = _fused_name(rows)
    fb = [r for r in rows if r["operation"] == "forward+backward"]
    cases = sorted({(r["M"], r["K"], r["N"], r["dtype"]) for r in fb})

    def ratio(provider: str, case: tuple) -> float:
        m, k, n, dtype = case
        return index["forward+backward", provider, m, k, n, dtype]["ratio_to_floor"]

    def worst(values: list[tuple[float, tuple]], largest: bool = True) -> str:
        value, (m, k, n, dtype) = max(values) if largest else min(values)
        return f"worst {value:.3f} at {m}x{k} N={n} {dtype}"

    goals: list[tuple[str, str, bool | None]] = []
    if meta["device"] == "cpu":
        limit = 1.10
        over_floor = [(ratio(fused, c), c) for c in cases]
        big = [c for c in cases if c[2] >= 256]
        over_floor_big = [(ratio(fused, c), c) for c in big]
        goals.append(
            (
                f"{fused} fwd+bwd within {limit:.2f}x of frozen nn.Linear (every shape and N)",
                worst(over_floor)
                + (f"; N >= 256 only: {worst(over_floor_big)}" if over_floor_big else ""),
                all(v <= limit for v, _ in over_floor),
            )
        )
        speedup = [(ratio(PROVIDER_PEFT_R1, c) / ratio(fused, c), c) for c in big]
        goals.append(
            (
                f"{fused} fwd+bwd faster than peft LoRA r=1 at every shape with N >= 256",
                worst(speedup, largest=False) + " (peft time / ours)" if speedup else "no N >= 256",
                bool(speedup) and all(v > 1.0 for v, _ in speedup),
            )
        )
        goals.append(merge_memory_goal(memory))
    else:
        big = [c for c in cases if c[2] >= 2048]
        over_floor = [(ratio(fused, c), c) for c in big]
        speedup = [(ratio(PROVIDER_PEFT_R1, c) / ratio(fused, c), c) for c in big]
        goals.append(
            (
                f"{fused} fwd+bwd within 1.05x of cuBLAS frozen linear for N >= 2048",
                worst(over_floor) if big else "no N >= 2048",
                bool(big) and all(v <= 1.05 for v, _ in over_floor),
            )
        )
        goals.append(
            (
                f"{fused} fwd+bwd at least 1.3x faster than peft LoRA r=1 for N >= 2048",
                worst(speedup, largest=False) if big else "no N >= 2048",
                bool(big) and all(v >= 1.3 for v, _ in speedup),
            )
        )
        copy_gbps = meta["ceilings"]["copy_gbps"]
        # The merge a booster runs in training: from its second merge on, the bound is kept.
        kept = provider_bound_kept(_fused_backend(rows))
        merges = [r for r in rows if r["operation"] == "merge" and r["provider"] == kept]
        shares = [(r["gbps"] / copy_gbps, (r["M"], r["K"], 0, r["dtype"])) for r in merges]
        goals.append(
            (
                f"{kept}: merge at >= 85% of device copy bandwidth ({copy_gbps:.0f} GB/s)",
                worst(shares, largest=False) if shares else "no merge rows",
                bool(shares) and all(v >= 0.85 for v, _ in shares),
            )
        )
    return goals


def merge_memory_goal(memory: dict[str, Any] | None) -> tuple[str, str, bool | None]:
    """The merge-memory goal from ``bench/memory.py``'s JSON (None: not measured yet)."""
    goal = "merge with no full-size temporary (bench/memory.py)"
    rows = [r for r in (memory or {}).get("rows", []) if r.get("kind") == "merge"]
    ours = [r for r in rows if r["provider"].startswith("xgblora-fast[")]
    if not ours:
        return goal, "memory benchmark not run", None
    r = max(ours, key=lambda r: r["weight_mib"])
    evidence = (
        f"extra {r['extra_mib']:.1f} MiB for a {r['weight_mib']:.0f} MiB W "
        f"({r['M']}x{r['K']} {r['dtype']})"
    )
    return goal, evidence, r["extra_mib"] < r["weight_mib"]


def _ratio_table(rows: list[dict[str, Any]], operation: str, providers: list[str]) -> list[str]:
    index = _index(rows)
    fused = _fused_name(rows)
    cases = sorted(
        {
            (r["M"], r["K"], r["N"], r["dtype"], r["layer"])
            for r in rows
            if r["operation"] == operation
        },
        key=lambda c: (c[3], c[1] * c[0], c[0], c[2]),
    )
    head = ["M x K", "layer", "N", "dtype", "floor p50 ms", *providers, "peft r=1 / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, k, n, dtype, layer in cases:
        floor = index[operation, PROVIDER_FLOOR, m, k, n, dtype]
        cells = [f"{m}x{k}", layer, str(n), dtype, f"{floor['p50_ms']:.3f}"]
        for p in providers:
            row = index.get((operation, p, m, k, n, dtype))
            cells.append(f"{row['ratio_to_floor']:.3f}" if row else "-")
        ours, peft = (
            index[operation, fused, m, k, n, dtype],
            index[operation, PROVIDER_PEFT_R1, m, k, n, dtype],
        )
        cells.append(f"{peft['p50_ms'] / ours['p50_ms']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _merge_table(rows: list[dict[str, Any]], copy_gbps: float) -> list[str]:
    merges = [r for r in rows if r["operation"] == "merge"]
    providers = list(dict.fromkeys(r["provider"] for r in merges))
    index = _index(rows)
    cases = sorted(
        {(r["M"], r["K"], r["dtype"]) for r in merges}, key=lambda c: (c[2], c[0] * c[1])
    )
    fused = _fused_name(rows)
    kept = provider_bound_kept(_fused_backend(rows))
    ours = [p for p in (fused, kept) if p in providers]
    head = ["M x K", "dtype", *providers, *(f"{p} GB/s (% of copy ceiling)" for p in ours)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, k, dtype in cases:
        cells = [f"{m}x{k}", dtype]
        for p in providers:
            row = index.get(("merge", p, m, k, 0, dtype))
            cells.append(f"{row['p50_ms']:.2f} ms ({row['ratio_to_floor']:.2f})" if row else "-")
        for p in ours:
            gbps = index["merge", p, m, k, 0, dtype]["gbps"]
            cells.append(f"{gbps:.1f} ({100 * gbps / copy_gbps:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(
    rows: list[dict[str, Any]], meta: dict[str, Any], memory: dict[str, Any] | None, stem: str
) -> str:
    """The markdown summary: set-up, goals, ratio tables per operation, merge table."""
    ceil = meta["ceilings"]
    gemm = ", ".join(f"{d} {v:.2f} TFLOP/s" for d, v in ceil["gemm_tflops"].items())
    layer_providers = [
        p
        for p in dict.fromkeys(r["provider"] for r in rows if r["operation"] == "forward")
        if p != PROVIDER_FLOOR
    ]
    fused = _fused_name(rows)
    fb_ours = [r for r in rows if r["operation"] == "forward+backward" and r["provider"] == fused]
    best = max(fb_ours, key=lambda r: r["tflops"])
    lines = [
        f"# Microbenchmarks on {meta['device']} ({meta['device_name']})",
        "",
        f"{meta['date']}; torch {meta['torch']}, xgblora-fast {meta['xgblora_fast']}, "
        f"{meta['threads']} threads on {meta['cpu_count']} CPUs; timer: {meta['timer']}; "
        f"{meta['seconds'] / 60:.1f} min. Produced by `python bench/microbench.py`; data: "
        f"`{stem}.csv` / `{stem}.json`; plots: `{stem}_fwdbwd.png`, `{stem}_merge.png`.",
        "",
        f"Ceilings measured in this run: copy {ceil['copy_gbps']:.1f} GB/s, GEMM {gemm}. "
        f"Best fwd+bwd of {fused}: {best['tflops']:.2f} TFLOP/s ({best['M']}x{best['K']} "
        f"N={best['N']} {best['dtype']}).",
        "",
        "Ratios are p50 times over the floor's p50 in the same run (floor: frozen `nn.Linear` "
        "for the layer operations, one `copy_` of W for the merge); lower is better. "
        "'peft r=1 / ours' > 1 means we are faster. Every provider was checked against a "
        "float64 reference before it was timed.",
        "",
        "## Goals (issue #5)",
        "",
        "| goal | evidence | held |",
        "|---|---|---|",
    ]
    for goal, evidence, held in evaluate_goals(rows, meta, memory):
        verdict = "not measured" if held is None else ("yes" if held else "**no**")
        lines.append(f"| {goal} | {evidence} | {verdict} |")
    for operation in LAYER_OPS:
        lines += ["", f"## {operation}: time / frozen nn.Linear", ""]
        lines += _ratio_table(rows, operation, layer_providers)
    lines += ["", "## merge: p50 ms (time / one copy of W)", ""]
    lines += _merge_table(rows, ceil["copy_gbps"])
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path_fwdbwd: Path, path_merge: Path) -> None:
    """fwd+bwd ratio to the floor vs N, one panel per shape; merge time / copy per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fb = [r for r in rows if r["operation"] == "forward+backward"]
    shapes = list(dict.fromkeys((r["M"], r["K"]) for r in fb))
    providers = [p for p in dict.fromkeys(r["provider"] for r in fb) if p != PROVIDER_FLOOR]
    dtypes = list(dict.fromkeys(r["dtype"] for r in fb))
    cols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (m, k) in zip(axes.flat, shapes, strict=False):
        for p in providers:
            for style, dtype in zip(("-", "--", ":"), dtypes, strict=False):
                pts = sorted(
                    (r["N"], r["ratio_to_floor"])
                    for r in fb
                    if (r["M"], r["K"], r["provider"], r["dtype"]) == (m, k, p, dtype)
                )
                if pts:
                    label = p if len(dtypes) == 1 else f"{p} {dtype}"
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"W {m}x{k}", fontsize=9)
        ax.set_xlabel("tokens N")
        ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path_fwdbwd, dpi=110)
    plt.close(fig)

    merges = [r for r in rows if r["operation"] == "merge"]
    cases = list(dict.fromkeys((r["M"], r["K"], r["dtype"]) for r in merges))
    names = list(dict.fromkeys(r["provider"] for r in merges))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) + 2), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [
            next(
                (
                    r["ratio_to_floor"]
                    for r in merges
                    if (r["M"], r["K"], r["dtype"]) == c and r["provider"] == name
                ),
                np.nan,
            )
            for c in cases
        ]
        ax.bar(np.arange(len(cases)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{m}x{k}\n{d}" for m, k, d in cases], fontsize=8)
    ax.set_ylabel("merge time / copy of W")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_merge, dpi=110)
    plt.close(fig)


def write_results(
    rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, stem: str, plots: bool = True
) -> list[Path]:
    """CSV, JSON, markdown (and PNG plots) under ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.csv", out / f"{stem}.json", out / f"{stem}.md"]
    with paths[0].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    paths[1].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    memory_path = out / f"{stem.replace('microbench', 'memory', 1)}.json"  # same device and tag
    memory = json.loads(memory_path.read_text()) if memory_path.is_file() else None
    paths[2].write_text(summary_markdown(rows, meta, memory, stem))
    if plots:
        paths += [out / f"{stem}_fwdbwd.png", out / f"{stem}_merge.png"]
        plot(rows, paths[3], paths[4])
    return paths
