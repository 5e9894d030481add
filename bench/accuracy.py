"""Accuracy study on the demo task: XGBLoRA vs a COLA-style chain vs LoRA r=1/r=8 vs full.

Every run has the same total optimizer steps, batch size and data order (per seed), runs in its
own process (so its peak resident memory is its own) and is the ``xgblora-fast finetune`` CLI.
Runs are cached by ``(method, steps, seed)`` in ``accuracy.json``, so budgets and seeds can be
added across sessions; ``accuracy.md`` has a table across budgets (every seed's accuracy) and
one table per budget, ``accuracy.png`` one panel per budget, ``accuracy_budgets.png`` accuracy
against steps, ``accuracy_paired.png`` the defaults minus each baseline seed by seed,
``accuracy_curves.png`` the training loss (means of 10 steps) of the runs that
recorded it.
XGBLoRA variants one factor at a time are ``bench/schedule.py``'s job.

    python bench/accuracy.py                          # 200 steps, seeds 0 1 2 (~1.5 h, 2 cores)
    python bench/accuracy.py --steps 1000 --seeds 0   # add a budget
    python bench/accuracy.py --seeds 0 --methods "LoRA r=1 (peft)" --refresh   # run it again
    python bench/accuracy.py --steps 20 --seeds 0 --eval-limit 200 --out /tmp/a   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
CURVE_WINDOW = 10  # steps per point of a run's recorded training-loss curve


def xgblora(
    growth: str, layers: str, init: str, select: str, rewarm: str, *extra: str
) -> list[str]:
    """XGBLoRA options with every schedule knob pinned, so new defaults do not move a cached run."""
    return [
        "--method", "xgblora", "--lr", "5e-3", "--alpha", "2", "--kappa", "10",
        "--kappa-growth", growth, "--layers-per-round", layers, "--booster-init", init,
        "--select", select, "--rewarm-steps", rewarm, "--booster-keep", "0",
        "--weight-decay", "1e-4", *extra,
    ]  # fmt: skip


def lora(rank: str, lr: str, weight_decay: str) -> list[str]:
    """peft LoRA options; its factors take the boosters' --weight-decay, so it is pinned."""
    return [
        "--method", "lora", "--lora-rank", rank, "--lr", lr, "--weight-decay", weight_decay
    ]  # fmt: skip


# The defaults' schedule (every layer, rounds growing 1.5x, 90% of each booster kept).
DEFAULT_SCHEDULE = ("1.5", "1.0", "carry", "gradient", "0", "--booster-keep", "0.9")

