"""Precision of repeated merges: nearest, stochastic, Kahan and an fp32 master copy vs float64.

A weight ``W0 ~ N(0, 0.02^2)`` (bf16 or fp16; one ``--rows x --cols`` block per update ratio)
receives ``max(--merges)`` random rank-1 updates ``b a^T`` through ``xf.merge_`` (the PyTorch
path, whose bits every backend reproduces), each block's of Frobenius norm ``ratio * |W0|_F``.
The truth ``W0 + sum of updates`` is accumulated in float64; after ``T`` merges the error is

    |W_T - W_truth|_F / |sum of the T updates|_F

(the share of the fine-tune that the weight lost or distorted) for each way of merging:

- ``nearest``: round-to-nearest-even into the weight's dtype at every merge;
- ``stochastic``: stochastic rounding (a fresh seed per merge);
- ``kahan``: nearest with a compensation buffer of the weight's dtype (the error is W's alone:
  the buffer is not part of the model);
- ``fp32_master``: an fp32 copy takes the merges and is rounded once into the dtype at the end
  (the reference: it costs twice a 16-bit weight's memory, the Kahan buffer once).

The update ratios default to what a real run logs: ``Booster.history`` records each merge's
``relative_update`` (``|s b a^T|_F / |W|_F``); ``--history`` reads a run's ``history.json``.

    python bench/precision.py              # ~30 s on 2 idle CPU cores
    python bench/precision.py --quick      # seconds

Writes ``precision.json`` (configuration and every measurement), ``precision.md`` (tables) and
``precision.png`` (log-log error vs merges, one panel per dtype and ratio) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import xgblora_fast as xf

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("nearest", "stochastic", "kahan", "fp32_master")
# Relative update sizes |s b a^T|_F / |W|_F per merge, as logged by the demo's set-up in bf16
# (`finetune --dtype bfloat16 --steps 30 --kappa 5`, 57 merges): min 9.4e-4, quartiles 2.7e-3,
# 5.2e-3, 8.7e-3, max 9.3e-2 (the pooler).
DEFAULT_RATIOS = (1e-3, 3e-3, 1e-2, 3e-2)


def ratios_from_history(path: Path) -> list[float]:
    """Every merge's relative update norm in a run's ``history.json`` (its ``rounds``, or a
    bare list of ``Booster.history`` entries)."""
    history = json.loads(path.read_text())
    entries = history["rounds"] if isinstance(history, dict) else history
    return [
        r
        for entry in entries
        for r in entry.get("relative_update", {}).values()
        if math.isfinite(r)
    ]


def run_one(
    dtype: torch.dtype,
    shape: tuple[int, int],
    ratios: list[float],
    checkpoints: list[int],
    seed: int,
    bar: tqdm,
) -> dict[float, dict[str, dict[int, float]]]:
    """``{ratio: {method: {T: error}}}`` for one sequence of ``max(checkpoints)`` merges.

    One weight of ``len(ratios)`` row blocks of ``shape``, one block per ratio, so that each
    merge is one call per method: ``b``'s block for ``ratio`` is scaled so that the block's
    update ``b_blk a^T`` has Frobenius norm ``ratio * |W0_blk|_F``. Every method sees the same
    fp32 ``a`` and ``b``.
    """
    rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(len(ratios) * rows, cols, generator=g) * 0.02).to(dtype)
    blocks = [slice(i * rows, (i + 1) * rows) for i in range(len(ratios))]
    targets = [q * float(w0[blk].double().norm()) for q, blk in zip(ratios, blocks, strict=True)]
    truth = w0.double()
    weights = {m: w0.clone() for m in ("nearest", "stochastic", "kahan")}
    compensation = torch.zeros_like(w0)
    master = w0.float()
    errors: dict[float, dict[str, dict[int, float]]] = {q: {m: {} for m in METHODS} for q in ratios}
    for t in range(1, max(checkpoints) + 1):
        a = torch.randn(cols, generator=g)
        b = torch.randn(len(ratios) * rows, generator=g)
        for blk, target in zip(blocks, targets, strict=True):
            b[blk] *= target / float(a.norm() * b[blk].norm())
        xf.merge_(weights["nearest"], a, b, 1.0, "nearest", backend="torch")
        xf.merge_(weights["stochastic"], a, b, 1.0, "stochastic", seed * 100_003 + t, "torch")
        xf.merge_(weights["kahan"], a, b, 1.0, "kahan", backend="torch", compensation=compensation)
        xf.merge_(master, a, b, 1.0, "nearest", backend="torch")
        truth += b.double()[:, None] * a.double()[None, :]
        if t in checkpoints:
            final = {**weights, "fp32_master": master.to(dtype)}
            for q, blk in zip(ratios, blocks, strict=True):
                moved = float((truth[blk] - w0[blk].double()).norm())
                for method, w in final.items():
                    errors[q][method][t] = float((w[blk].double() - truth[blk]).norm()) / moved
        bar.update()
    return errors


def summarize(runs: list[dict]) -> list[dict]:
    """Mean error over seeds per (dtype, ratio, method, merges)."""
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        groups.setdefault((r["dtype"], r["ratio"], r["method"], r["merges"]), []).append(r["error"])
    return [
        {"dtype": d, "ratio": q, "method": m, "merges": t, "error": statistics.fmean(v)}
        for (d, q, m, t), v in groups.items()
    ]


def markdown(summary: list[dict], config: dict) -> str:
    """One table per dtype: rows (ratio, method), columns the merge counts."""
    counts = config["merges"]
    lines = [
        "# Precision of repeated merges",
        "",
        f"`|W_T - W_truth|_F / |sum of updates|_F` after T merges (truth in float64), "
        f"W ~ N(0, 0.02^2) in {config['block'][0]}x{config['block'][1]} blocks, one per "
        f"ratio, mean over seeds "
        f"{config['seeds']}; ratio = |s b a^T|_F / |W|_F per merge. "
        "Written by `bench/precision.py`.",
    ]
    table = {(r["dtype"], r["ratio"], r["method"], r["merges"]): r["error"] for r in summary}
    for dtype in config["dtypes"]:
        lines += ["", f"## {dtype}", ""]
        lines.append("| ratio | method | " + " | ".join(f"T={t}" for t in counts) + " |")
        lines.append("|---|---|" + "---:|" * len(counts))
        for ratio in config["ratios"]:
            for method in METHODS:
                cells = " | ".join(f"{table[(dtype, ratio, method, t)]:.2e}" for t in counts)
                lines.append(f"| {ratio:g} | {method} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes, ratios = config["dtypes"], config["ratios"]
    fig, axes = plt.subplots(
        len(dtypes), len(ratios), figsize=(3.2 * len(ratios), 2.8 * len(dtypes)), squeeze=False
    )
    for i, dtype in enumerate(dtypes):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            for method in METHODS:
                pts = sorted(
                    (r["merges"], r["error"])
                    for r in summary
                    if (r["dtype"], r["ratio"], r["method"]) == (dtype, ratio, method)
                )
                # The fp32 master dashed on top: Kahan's line lies under it.
                style = {"ls": "--", "marker": "x"} if method == "fp32_master" else {"marker": "o"}
                ax.loglog(*zip(*pts, strict=True), ms=3, label=method, **style)
            ax.set_title(f"{dtype}, ratio {ratio:g}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(dtypes) - 1:
                ax.set_xlabel("merges T")
            if j == 0:
                ax.set_ylabel("rel. error vs float64")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--rows", type=int, default=128, help="rows of W per update ratio")
    p.add_argument("--cols", type=int, default=128, help="columns of W")
    p.add_argument("--merges", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    p.add_argument("--ratios", type=float, nargs="+", default=None)
    p.add_argument("--history", type=Path, default=None, help="a run's history.json: its ratios")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--quick", action="store_true", help="16x64 blocks, T up to 100")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    # Each merge is small: torch's intra-op threads would only spin against each other.
    torch.set_num_threads(1)
    if args.quick:
        args.rows, args.cols, args.merges = 16, 64, [10, 30, 100]
    ratios = args.ratios or list(DEFAULT_RATIOS)
    source = "--ratios" if args.ratios else "default (bf16 demo run)"
    if args.history is not None and args.ratios is None:
        logged = sorted(ratios_from_history(args.history))
        # Quartiles and extremes of the logged merges: the range a real run spans.
        ratios = sorted({logged[round(q * (len(logged) - 1))] for q in (0.0, 0.25, 0.5, 1.0)})
        source = str(args.history)
    config = {
        "dtypes": args.dtypes,
        "block": [args.rows, args.cols],
        "merges": sorted(args.merges),
        "ratios": ratios,
        "ratio_source": source,
        "seeds": args.seeds,
        "weight_std": 0.02,
        "backend": "torch",
    }
    runs = []
    todo = [(d, s) for d in args.dtypes for s in args.seeds]
    shape = (args.rows, args.cols)
    with tqdm(total=len(todo) * max(args.merges), desc="merges", unit="step") as bar:
        for dtype, seed in todo:
            errors = run_one(DTYPES[dtype], shape, ratios, config["merges"], seed, bar)
            runs += [
                {"dtype": dtype, "ratio": q, "seed": seed, "method": m, "merges": t, "error": e}
                for q, per_method in errors.items()
                for m, per_t in per_method.items()
                for t, e in per_t.items()
            ]
    summary = summarize(runs)
    result = {"config": config, "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=1))
    (args.out / "precision.md").write_text(markdown(summary, config))
    plot(summary, config, args.out / "precision.png")
    print(markdown(summary, config))
    return result


if __name__ == "__main__":
    main()
