"""bench/accuracy.py, bench/schedule.py and bench/gradient_directions.py: real CLI runs on a
tiny offline model, caching, tables and plots."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import accuracy
import causal_study
import gradient_directions
import schedule
import torch

from xgblora_fast.boosting.booster import DEFAULT_BOOSTER_KEEP

# The study's entry for the library's defaults.
DEFAULTS = "XGBLoRA (defaults: all layers, rounds growing 1.5x, 90% kept, weight decay 0.3)"


@pytest.mark.slow
def test_schedule_search_runs_variants_caches_them_and_ranks(
    tiny_folder, sentiment_csv, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        schedule, "BASE", [*schedule.BASE, *_tiny(tiny_folder, sentiment_csv), "--kappa", "2"]
    )
    argv = ["--steps", "4", "--batch-size", "8", "--eval-limit", "24", "--out", str(tmp_path)]
    argv += ["--variants", "base", "gradient init + select"]
    schedule.main(argv)
    runs = json.loads((tmp_path / "schedule.json").read_text())
    assert set(runs) == {
        schedule.key("base", 4, 0),
        schedule.key("gradient init + select", 4, 0),
    }
    guided = runs[schedule.key("gradient init + select", 4, 0)]
    assert guided["steps"] == 4 and guided["variant"] == "gradient init + select"
    md = (tmp_path / "schedule.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "steps" not in line]
    accs = [float(line.split("|")[5].split()[0]) for line in rows]
    assert accs == sorted(accs, reverse=True) and len(accs) == 2
    assert (tmp_path / "schedule.png").stat().st_size > 5000

    # Cached runs are not repeated: a second call with the same variants starts no process.
    def no_run(*args, **kwargs):
        raise AssertionError("a cached run was repeated")

    monkeypatch.setattr(schedule, "run_one", no_run)
    schedule.main(argv)


def _tiny(tiny_folder, sentiment_csv) -> list[str]:
    return [
        "--model",
        str(tiny_folder / "bert"),
        "--data",
        str(sentiment_csv),
        "--max-length",
        "16",
    ]


@pytest.mark.slow
def test_accuracy_study_caches_runs_per_budget_and_compares_to_lora(
    tiny_folder, sentiment_csv, tmp_path, monkeypatch
):
    tiny = _tiny(tiny_folder, sentiment_csv)
    methods = {
        "LoRA r=1 (peft)": [*accuracy.METHODS["LoRA r=1 (peft)"], *tiny],
        "XGBLoRA (defaults)": [*accuracy.METHODS[DEFAULTS], *tiny, "--kappa", "2"],
    }
    monkeypatch.setattr(accuracy, "METHODS", methods)
    common = ["--batch-size", "8", "--eval-limit", "24", "--out", str(tmp_path), "--seeds", "0"]
    accuracy.main(["--steps", "2", *common])
    accuracy.main(["--steps", "3", *common, "--methods", "XGBLoRA (defaults)"])
    runs = json.loads((tmp_path / "accuracy.json").read_text())["runs"]
    assert sorted(runs) == sorted(
        [
            accuracy.key("LoRA r=1 (peft)", 2, 0),
            accuracy.key("XGBLoRA (defaults)", 2, 0),
            accuracy.key("XGBLoRA (defaults)", 3, 0),
        ]
    )
    assert {(r["method"], r["steps"]) for r in runs.values()} == {
        ("lora", 2),
        ("xgblora", 2),
        ("xgblora", 3),
    }
    md = (tmp_path / "accuracy.md").read_text()
    assert "## 2 optimizer steps" in md and "## 3 optimizer steps" in md
    # The gap column of the per-budget tables (after the table across budgets): LoRA r=1
    # against itself is +0 at 2 steps; no LoRA row at 3 steps.
    per_budget = md[md.index("## 2 optimizer steps") :].splitlines()
    lora_row = next(line for line in per_budget if line.startswith("| LoRA r=1"))
    assert lora_row.split("|")[4].strip() == "+0.0000"
    xgb_rows = [line for line in per_budget if line.startswith("| XGBLoRA")]
    assert len(xgb_rows) == 2 and xgb_rows[1].split("|")[4].strip() == "-"
    assert (tmp_path / "accuracy.png").stat().st_size > 5000
    # Every run records its training-loss curve (one point per 10 steps: one here), plotted.
    assert all(len(r["loss_curve"]) == 1 and r["loss_curve"][0] > 0 for r in runs.values())
    assert (tmp_path / "accuracy_curves.png").stat().st_size > 5000
    # --refresh runs a cached run again and replaces it.
    calls = []

    def fake_run(options, seed, args):
        calls.append((options[:2], seed))
        return runs[accuracy.key("LoRA r=1 (peft)", 2, 0)] | {"marker": "refreshed"}

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    accuracy.main(["--steps", "2", *common, "--methods", "LoRA r=1 (peft)"])
    assert calls == []
    accuracy.main(["--steps", "2", *common, "--methods", "LoRA r=1 (peft)", "--refresh"])
    assert calls == [(["--method", "lora"], 0)]
    refreshed = json.loads((tmp_path / "accuracy.json").read_text())["runs"]
    assert refreshed[accuracy.key("LoRA r=1 (peft)", 2, 0)]["marker"] == "refreshed"
    assert len(refreshed) == 3
    # A different batch size cannot be mixed into the same cache.
    with pytest.raises(SystemExit, match="batch 8"):
        accuracy.main(["--steps", "2", "--batch-size", "4", "--out", str(tmp_path)])


def test_loss_curve_is_the_mean_of_each_window_with_a_short_last_one():
    losses = [float(i) for i in range(25)]
    assert accuracy.loss_curve(losses, window=10) == [4.5, 14.5, 22.0]
    assert accuracy.loss_curve([0.7], window=10) == [0.7]


def test_concurrent_studies_keep_each_others_runs_and_borrowed_runs_are_named(tmp_path):
    """Two processes that loaded the cache before either wrote must not drop a run: each write
    re-reads the file. A run copied from another study says so under the tables."""
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"batch_size": 32, "runs": {}}))
    summary = {"name": "m", "seed": 0, "steps": 5, "before": {"accuracy": 0.5}}
    first = accuracy.save_run(path, "a", summary | {"after": {"accuracy": 0.7}}, section="runs")
    second = accuracy.save_run(
        path, "b", summary | {"after": {"accuracy": 0.8}, "source": "schedule.py"}, "runs"
    )
    assert sorted(first["runs"]) == ["a"] and sorted(second["runs"]) == ["a", "b"]
    assert json.loads(path.read_text()) == second
    assert not path.with_suffix(".json.tmp").exists()
    for r in second["runs"].values():
        r |= {"trainable_params_per_step": 1, "cumulative_trainable_params": 1}
        r |= {"seconds_per_step": 1.0, "peak_rss_mib": 1.0}
    second["runs"]["a"]["weight_change"] = {"mean": 0.12, "path_mean": 0.3}
    accuracy.write_report(second, tmp_path)
    md = (tmp_path / "accuracy.md").read_text()
    assert "| m | 2 | 0.7500 ± 0.0707 |" in md
    assert "| 1.000 | 1 | 0.120, path 0.300 (1) |" in md  # from the seed that measured it
    assert "- b: schedule.py" in md and "- a:" not in md


def fake_runs(rows: list[tuple[str, int, int, float]]) -> dict[str, dict]:
    """Study runs from ``(method, steps, seed, accuracy)``, the other fields placeholders."""
    return {
        accuracy.key(name, steps, seed): {
            "name": name,
            "steps": steps,
            "seed": seed,
            "before": {"accuracy": 0.5},
            "after": {"accuracy": acc},
            "trainable_params_per_step": 1,
            "cumulative_trainable_params": 1,
            "seconds_per_step": 1.0,
            "peak_rss_mib": 1.0,
        }
        for name, steps, seed, acc in rows
    }


def test_accuracy_report_has_every_seed_of_every_method_across_budgets(tmp_path):
    """The summary table puts each method on one row (in METHODS order, whatever order the runs
    came in) with a cell per budget holding the mean, sd and every seed; "-" where not run."""
    lora, xgb = "LoRA r=1 (peft)", DEFAULTS
    runs = fake_runs(
        [(lora, 200, 1, 0.80), (lora, 200, 0, 0.82), (xgb, 1000, 0, 0.83), (xgb, 200, 0, 0.71)]
    )
    accuracy.write_report({"batch_size": 32, "runs": runs}, tmp_path)
    md = (tmp_path / "accuracy.md").read_text().splitlines()
    header = md.index("| method | 200 steps | 1000 steps |")
    assert md[header + 2] == (
        f"| {DEFAULTS} | 0.7100 ± 0.0000 (0: 0.7100) | 0.8300 ± 0.0000 (0: 0.8300) |"
    )
    assert md[header + 3] == "| LoRA r=1 (peft) | 0.8100 ± 0.0141 (0: 0.8200, 1: 0.8000) | - |"
    assert (tmp_path / "accuracy_budgets.png").stat().st_size > 5000


def test_paired_differences_use_only_the_seeds_both_methods_ran(tmp_path):
    """Each PAIRED row minus each non-XGBLoRA row, seed by seed: a seed only one of the two ran
    is left out, the error is the standard error of the differences, ties count as level."""
    lora, xgb = "LoRA r=8 (peft)", DEFAULTS
    runs = fake_runs(
        [(xgb, 1000, seed, acc) for seed, acc in [(0, 0.84), (1, 0.85), (2, 0.83), (3, 0.90)]]
        + [(lora, 1000, seed, acc) for seed, acc in [(0, 0.82), (1, 0.85), (2, 0.84), (4, 0.1)]]
    )
    accuracy.write_report({"batch_size": 32, "runs": runs}, tmp_path)
    md = (tmp_path / "accuracy.md").read_text().splitlines()
    table = md.index("### 1000 steps")
    assert accuracy.PAIRED[0] == DEFAULTS  # the paired plot's row is the library's defaults
    assert md[table + 2] == f"| against | {DEFAULTS} |"
    # Differences +0.02, 0, -0.01: mean +0.0033, sd 0.0153, standard error 0.0088.
    assert md[table + 4] == (
        "| LoRA r=8 (peft) | +0.0033 ± 0.0088 (3 seeds, ahead on 1, behind on 1) |"
    )
    by_method = accuracy.by_budget(runs)[1000]  # each method's runs in seed order
    assert accuracy.paired_difference(by_method[xgb][:1], by_method[lora][3:]) == "-"
    assert (tmp_path / "accuracy_paired.png").stat().st_size > 5000


def test_report_only_on_an_empty_cache_says_so(tmp_path):
    with pytest.raises(SystemExit, match="holds no runs yet"):
        accuracy.main(["--report-only", "--out", str(tmp_path)])


def test_schedule_table_escapes_a_regex_pipe_so_every_row_keeps_its_six_cells(tmp_path):
    runs = {
        "a": {"variant": "defaults, no pooler", "steps": 5, "after": {"accuracy": 0.8}},
        "b": {"variant": "base", "steps": 5, "after": {"accuracy": 0.7}},
    }
    schedule.write_report(runs, tmp_path)
    rows = [
        line
        for line in (tmp_path / "schedule.md").read_text().splitlines()
        if line.startswith("| ") and "variant" not in line
    ]
    assert "(query\\|key\\|value\\|dense)" in rows[0]
    # Cells split on unescaped pipes only, as a markdown renderer does.
    assert [len(re.split(r"(?<!\\)\|", row)) - 2 for row in rows] == [6, 6]
    assert rows[0].split(" | ")[-1] == "+0.1000 |"


def test_gradient_directions_see_an_outlier_input_feature_take_over_v1():
    """A gradient ``dy^T x`` whose input has one feature 30x louder than the rest has its top
    right singular vector on that feature (share ~1, a large output ratio) and the same one for
    another batch; without the outlier, v1 is spread out and two batches disagree."""
    gen = torch.Generator().manual_seed(0)

    def batch(loud: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(256, 64, generator=gen)
        x[:, 7] *= loud
        return torch.randn(256, 48, generator=gen).T @ x, x

    (g0, x0), (g1, _) = batch(30.0), batch(30.0)
    loud = gradient_directions.direction_stats((g0, g1), x0)
    assert loud["v1_top5_share"] > 0.95 and loud["v1_batch_cos"] > 0.95
    assert loud["input_outlier_ratio"] > 20 and loud["output_ratio"] > 5
    (g0, x0), (g1, _) = batch(1.0), batch(1.0)
    quiet = gradient_directions.direction_stats((g0, g1), x0)
    assert quiet["v1_top5_share"] < 0.5 and quiet["v1_batch_cos"] < 0.5
    assert quiet["input_outlier_ratio"] < 2 and quiet["output_ratio"] < 2
    assert 0 <= quiet["u1_batch_cos"] < 0.5


def test_gradient_directions_report_has_a_row_per_linear_layer(
    tiny_folder, sentiment_csv, tmp_path
):
    argv = ["--model", str(tiny_folder / "bert"), "--data", str(sentiment_csv)]
    stats = gradient_directions.main([*argv, "--max-length", "16", "--out", str(tmp_path)])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_folder / "bert", num_labels=2)
    linear = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"
    }
    assert set(stats) == linear
    assert all(0 < s["v1_top5_share"] <= 1 + 1e-9 and s["output_ratio"] > 0 for s in stats.values())
    saved = json.loads((tmp_path / "gradient_directions.json").read_text())
    assert saved["layers"] == stats
    rows = [r for r in (tmp_path / "gradient_directions.md").read_text().splitlines() if "| " in r]
    assert len(rows) == 1 + len(linear) + 1  # header, a row per layer, the mean
    assert (tmp_path / "gradient_directions.png").stat().st_size > 5000


def test_every_study_method_and_variant_is_a_valid_command_line():
    """A typo or a contradictory option in a study entry fails here, not hours into a study."""
    from xgblora_fast.cli import main as cli

    lines = {f"method {n}": o for n, o in accuracy.METHODS.items()}
    lines |= {f"variant {n}": [*schedule.BASE, *o] for n, o in schedule.VARIANTS.items()}
    lines |= {f"causal {n}": list(m.options) for n, m in causal_study.METHODS.items()}
    for name, options in lines.items():
        try:
            cli.config_from_args(cli.build_parser().parse_args(["finetune", *options]))
        except (SystemExit, ValueError, TypeError) as error:
            pytest.fail(f"{name}: {options} is not a valid finetune command line: {error!r}")
    # The check can fail: a contradictory entry is caught.
    with pytest.raises(ValueError, match="gradient_init_rounds"):
        cli.config_from_args(
            cli.build_parser().parse_args(
                ["finetune", "--booster-init", "random", "--gradient-init-rounds", "3"]
            )
        )


def test_study_entries_pin_the_schedule_so_new_defaults_do_not_move_cached_runs():
    """Cached runs are keyed by name: an entry that relied on a default would change meaning."""
    from xgblora_fast.cli import finetune
    from xgblora_fast.cli import main as cli

    schedule_options = (
        "--kappa", "--kappa-growth", "--layers-per-round", "--booster-init", "--select",
        "--rewarm-steps", "--booster-keep", "--lr", "--alpha", "--weight-decay",
    )  # fmt: skip
    entries = {n: o for n, o in accuracy.METHODS.items() if o[1] == "xgblora"}
    entries["schedule base"] = schedule.BASE
    for name, options in entries.items():
        missing = [flag for flag in schedule_options if flag not in options]
        assert not missing, f"{name} does not pin {missing}"
    # LoRA's factors take the boosters' weight decay (finetune.prepare_method).
    for name, options in accuracy.METHODS.items():
        if options[1] == "lora":
            assert "--weight-decay" in options, f"{name} does not pin --weight-decay"
    # The study's defaults row is the defaults of the library and the CLI.
    parsed = cli.config_from_args(
        cli.build_parser().parse_args(["finetune", *accuracy.METHODS[DEFAULTS]])
    )
    expected = finetune.FinetuneConfig().xgblora
    # The row spells out the booster_keep that the default (None) resolves to here.
    assert expected.booster_keep is None and parsed.xgblora.booster_keep == DEFAULT_BOOSTER_KEEP
    assert parsed.xgblora == dataclasses.replace(
        expected, total_steps=parsed.steps, booster_keep=DEFAULT_BOOSTER_KEEP
    )
    assert parsed.lr == finetune.FinetuneConfig(method="xgblora").lr


def test_paired_difference_of_a_loss_counts_lower_as_ahead():
    ours = [{"seed": 0, "loss": 1.0}, {"seed": 1, "loss": 2.0}, {"seed": 2, "loss": 9.0}]
    theirs = [{"seed": 0, "loss": 1.5}, {"seed": 1, "loss": 1.9}]  # seed 2 not run: left out
    cell = accuracy.paired_difference(ours, theirs, lambda r: r["loss"], lower_is_better=True)
    assert cell == "-0.2000 ± 0.3000 (2 seeds, ahead on 1, behind on 1)"
    higher = accuracy.paired_difference(ours[:1], theirs, lambda r: r["loss"])
    assert higher == "-0.5000 (1 seed, ahead on 0, behind on 1)"