# name -> extra CLI options; the learning rate of each method is a usual one for it.
METHODS = {
    # The defaults (XGBLoRAConfig / the CLI): every layer, rounds of 10, 15, 22, ... steps
    # (kappa 10 * 1.5**k), each merge 10% of the booster (a kept, b <- 0.9 b), AdamW weight
    # decay 0.3 on the boosters.
    "XGBLoRA (defaults: all layers, rounds growing 1.5x, 90% kept, weight decay 0.3)": xgblora(
        *DEFAULT_SCHEDULE, "--weight-decay", "0.3"
    ),
    # ... with the boosters' Adam state kept across merges (a merge that keeps 90% of the
    # booster otherwise restarts it with full-lr sign steps).
    "XGBLoRA (defaults, Adam state kept at merges)": xgblora(
        *DEFAULT_SCHEDULE, "--weight-decay", "0.3", "--optimizer-reset", "none"
    ),
    # ... and a smaller lr: at 3000 steps (weight decay 1e-4, seed 0) 3e-3 gained 1.3 points;
    # with decay 0.3 it lost 0.3 and 1.3 (seeds 0, 1).
    "XGBLoRA (defaults, lr 3e-3)": xgblora(
        *DEFAULT_SCHEDULE, "--weight-decay", "0.3", "--lr", "3e-3"
    ),
    # The defaults before weight decay 0.3 (0.1). Its runs are bench/schedule.py's "L_s all,
    # kappa growth 1.5, keep 0.9, weight decay 0.1" (select uniform; with every unit active
    # and a carried, the selection changes no number: the 200-step runs of both agree to the
    # last digit).
    "XGBLoRA (all layers, rounds growing 1.5x, 90% kept, weight decay 0.1; earlier defaults)": (
        xgblora(*DEFAULT_SCHEDULE, "--weight-decay", "0.1")
    ),
    # The defaults before weight decay 0.1 (1e-4): the same rounds and partial merges.
    "XGBLoRA (all layers, rounds growing 1.5x, 90% kept; earlier defaults)": xgblora(
        *DEFAULT_SCHEDULE
    ),
    # The defaults before partial merges: the same rounds, every restart from b = 0, random a.
    "XGBLoRA (all layers, rounds growing 1.5x, random restarts; earlier defaults)": xgblora(
        "1.5", "1.0", "random", "gradient", "0"
    ),
    # The defaults before growing rounds: gradient-aligned boosters on 67% of the blocks,
    # chosen by need, rounds of 10 steps with a 3-step re-warm-up.
    "XGBLoRA (gradient-aligned, L_s 0.67; earlier defaults)": xgblora(
        "1", "0.67", "gradient", "gradient", "3"
    ),
    # The same with the gradient init in the first 20 rounds only, then random a.
    "XGBLoRA (gradient-aligned, gradient init in 20 rounds)": xgblora(
        "1", "0.67", "gradient", "gradient", "3", "--gradient-init-rounds", "20"
    ),
    # Earlier defaults: what the schedule search (bench/schedule.py) moved on from.
    "XGBLoRA (gradient init + select, L_s 0.5)": xgblora("1", "0.5", "gradient", "gradient", "0"),
    "XGBLoRA (gradient init + select, L_s 0.35)": xgblora(
        "1", "0.35", "gradient", "gradient", "0"
    ),
    # The recipe as the paper states it.
    "XGBLoRA (literal recipe)": xgblora("1", "0.35", "random", "uniform", "0"),
    # COLA (Chain of LoRA): rank-1 LoRA on every layer, merged and restarted every kappa steps.
    "COLA-style chain (rank-1, all layers)": xgblora("1", "1.0", "random", "gradient", "0"),
    "LoRA r=1 (peft)": lora("1", "5e-3", "1e-4"),
    # LoRA given the boosters' default weight decay (0.1): the study's controls for that remedy.
    "LoRA r=1 (peft), weight decay 0.1": lora("1", "5e-3", "0.1"),
    "LoRA r=1 (peft), weight decay 0.3": lora("1", "5e-3", "0.3"),
    "LoRA r=8 (peft)": lora("8", "2e-3", "1e-4"),
    "LoRA r=8 (peft), weight decay 0.1": lora("8", "2e-3", "0.1"),
    "LoRA r=8 (peft), weight decay 0.3": lora("8", "2e-3", "0.3"),
    "full fine-tuning": ["--method", "full", "--lr", "5e-5"],
}  # fmt: skip


# accuracy.md's paired table: these XGBLoRA rows against every method not named "XGBLoRA ...",
# seed by seed (a seed fixes the data order, so the pair shares that luck).
PAIRED = (
    "XGBLoRA (defaults: all layers, rounds growing 1.5x, 90% kept, weight decay 0.3)",
    "XGBLoRA (defaults, Adam state kept at merges)",
    "XGBLoRA (defaults, lr 3e-3)",
    "XGBLoRA (all layers, rounds growing 1.5x, 90% kept, weight decay 0.1; earlier defaults)",
)


def key(name: str, steps: int, seed: int) -> str:
    """The cache key of one run."""
    return f"{name} | steps={steps} | seed={seed}"


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
        peak_rss_mib, wall_seconds = run_process(cmd, Path(out))
        summary = json.loads((Path(out) / "summary.json").read_text())
    summary["loss_curve"] = loss_curve(summary.pop("train_loss"))
    # the CLI restarts the kernel's peak per phase: the process's is the highest of them all
    summary["peak_rss_mib"] = max([peak_rss_mib, *summary["phase_peak_rss_mib"].values()])
    summary["wall_seconds"] = wall_seconds
    return summary


def run_process(cmd: list[str], folder: Path) -> tuple[float, float]:
    """Run ``cmd`` with its stderr in ``folder/stderr.log``: ``(peak RSS in MiB, wall seconds)``
    of that process alone; RuntimeError with the log's tail if it fails."""
    start = time.perf_counter()
    log = folder / "stderr.log"  # not a pipe: a long progress bar would fill one
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss: KiB on Linux


def loss_curve(losses: list[float], window: int = CURVE_WINDOW) -> list[float]:
    """Mean training loss of each ``window`` consecutive steps (the last window may be short)."""
    return [statistics.fmean(losses[i : i + window]) for i in range(0, len(losses), window)]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_budget(runs: dict[str, dict]) -> dict[int, dict[str, list[dict]]]:
    """``{steps: {method: [run per seed, in seed order]}}``, methods in ``METHODS`` order."""
    table: dict[int, dict[str, list[dict]]] = {}
    order = {name: i for i, name in enumerate(METHODS)}
    for r in sorted(runs.values(), key=lambda r: (order.get(r["name"], 99), r["seed"])):
        table.setdefault(r["steps"], {}).setdefault(r["name"], []).append(r)
    return dict(sorted(table.items()))


