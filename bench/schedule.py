"""Schedule search for XGBLoRA on the demo task: one factor at a time around a base.

A remedy found here is credited to XGBLoRA only if it does not help the baselines as much: those
controls (e.g. LoRA with the same weight decay) are rows of ``accuracy.py``'s METHODS, run there.

Every variant is the ``xgblora-fast finetune`` CLI (through ``accuracy.run_one``: own process,
same steps, batch and data order per seed) with the base options plus its own. Results are
cached by ``(variant, steps, seed)`` in ``schedule.json``, so a search can be extended or resumed
across sessions; ``schedule.md`` ranks the variants (mean over the seeds run) and
``schedule.png`` plots them.

    python bench/schedule.py                              # every variant, 200 steps, seed 0
    python bench/schedule.py --variants base "lr 1e-2" --seeds 0 1 2
    python bench/schedule.py --steps 20 --eval-limit 100 --variants base --out /tmp/s  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import METHODS, RESULTS, key, run_one, save_run

# The recipe as the paper states it (pinned in accuracy.py, so new defaults do not move it).
BASE = METHODS["XGBLoRA (literal recipe)"]
# name -> options added to BASE (later options win in argparse).
GUIDED = ["--booster-init", "gradient", "--select", "gradient"]
# The defaults before growing rounds (gradient init, selection by need, L_s 0.67, 3-step
# re-warm-up), spelled out on top of BASE; "defaults" in a variant's name means these.
EARLIER_DEFAULTS = [*GUIDED, "--layers-per-round", "0.67", "--rewarm-steps", "3"]
# MiniLM's targets without its pooler (a 384x384 layer whose |W| is 1/9 of a block layer's).
NO_POOLER = ["--target-modules", r".*\.layer\.\d+\..*(query|key|value|dense)"]
# The current defaults' schedule on top of BASE: every layer, rounds growing 1.5x.
GROWING = ["--layers-per-round", "1.0", "--kappa-growth", "1.5"]
CARRY = ["--booster-init", "carry"]
# The current defaults (the accuracy study's defaults row) on top of BASE.
CURRENT = [*GROWING, *CARRY, "--booster-keep", "0.9", "--weight-decay", "0.3"]
SHORT_ROUNDS = [*CURRENT, "--kappa-growth", "1.0"]  # ... in rounds of 10
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "gradient init": ["--booster-init", "gradient"],
    "gradient select": ["--select", "gradient"],
    "gradient init + select": GUIDED,
    "gradient init + select, lr 1e-2": [*GUIDED, "--lr", "1e-2"],
    "gradient init + select, kappa 25": [*GUIDED, "--kappa", "25"],
    "gradient init, L_s all": ["--booster-init", "gradient", "--layers-per-round", "1.0"],
    # Around the defaults: aligned boosters make every Adam step count, so less lr per step.
    "gradient init + select, lr 3e-3": [*GUIDED, "--lr", "3e-3"],
    "gradient init + select, L_s 0.5": [*GUIDED, "--layers-per-round", "0.5"],
    "gradient init + select, L_s 0.5, lr 3e-3": [
        *GUIDED,
        "--layers-per-round",
        "0.5",
        "--lr",
        "3e-3",
    ],
    "gradient init + select, L_s 0.67": [*GUIDED, "--layers-per-round", "0.67"],
    "gradient init + select, L_s 0.67, lr 3e-3": [
        *GUIDED,
        "--layers-per-round",
        "0.67",
        "--lr",
        "3e-3",
    ],
    "gradient init + select, L_s 0.67, rewarm 3": EARLIER_DEFAULTS,
    "gradient init + select, L_s 0.5, kappa 5": [
        *GUIDED,
        "--layers-per-round",
        "0.5",
        "--kappa",
        "5",
    ],
    "gradient init + select, L_s 0.5, rewarm 3": [
        *GUIDED,
        "--layers-per-round",
        "0.5",
        "--rewarm-steps",
        "3",
    ],
    "gradient init, L_s all, rewarm 3": [
        *GUIDED,
        "--layers-per-round",
        "1.0",
        "--rewarm-steps",
        "3",
    ],
    "gradient init, L_s all, lr 2e-3": [*GUIDED, "--layers-per-round", "1.0", "--lr", "2e-3"],
    "gradient init + select, kappa 5": [*GUIDED, "--kappa", "5"],
    # Around the defaults: what else larger steps or more layers do, and the pooler's part.
    "defaults, L_s 0.86": [*EARLIER_DEFAULTS, "--layers-per-round", "0.86"],
    "defaults, merge step 1.5": [*EARLIER_DEFAULTS, "--merge-step", "1.5"],
    "defaults, warm-up 15%": [*EARLIER_DEFAULTS, "--warmup-ratio", "0.15"],
    "defaults, no pooler": [*EARLIER_DEFAULTS, *NO_POOLER],
    "defaults, no pooler, all blocks": [*EARLIER_DEFAULTS, *NO_POOLER, "--layers-per-round", "1.0"],
    # Longer budgets: fewer, less noisy rank-1 pieces; Adam's scale kept across merges.
    "defaults, kappa 20": [*EARLIER_DEFAULTS, "--kappa", "20"],
    "defaults, kappa 200 (no restart in 200 steps)": [*EARLIER_DEFAULTS, "--kappa", "200"],
    "defaults, random init": [*EARLIER_DEFAULTS, "--booster-init", "random"],
    # Rounds that grow (kappa 10 * growth**k): short rounds early, few restarts later.
    "defaults, kappa growth 1.3": [*EARLIER_DEFAULTS, "--kappa-growth", "1.3"],
    "defaults, kappa growth 1.5": [*EARLIER_DEFAULTS, "--kappa-growth", "1.5"],
    "defaults, reset momentum": [*EARLIER_DEFAULTS, "--optimizer-reset", "momentum"],
    # XGBLoRA moves W 3x less than LoRA r=1 (200 steps): a run-long lr without the decay.
    "defaults, constant lr": [*EARLIER_DEFAULTS, "--lr-schedule", "constant"],
    # What a merge does to the boosters' Adam state (the recipe drops it all).
    "gradient init + select, reset momentum": [*GUIDED, "--optimizer-reset", "momentum"],
    "gradient init + select, reset none": [*GUIDED, "--optimizer-reset", "none"],
    "lr 1e-2": ["--lr", "1e-2"],
    "lr 2e-3": ["--lr", "2e-3"],
    "kappa 25": ["--kappa", "25"],
    "L_s all (COLA-style chain)": ["--layers-per-round", "1.0"],
    # The chain without restarts (one round of 200 steps is rank-1 LoRA on our layers), and
    # in between: how much of the chain's gap to LoRA r=1 the restarts themselves cost.
    "L_s all, kappa 50": ["--layers-per-round", "1.0", "--kappa", "50"],
    "L_s all, kappa 200 (no restart in 200 steps)": ["--layers-per-round", "1.0", "--kappa", "200"],
    "L_s all, kappa growth 1.5": GROWING,
    # Each restart's fresh a drawn orthogonal to every direction the layer merged before (new
    # subspaces each round, as BoostLoRA), against the plain random restart above.
    "L_s all, kappa growth 1.5, orthogonal": [*GROWING, "--booster-init", "orthogonal"],
    # The same for gradient-aligned restarts: each round's a the gradient's top direction, in
    # the complement of the layer's merged directions or not.
    "L_s all, kappa growth 1.5, gradient init": [*GROWING, "--booster-init", "gradient"],
    "L_s all, kappa growth 1.5, orthogonal-gradient": [
        *GROWING,
        "--booster-init",
        "orthogonal-gradient",
    ],
    "L_s all, kappa growth 1.3": ["--layers-per-round", "1.0", "--kappa-growth", "1.3"],
    "L_s all, kappa growth 2": ["--layers-per-round", "1.0", "--kappa-growth", "2"],
    # The defaults (every layer, rounds growing 1.5x) with a longer first round: fewer restarts
    # in a short run (200 steps: 4 rounds from 25, 3 from 40, instead of 6 from 10).
    "L_s all, kappa 25, growth 1.5": [*GROWING, "--kappa", "25"],
    "L_s all, kappa 40, growth 1.5": [*GROWING, "--kappa", "40"],
    # The defaults with each restart keeping the layer's trained a (only b = 0): does a restart
    # cost because it throws the input direction away?
    "L_s all, kappa growth 1.5, carry a": [*GROWING, *CARRY],
    # A merge of only part of the booster (b <- beta b, a kept) keeps the function and restarts
    # neither factor from zero: between the defaults (beta 0) and no restart at all (beta 1).
    "L_s all, kappa growth 1.5, keep 0.5": [*GROWING, *CARRY, "--booster-keep", "0.5"],
    "L_s all, kappa growth 1.5, keep 0.9": [*GROWING, *CARRY, "--booster-keep", "0.9"],
    # The 3000-step overfitting of the keep-0.9 defaults (test loss 0.54 vs 0.47 for LoRA r=1):
    # boosters pulled towards 0 between merges, or smaller steps.
    "L_s all, kappa growth 1.5, keep 0.9, weight decay 0.1": [
        *GROWING,
        *CARRY,
        "--booster-keep",
        "0.9",
        "--weight-decay",
        "0.1",
    ],
    "L_s all, kappa growth 1.5, keep 0.9, lr 3e-3": [
        *GROWING,
        *CARRY,
        "--booster-keep",
        "0.9",
        "--lr",
        "3e-3",
    ],
    # The defaults' rounds grow to 500 steps by step 3000, so few merges happen late and the
    # live booster holds most of what the layer learned along one slowly turning a (merged
    # pieces: cosine 0.62 at lag 1): fit like LoRA r=1. Short rounds leak 10% of the booster
    # into W every kappa steps, so a can turn without taking the older pieces with it.
    "current defaults, rounds of 10": SHORT_ROUNDS,
    "current defaults, rounds of 30": [*CURRENT, "--kappa-growth", "1.0", "--kappa", "30"],
    # ... or each merge turns the kept booster to a fresh a (the difference goes into W).
    "current defaults, redraw a": [*CURRENT, "--booster-init", "redraw"],
    # A merge that keeps 90% of the booster still drops its Adam state: the next step is a
    # full-lr sign step on every coordinate. What that costs, with few merges and with many.
    "current defaults, reset none": [*CURRENT, "--optimizer-reset", "none"],
    "current defaults, rounds of 10, reset none": [*SHORT_ROUNDS, "--optimizer-reset", "none"],
    "L_s all, kappa growth 1.5, keep 0.5, reset none": [
        *GROWING,
        *CARRY,
        "--booster-keep",
        "0.5",
        "--optimizer-reset",
        "none",
    ],
    # A restarted booster moves W slower (dW = s (db a^T + b da^T) starts from b = 0): a larger
    # step on the defaults, through the learning rate or the scale s.
    "L_s all, kappa growth 1.5, lr 1e-2": [*GROWING, "--lr", "1e-2"],
    "L_s all, kappa growth 1.5, alpha 4": [*GROWING, "--alpha", "4"],
    "rewarm 3": ["--rewarm-steps", "3"],
    # bf16 base weights, where the merge rounding matters (fp32 merges are exact-nearest).
    "gradient init + select, bf16, nearest": [
        *GUIDED,
        "--dtype",
        "bfloat16",
        "--rounding",
        "nearest",
    ],
    "gradient init + select, bf16, stochastic": [
        *GUIDED,
        "--dtype",
        "bfloat16",
        "--rounding",
        "stochastic",
    ],
    "gradient init + select, bf16, kahan": [*GUIDED, "--dtype", "bfloat16", "--rounding", "kahan"],
}


def write_report(runs: dict[str, dict], out: Path) -> None:
    """``schedule.md`` (variants ranked by mean accuracy per budget) and ``schedule.png``."""
    table: dict[tuple[str, int], list[float]] = {}
    for r in runs.values():
        table.setdefault((r["variant"], r["steps"]), []).append(r["after"]["accuracy"])
    lines = [
        "# XGBLoRA schedule search on the demo task (MiniLM, movie reviews)",
        "",
        f"Base: `{' '.join(BASE)}` (the paper's recipe); each variant adds its options to it. "
        '"defaults" in a variant\'s name: the defaults before growing rounds (gradient init, '
        "selection by need, L_s 0.67, 3-step re-warm-up), spelled out in its options. "
        "Test accuracy on the 2,114 held-out snippets (mean over the seeds run). Produced by "
        "`python bench/schedule.py`; data: `schedule.json`.",
        "",
        "| variant | options | steps | seeds | accuracy | vs base |",
        "|---|---|---|---|---|---|",
    ]
    ranked = sorted(table.items(), key=lambda kv: (kv[0][1], -statistics.fmean(kv[1])))
    for (name, steps), accs in ranked:
        mean = statistics.fmean(accs)
        base = table.get(("base", steps))
        delta = f"{mean - statistics.fmean(base):+.4f}" if base else "-"
        sd = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        # A regex's "|" would end the markdown cell.
        opts = " ".join(VARIANTS.get(name, [])).replace("|", "\\|") or "-"
        lines.append(f"| {name} | `{opts}` | {steps} | {len(accs)} | {mean:.4f}{sd} | {delta} |")
    (out / "schedule.md").write_text("\n".join(lines) + "\n")
    plot(table, out / "schedule.png")


def plot(table: dict[tuple[str, int], list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({steps for _, steps in table})
    most_rows = max(sum(s == steps for _, s in table) for steps in budgets)
    height = max(4.0, 1.2 + 0.2 * most_rows)  # ~0.2 inch per label: readable at fontsize 8
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), height), squeeze=False)
    for ax, steps in zip(axes[0], budgets, strict=True):
        rows = sorted(
            ((n, a) for (n, s), a in table.items() if s == steps),
            key=lambda r: statistics.fmean(r[1]),
        )
        means = [statistics.fmean(a) for _, a in rows]
        ax.barh(range(len(rows)), means)
        for i, (_, accs) in enumerate(rows):
            ax.plot(accs, [i] * len(accs), "k.", alpha=0.6)
        ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=8)
        ax.set_xlim(min(means) - 0.03, max(max(a) for _, a in rows) + 0.01)
        ax.set_xlabel("test accuracy")
        ax.set_title(f"XGBLoRA variants, {steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="NAME",
        help="variants by name, as in VARIANTS (default: all)",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-limit", type=int, default=None, help="test rows (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "schedule.json"
    runs: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    todo = [
        (name, seed)
        for seed in args.seeds
        for name in args.variants
        if key(name, args.steps, seed) not in runs
    ]
    for name, seed in tqdm(todo, desc="schedule search", unit="run"):
        summary = run_one(
            [*BASE, *VARIANTS[name], "--batch-size", str(args.batch_size)], seed, args
        )
        summary.update(variant=name, seed=seed)
        runs = save_run(path, key(name, args.steps, seed), summary)
    write_report(runs, args.out)
    print((args.out / "schedule.md").read_text())


if __name__ == "__main__":
    main()
