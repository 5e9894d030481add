"""Accuracy study on the demo task: XGBLoRA vs rank-1 LoRA vs LoRA r=8 vs full fine-tuning.

Every run has the same total optimizer steps, batch size and data order (per seed), runs in its
own process (so its peak resident memory is its own) and is the ``xgblora-fast finetune`` CLI.
Then single-seed ablations of ``kappa``, ``L_s`` and merge rounding (bf16 weights, where the
rounding matters). Writes ``bench/results/accuracy.{json,md,png}``.

    python bench/accuracy.py                 # the full study (~1 h on 2 CPU cores)
    python bench/accuracy.py --steps 20 --seeds 0 --no-ablations --eval-limit 200   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"

# name -> extra CLI options; the learning rate of each method is a usual one for it.
METHODS = {
    "XGBLoRA (rank-1 boosting)": ["--method", "xgblora", "--lr", "5e-3"],
    "LoRA r=1 (peft)": ["--method", "lora", "--lora-rank", "1", "--lr", "5e-3"],
    "LoRA r=8 (peft)": ["--method", "lora", "--lora-rank", "8", "--lr", "2e-3"],
    "full fine-tuning": ["--method", "full", "--lr", "5e-5"],
}
ABLATIONS = {
    "kappa=5": ["--kappa", "5"],
    "kappa=25": ["--kappa", "25"],
    "L_s=1 block": ["--layers-per-round", "1"],
    "L_s=all": ["--layers-per-round", "1.0"],
    "bf16, nearest merges": ["--dtype", "bfloat16", "--rounding", "nearest"],
    "bf16, stochastic merges": ["--dtype", "bfloat16", "--rounding", "stochastic"],
}


def run_one(options: list[str], seed: int, args: argparse.Namespace) -> dict:
    """One ``xgblora-fast finetune`` process; its summary plus its peak RSS in MiB."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "xgblora_fast.cli",
            "finetune",
            "--output",
            out,
            "--steps",
            str(args.steps),
            "--seed",
            str(seed),
            "--eval-every",
            "0",
            "--no-save-model",
            *(["--eval-limit", str(args.eval_limit)] if args.eval_limit else []),
            *options,
        ]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        stderr = proc.stderr.read()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
        summary = json.loads((Path(out) / "summary.json").read_text())
    summary.pop("train_loss")
    summary["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_report(results: dict, args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Accuracy study: MiniLM on movie review snippets, {args.steps} steps of "
        f"batch {args.batch_size}, seeds {args.seeds}",
        "",
        "Test accuracy (held-out 20%) as mean ± sd over seeds; trainable parameters per step "
        "(the adapters being trained at that moment, plus the 770-parameter task head) and "
        "cumulative over the run (XGBLoRA: summed over rounds); time per step and peak resident "
        "memory on 2 CPU cores, all measured in this run.",
        "",
        "| method | accuracy | trainable / step | cumulative trainable | s / step | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results["main"].items():
        acc = mean_sd([r["after"]["accuracy"] for r in runs])
        lines.append(
            f"| {name} | {acc[0]:.4f} ± {acc[1]:.4f} | {runs[0]['trainable_params_per_step']:,} "
            f"| {runs[0]['cumulative_trainable_params']:,} "
            f"| {statistics.fmean(r['seconds_per_step'] for r in runs):.3f} "
            f"| {max(r['peak_rss_mib'] for r in runs):.0f} |"
        )
    before = statistics.fmean(
        r["before"]["accuracy"] for runs in results["main"].values() for r in runs
    )
    lines += ["", f"Accuracy before fine-tuning (fresh head): {before:.4f}."]
    if results["ablations"]:
        lines += [
            "",
            f"## XGBLoRA ablations (seed {args.seeds[0]}; default kappa=10, L_s=0.35 of the "
            "blocks, fp32 weights)",
            "",
            "| variant | accuracy | cumulative trainable |",
            "|---|---|---|",
        ]
        default = results["main"]["XGBLoRA (rank-1 boosting)"][0]  # the same seed, defaults
        lines.append(
            f"| default (kappa=10, L_s=0.35) | {default['after']['accuracy']:.4f} "
            f"| {default['cumulative_trainable_params']:,} |"
        )
        for name, r in results["ablations"].items():
            lines.append(
                f"| {name} | {r['after']['accuracy']:.4f} | {r['cumulative_trainable_params']:,} |"
            )
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "accuracy.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if results["ablations"] else 1, figsize=(12, 4), squeeze=False)
    names = list(results["main"])
    stats = [mean_sd([r["after"]["accuracy"] for r in results["main"][n]]) for n in names]
    ax = axes[0][0]
    ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
    for i, name in enumerate(names):  # every seed as a dot: 3 seeds say more than a bar
        accs = [r["after"]["accuracy"] for r in results["main"][name]]
        ax.plot([i] * len(accs), accs, "k.", alpha=0.6)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylim(min(m for m, _ in stats) - 0.05, max(m for m, _ in stats) + 0.03)
    ax.set_ylabel("test accuracy")
    ax.set_title("same steps, same data order (mean ± sd over seeds)")
    if results["ablations"]:
        ax = axes[0][1]
        abl = {"default": results["main"]["XGBLoRA (rank-1 boosting)"][0]} | results["ablations"]
        ax.barh(range(len(abl)), [r["after"]["accuracy"] for r in abl.values()])
        ax.set_yticks(range(len(abl)), list(abl), fontsize=8)
        accs = [r["after"]["accuracy"] for r in abl.values()]
        ax.set_xlim(min(accs) - 0.05, max(accs) + 0.02)
        ax.set_xlabel("test accuracy")
        ax.set_title("XGBLoRA ablations (one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-limit", type=int, default=None, help="test rows (default: all)")
    p.add_argument("--no-ablations", dest="ablations", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    p.add_argument("--report-only", action="store_true", help="re-render OUT/accuracy.json")
    args = p.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "accuracy.json").read_text())
        args.steps, args.seeds = results["steps"], results["seeds"]
        args.batch_size = results.get("batch_size", args.batch_size)
        write_report(results, args)
        print((args.out / "accuracy.md").read_text())
        return
    jobs = [("main", name, opts, seed) for name, opts in METHODS.items() for seed in args.seeds]
    if args.ablations:
        base = METHODS["XGBLoRA (rank-1 boosting)"]
        jobs += [
            ("ablations", name, base + opts, args.seeds[0]) for name, opts in ABLATIONS.items()
        ]
    results: dict = {
        "main": {},
        "ablations": {},
        "steps": args.steps,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
    }
    for kind, name, opts, seed in tqdm(jobs, desc="accuracy study", unit="run"):
        summary = run_one([*opts, "--batch-size", str(args.batch_size)], seed, args)
        if kind == "main":
            results["main"].setdefault(name, []).append(summary)
        else:
            results["ablations"][name] = summary
        write_report(results, args)  # partial results survive an interrupted study
    print((args.out / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