def moved(runs: list[dict]) -> str:
    """Mean relative weight change of the linear layers, over the runs that measured it.

    XGBLoRA also has the length of the path its rounds took (the sum of their update sizes).
    """
    changes = [r["weight_change"] for r in runs if "weight_change" in r]
    if not changes:
        return "-"
    text = f"{statistics.fmean(c['mean'] for c in changes):.3f}"
    if all("path_mean" in c for c in changes):
        text += f", path {statistics.fmean(c['path_mean'] for c in changes):.3f}"
    return f"{text} ({len(changes)})"


def save_run(path: Path, name: str, summary: dict, section: str | None = None) -> dict:
    """Add one run to a JSON cache (under ``section`` if given) and return the whole file.

    Re-reads the file first, so studies running side by side keep each other's results; the
    file is replaced atomically, so an interruption leaves the old or the new cache.
    """
    data = json.loads(path.read_text()) if path.exists() else {}
    (data.setdefault(section, {}) if section else data)[name] = summary
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return data


def write_report(results: dict, out: Path) -> None:
    """``accuracy.md`` (a table per budget) and the plot, from the cache's content."""
    lines = [
        f"# Accuracy study: MiniLM on movie review snippets, batch {results['batch_size']}",
        "",
        "Test accuracy on the 2,114 held-out snippets as mean ± sd over seeds (each seed also "
        "fixes the data order, the same for every method); trainable parameters per step (the "
        "adapters being trained at that moment, plus the 770-parameter task head) and cumulative "
        "over the run (XGBLoRA: summed over rounds); time per step and peak resident memory on "
        "2 CPU cores (indicative: other jobs may have shared the cores); how far the run moved "
        "the base model's linear layers, ‖W - W0‖ / ‖W0‖ averaged over the layers (XGBLoRA: also "
        "the path, the sum of its rounds' update sizes; in brackets: the seeds that measured "
        "it; runs before it was measured show -). Options per method: "
        "`bench/accuracy.py`.",
    ]
    lines += across_budgets(results["runs"])
    lines += paired_differences(results["runs"])
    for steps, methods in by_budget(results["runs"]).items():
        lora1 = methods.get("LoRA r=1 (peft)")
        lines += [
            "",
            f"## {steps} optimizer steps",
            "",
            "| method | seeds | accuracy | vs LoRA r=1 | trainable / step | cumulative trainable "
            "| s / step | peak RSS MiB | ‖ΔW‖ / ‖W0‖ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, runs in methods.items():
            acc = mean_sd([r["after"]["accuracy"] for r in runs])
            gap = (
                f"{acc[0] - mean_sd([r['after']['accuracy'] for r in lora1])[0]:+.4f}"
                if lora1
                else "-"
            )
            lines.append(
                f"| {name} | {len(runs)} | {acc[0]:.4f} ± {acc[1]:.4f} | {gap} "
                f"| {runs[0]['trainable_params_per_step']:,} "
                f"| {runs[0]['cumulative_trainable_params']:,} "
                f"| {statistics.fmean(r['seconds_per_step'] for r in runs):.3f} "
                f"| {max(r['peak_rss_mib'] for r in runs):.0f} | {moved(runs)} |"
            )
    befores = [r["before"]["accuracy"] for r in results["runs"].values()]
    lines += ["", f"Accuracy before fine-tuning (fresh head): {statistics.fmean(befores):.4f}."]
    borrowed = {k: r["source"] for k, r in results["runs"].items() if "source" in r}
    if borrowed:  # runs another study made with the same options, not repeated here
        lines += ["", "Runs taken from another study (the same command line):", ""]
        lines += [f"- {name}: {source}" for name, source in sorted(borrowed.items())]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "accuracy.png")
    plot_budgets(results, out / "accuracy_budgets.png")
    plot_paired(results, out / "accuracy_paired.png")
    plot_curves(results, out / "accuracy_curves.png")


def by_method(runs: dict[str, dict]) -> dict[str, dict[int, list[dict]]]:
    """``{method: {steps: [run per seed, in seed order]}}``, the transpose of ``by_budget``."""
    table: dict[str, dict[int, list[dict]]] = {}
    for steps, methods in by_budget(runs).items():
        for name, method_runs in methods.items():
            table.setdefault(name, {})[steps] = method_runs
    order = {name: i for i, name in enumerate(METHODS)}
    return dict(sorted(table.items(), key=lambda item: order.get(item[0], len(order))))


def across_budgets(runs: dict[str, dict]) -> list[str]:
    """Markdown lines: one row per method, one column per budget, with every seed's accuracy."""
    budgets = list(by_budget(runs))
    lines = [
        "",
        "## Across budgets",
        "",
        "Accuracy as mean ± sd, then each seed's (seed: accuracy); - where not run.",
        "",
        "| method | " + " | ".join(f"{steps} steps" for steps in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name, per_budget in by_method(runs).items():
        cells = []
        for steps in budgets:
            method_runs = per_budget.get(steps, [])
            if not method_runs:
                cells.append("-")
                continue
            acc = mean_sd([r["after"]["accuracy"] for r in method_runs])
            seeds = ", ".join(f"{r['seed']}: {r['after']['accuracy']:.4f}" for r in method_runs)
            cells.append(f"{acc[0]:.4f} ± {acc[1]:.4f} ({seeds})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def baselines(methods: dict[str, list[dict]]) -> list[str]:
    """The methods the ``PAIRED`` rows are compared with: every one not named "XGBLoRA ..."."""
    return [name for name in methods if not name.startswith("XGBLoRA")]


def accuracy_of(run: dict) -> float:
    return run["after"]["accuracy"]


def seed_differences(
    ours: list[dict], theirs: list[dict], value: Callable[[dict], float] = accuracy_of
) -> list[float]:
    """``value(ours) - value(theirs)`` (default: the accuracy), seed by seed, over the seeds
    both ran."""
    theirs_by_seed = {r["seed"]: value(r) for r in theirs}
    return [value(r) - theirs_by_seed[r["seed"]] for r in ours if r["seed"] in theirs_by_seed]


def paired_difference(
    ours: list[dict],
    theirs: list[dict],
    value: Callable[[dict], float] = accuracy_of,
    lower_is_better: bool = False,
) -> str:
    """``ours - theirs`` over the seeds both ran: mean ± standard error, and on how many seeds
    ours is ahead / behind (for a loss, ``lower_is_better``: ahead is lower)."""
    diffs = seed_differences(ours, theirs, value)
    if not diffs:
        return "-"
    mean, sd = mean_sd(diffs)
    error = f" ± {sd / len(diffs) ** 0.5:.4f}" if len(diffs) > 1 else ""
    sign = -1 if lower_is_better else 1
    ahead, behind = sum(sign * d > 0 for d in diffs), sum(sign * d < 0 for d in diffs)
    seeds = f"{len(diffs)} seed{'s' if len(diffs) > 1 else ''}"
    return f"{mean:+.4f}{error} ({seeds}, ahead on {ahead}, behind on {behind})"


def paired_differences(runs: dict[str, dict]) -> list[str]:
    """Markdown lines: per budget, each ``PAIRED`` row minus each baseline, seed by seed."""
    lines = [
        "",
        "## Paired differences",
        "",
        "XGBLoRA minus the method of the row, seed by seed over the seeds both ran: mean ± "
        "standard error of the differences, the number of seeds, and on how many XGBLoRA is "
        "ahead and behind (the rest: level). Runs of one seed share the data order, so a "
        "paired difference has less noise than the difference of two means.",
    ]
    for steps, methods in by_budget(runs).items():
        ours = [name for name in PAIRED if name in methods]
        theirs = baselines(methods)
        if not ours or not theirs:
            continue
        lines += [
            "",
            f"### {steps} steps",
            "",
            "| against | " + " | ".join(ours) + " |",
            "|---|" + "---|" * len(ours),
        ]
        for other in theirs:
            cells = [paired_difference(methods[name], methods[other]) for name in ours]
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return lines


def plot_paired(results: dict, path: Path) -> None:
    """The defaults (``PAIRED[0]``) minus each baseline per budget: mean ± standard error, and
    every seed's difference as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = PAIRED[0]
    budgets = {s: m for s, m in by_budget(results["runs"]).items() if ours in m}
    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, (steps, methods) in zip(axes[0], budgets.items(), strict=True):
        others = baselines(methods)
        diffs = [seed_differences(methods[ours], methods[n]) for n in others]
        stats = [mean_sd(d) for d in diffs]
        errors = [sd / len(d) ** 0.5 for (_, sd), d in zip(stats, diffs, strict=True)]
        ax.barh(range(len(others)), [m for m, _ in stats], xerr=errors, capsize=3)
        for i, d in enumerate(diffs):
            ax.plot(d, [i] * len(d), "k.", alpha=0.6)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(others)), others, fontsize=8)
        ax.set_xlabel("accuracy difference, same seed (defaults minus the row)")
        ax.set_title(f"{steps} steps")
    fig.suptitle(f"{ours}: paired differences (mean ± standard error, seeds as dots)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = by_budget(results["runs"])
    fig, axes = plt.subplots(1, len(budgets), figsize=(7 * len(budgets), 4.5), squeeze=False)
    for ax, (steps, methods) in zip(axes[0], budgets.items(), strict=True):
        names = list(methods)
        stats = [mean_sd([r["after"]["accuracy"] for r in methods[n]]) for n in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
        for i, name in enumerate(names):  # every seed as a dot: 3 seeds say more than a bar
            accs = [r["after"]["accuracy"] for r in methods[name]]
            ax.plot([i] * len(accs), accs, "k.", alpha=0.6)
        # Wrapped: eight long method names side by side must not run into each other.
        labels = [textwrap.fill(n, 14) for n in names]
        ax.set_xticks(range(len(names)), labels, fontsize=7)
        ax.set_ylim(min(m for m, _ in stats) - 0.05, max(m for m, _ in stats) + 0.03)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{steps} steps, same data order (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_budgets(results: dict, path: Path) -> None:
    """Accuracy against the number of steps, one line per method (mean ± sd, seeds as dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    methods = by_method(results["runs"])
    for i, (name, per_budget) in enumerate(methods.items()):
        steps = list(per_budget)
        # Methods side by side at each budget (a few % apart on the log axis), not on top.
        shift = 1 + 0.025 * (i - (len(methods) - 1) / 2)
        x = [s * shift for s in steps]
        stats = [mean_sd([r["after"]["accuracy"] for r in per_budget[s]]) for s in steps]
        line = ax.errorbar(
            x, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3,
            label=name,
        )  # fmt: skip
        for s, xs in zip(steps, x, strict=True):
            accs = [r["after"]["accuracy"] for r in per_budget[s]]
            ax.plot([xs] * len(accs), accs, ".", color=line[0].get_color(), alpha=0.5)
    ax.set_xscale("log")
    budgets = list(by_budget(results["runs"]))
    ax.set_xticks(budgets, [str(s) for s in budgets])
    ax.minorticks_off()
    ax.set_xlabel("optimizer steps (batch 32, same data order per seed)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy by budget: mean ± sd over seeds, each seed a dot")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: dict, path: Path) -> None:
    """Training loss against step per budget, mean over the seeds that recorded a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets: dict[int, dict[str, list[list[float]]]] = {}
    for steps, methods in by_budget(results["runs"]).items():
        for name, runs in methods.items():
            curves = [r["loss_curve"] for r in runs if "loss_curve" in r]
            if curves:
                budgets.setdefault(steps, {})[name] = curves
    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(7 * len(budgets), 4.5), squeeze=False)
    for ax, (steps, methods) in zip(axes[0], budgets.items(), strict=True):
        for name, curves in methods.items():
            mean = [statistics.fmean(points) for points in zip(*curves, strict=True)]
            x = [CURVE_WINDOW * (i + 0.5) for i in range(len(mean))]
            ax.plot(x, mean, label=f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean of {CURVE_WINDOW} steps)")
        ax.set_title(f"{steps} steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="NAME",
        help="methods by name, as in METHODS (default: all)",
    )
    p.add_argument("--eval-limit", type=int, default=None, help="test rows (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    p.add_argument("--report-only", action="store_true", help="re-render OUT/accuracy.json")
    p.add_argument("--refresh", action="store_true", help="run cached runs again (replace them)")
    args = p.parse_args(argv)
    path = args.out / "accuracy.json"
    if not path.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"batch_size": args.batch_size, "runs": {}}))
    results = json.loads(path.read_text())
    if results["batch_size"] != args.batch_size:
        raise SystemExit(f"{path} holds batch {results['batch_size']}; use another --out")
    todo = [] if args.report_only else [
        (name, seed)
        for seed in args.seeds
        for name in args.methods
        if args.refresh or key(name, args.steps, seed) not in results["runs"]
    ]  # fmt: skip
    if not todo and not results["runs"]:
        raise SystemExit(f"{path} holds no runs yet: nothing to report")
    for name, seed in tqdm(todo, desc="accuracy study", unit="run"):
        summary = run_one([*METHODS[name], "--batch-size", str(args.batch_size)], seed, args)
        summary["name"] = name
        results = save_run(path, key(name, args.steps, seed), summary, section="runs")
        write_report(results, args.out)  # partial results survive an interrupted study
    write_report(results, args.out)
    print((args.out / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
