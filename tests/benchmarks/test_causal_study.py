"""bench/causal_study.py: data preparation, response-selection scoring, lr choice, and a smoke
run through the real script (CLI runs in worker processes) on a tiny offline Llama."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import causal_study as cs
from helpers.offline_models import tiny_llama
from helpers.sft_recipe import tiny_tokenizer

# A chat template the word-level tokenizer can read: roles and words split by spaces.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
XGB, LORA = "XGBLoRA (preset default)", "LoRA r=1 (peft)"


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_corpora(root: Path) -> tuple[Path, Path]:
    """A chitchat-like dataset.json (40 chats of 1-7 turns; turn j of chat i reads "wi wj",
    one turn split over two messages) and a BBC-like folder of 6 articles."""
    chats = {}
    for i in range(40):
        turns = [[{"text": f"w{i} w{j}", "sender": str(j % 2)}] for j in range(1 + i % 7)]
        chats[f"id{i:02d}"] = {"messages": turns}
    chats["id00"]["messages"][0] = [{"text": "w0"}, {"text": "w0"}]  # two messages, one turn
    (root / "dataset.json").write_text(json.dumps(chats))
    for topic in ("tech", "sports"):
        (root / "news" / topic).mkdir(parents=True)
        for n in range(3):
            (root / "news" / topic / f"{n:03d}.txt").write_text(f"w{n} w1\n\nw2 w3 {topic}")
    return root / "dataset.json", root / "news"


def test_split_is_seeded_by_conversation_and_rows_alternate_roles():
    conversations = [[f"w{i} w{j}" for j in range(1 + i % 7)] for i in range(40)]
    train, held = cs.split_conversations(conversations, 8, seed=0)
    assert (train, held) == cs.split_conversations(conversations, 8, seed=0)
    assert cs.split_conversations(conversations, 8, seed=1)[1] != held
    assert len(held) == 8 and all(len(c) > cs.CONTEXT_TURNS for c in held)
    # Whole conversations on one side each: disjoint, and together all of them.
    assert not {tuple(c) for c in train} & {tuple(c) for c in held}
    assert sorted(train + held) == sorted(conversations)
    assert cs.exchanges(["a", "b", "c", "d", "e"]) == [["a", "b"], ["c", "d"]]
    assert cs.exchanges(["a"]) == [["a"]]
    text = cs.chat_text(chat_tokenizer(), ["w1", "w2", "w3"])
    assert text == "user w1 </s> assistant w2 </s> user w3 </s> "


def test_built_data_is_deterministic_held_out_and_answers_point_at_the_next_turn(tmp_path):
    chats, news = write_corpora(tmp_path)
    tokenizer = chat_tokenizer()
    first = cs.build_data(tokenizer, chats, news, tmp_path / "a", held_out=8, ood=4)
    second = cs.build_data(tokenizer, chats, news, tmp_path / "b", held_out=8, ood=4)
    for name in cs.DATA_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert cs.fingerprint(first) == cs.fingerprint(second)
    train = [r["text"] for r in cs.read_jsonl(first / "train.jsonl")]
    held = cs.read_jsonl(first / "eval.jsonl")
    items = cs.read_jsonl(first / "selection.jsonl")
    assert len(held) == len(items) == 8 and len(cs.read_jsonl(first / "ood.jsonl")) == 4
    assert "user w0\nw0 </s> " in train  # a turn's messages joined by a newline
    # The held-out chats (their first word names them) are in no training row.
    held_chats = {row["text"].split()[1] for row in held}
    assert not {t.split()[1] for t in train} & held_chats
    for item in items:
        last = item["prefix"].split("</s>")[-2].split()  # the last context turn: user wi wj
        assert item["prefix"].endswith("assistant") and len(item["candidates"]) == 4
        chat, turn = last[1], int(last[2][1:])
        assert item["candidates"][item["answer"]] == f" {chat} w{turn + 1} </s> "
        others = [c for i, c in enumerate(item["candidates"]) if i != item["answer"]]
        assert all(c.split()[0] != chat for c in others)


class CountingModel(torch.nn.Module):
    """A stand-in LM that is sure the next token is the current one + 1 (``w3`` -> ``w4``)."""

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, 64)
        logits.scatter_(-1, (input_ids + 1).clamp(max=63)[..., None], 20.0)
        return SimpleNamespace(logits=logits)


def test_response_selection_scores_each_candidate_after_its_prefix():
    tokenizer, model = tiny_tokenizer(), CountingModel()
    # Only "w4 w5" continues "w1 w2 w3" at every token; the others miss one token or two.
    candidates = ["w7 w8", "w4 w9", "w4 w5", "w9 w9"]
    scores = cs.candidate_scores(model, tokenizer, "w1 w2 w3", candidates, max_length=8)
    assert scores.shape == (4,) and int(scores.argmax()) == 2
    assert scores[2] > scores[0] > scores[3] and math.isclose(scores[0], scores[1], rel_tol=1e-6)
    # A mean per token: one miss in four tokens beats one miss in one (a sum would not).
    longer = ["w2 w9 w10 w11", "w9"]
    assert int(cs.candidate_scores(model, tokenizer, "w1", longer, max_length=8).argmax()) == 0
    items = [{"prefix": "w1 w2 w3", "candidates": candidates, "answer": 2}]
    assert cs.response_selection(model, tokenizer, items, max_length=8) == 1.0
    items[0]["answer"] = 0  # a wrong answer index is caught
    assert cs.response_selection(model, tokenizer, items, max_length=8) == 0.0


def test_best_lr_is_the_lowest_held_out_loss_and_main_waits_for_a_complete_grid():
    args = cs.parse_args(["--methods", XGB, "--steps", "200", "--seeds", "0", "1"])
    losses = {2e-3: 3.1, 5e-3: 2.9, 1e-2: math.nan}  # a diverged run ranks last
    runs = {
        cs.key(XGB, lr, 200, 0): {"name": XGB, "lr": lr, "in_domain_loss": loss}
        for lr, loss in losses.items()
    }
    assert cs.best_lrs(runs, args) == {XGB: 5e-3}
    for r, lr in zip(runs.values(), losses, strict=True):
        r |= {"steps": 200, "seed": 0, "lr": lr}
    assert cs.by_budget(runs, {XGB: 5e-3}) == {200: {XGB: [runs[cs.key(XGB, 5e-3, 200, 0)]]}}
    assert cs.by_budget(runs, {}) == {}  # an incomplete grid: no run stands for the method
    results = {"runs": runs, "cost": {}}
    assert cs.plan("main", results, args) == [(XGB, 5e-3, 200, 1)]  # seed 0 is the grid's run
    # The cost run goes at the best lr, and again once the best lr changes.
    assert cs.plan("cost", results, args) == [(XGB, 5e-3, cs.COST_STEPS, 0)]
    results["cost"][XGB] = {"lr": 5e-3}
    assert cs.plan("cost", results, args) == []
    results["cost"][XGB] = {"lr": 2e-3}
    assert cs.plan("cost", results, args) == [(XGB, 5e-3, cs.COST_STEPS, 0)]
    del runs[cs.key(XGB, 2e-3, 200, 0)]
    for stage in ("main", "cost"):
        with pytest.raises(SystemExit, match="grid"):
            cs.plan(stage, results, args)


@pytest.mark.slow
def test_smoke_run_caches_runs_reports_and_reuses_them(tmp_path, monkeypatch):
    model = tmp_path / "llama"
    tiny_llama().save_pretrained(model)
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(model)
    chats, news = write_corpora(tmp_path)
    data = cs.build_data(tokenizer, chats, news, tmp_path / "data", held_out=6, ood=4)
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data-dir", str(data), "--out", str(out)]
    argv += ["--methods", XGB, LORA, "--lrs", "1e-2", "--grid-steps", "3", "--steps", "3"]
    argv += ["--seeds", "0", "1", "--max-length", "16", "--jobs", "2"]
    cs.main(argv)
    results = json.loads((out / "causal_study.json").read_text())
    runs = results["runs"]
    expected = {cs.key(name, 1e-2, 3, seed) for name in (XGB, LORA) for seed in (0, 1)}
    assert set(runs) == expected | {cs.BASE}
    for name, run in runs.items():
        assert all(math.isfinite(run[m]) for m in cs.METRICS), name
        assert 0 <= run["selection_accuracy"] <= 1 and run["selection_items"] == 6
        assert run["peak_rss_process_mib"] > 0
        assert run["jobs"] == 2 and run["threads"] == max(1, (os.cpu_count() or 1) // 2)
    # The base model is evaluated, not trained: the loss every run starts from.
    assert "method" not in runs[cs.BASE]
    for name in expected:
        assert runs[name]["before_loss"] == pytest.approx(runs[cs.BASE]["in_domain_loss"], rel=1e-5)
    for name in expected:
        assert runs[name]["seconds_per_step"] > 0 and runs[name]["eval_seconds"] > 0
        phases = runs[name]["phase_peak_rss_mib"]
        assert set(phases) == {"loading", "evaluation", "training"}
        assert runs[name]["peak_rss_process_mib"] >= max(phases.values())
        assert [step for step, _ in runs[name]["curve"]] == [0, 3]
        assert runs[name]["trainable_params_per_step"] > 0
    # Main runs (seed 1; seed 0 is the grid's) measure how far the weights moved.
    main_xgb = runs[cs.key(XGB, 1e-2, 3, 1)]["weight_change"]
    assert main_xgb["mean"] > 0 and main_xgb["path_mean"] >= main_xgb["mean"] * (1 - 1e-6)
    assert "weight_change" not in runs[cs.key(XGB, 1e-2, 3, 0)]
    # One cost run per method at its best lr, alone on every core, training only.
    assert set(results["cost"]) == {XGB, LORA}
    for cost in results["cost"].values():
        assert (cost["steps"], cost["lr"], cost["jobs"]) == (cs.COST_STEPS, 1e-2, 1)
        assert cost["threads"] == (os.cpu_count() or 1) and cost["seconds_per_step"] > 0
        assert cost["phase_peak_rss_mib"]["training"] > 0 and "ood_loss" not in cost
    md = (out / "causal_study.md").read_text()
    assert "## Learning-rate grid (3 steps, seed 0)" in md and f"| {XGB} | **0.01**" in md
    table = md[md.index("## 3 steps") :].splitlines()
    row = next(line for line in table if line.startswith(f"| {LORA} | 0.01 | 2 |"))
    cost = results["cost"][LORA]
    training = cost["phase_peak_rss_mib"]["training"]
    assert f"| {cost['seconds_per_step']:.2f} | {training:.0f} / " in row
    assert "(1) |" in row  # weights moved: the one main run (seed 1) measured it
    paired = md[md.index("## Paired differences") :]
    row = next(line for line in paired.splitlines() if line.startswith(f"| {XGB} | {LORA} |"))
    assert row.count("(2 seeds, ahead on") == len(cs.METRICS)
    assert (out / "causal_study.png").stat().st_size > 5000

    # Cached runs are not repeated: a second invocation starts no process.
    def no_run(spec):
        raise AssertionError("a cached run was repeated")

    monkeypatch.setattr(cs, "run_one", no_run)
    cs.main(argv)
    # Another max length cannot be mixed into the same cache.
    with pytest.raises(SystemExit, match="another --out"):
        cs.main([*argv, "--max-length", "12"])


def test_only_main_runs_measure_the_weights_and_cost_runs_only_train():
    args, spec = cs.parse_args([]), {"data_dir": "/d", "model": "/m", "gguf_file": None}
    from xgblora_fast.cli.main import build_parser

    parsed = {
        stage: build_parser().parse_args(
            ["finetune", *cs.cli_options(XGB, 5e-3, 200, 0, args, spec, stage)]
        )
        for stage in ("main", "grid", "cost")
    }
    measured = {stage: options.measure_weight_change for stage, options in parsed.items()}
    assert measured == {"main": True, "grid": False, "cost": False}
    assert (parsed["grid"].eval_every, parsed["grid"].save_model) == (100, True)
    assert (parsed["cost"].eval_every, parsed["cost"].save_model) == (0, False)


def test_paired_differences_put_each_xgblora_method_against_the_baselines_and_its_parent():
    ortho, r8 = "XGBLoRA (orthogonal-gradient)", "LoRA r=8 (peft)"
    assert cs.METHODS[ortho].parent == XGB

    def runs(*losses):
        return [
            {"seed": seed, "in_domain_loss": x, "ood_loss": 4.0, "selection_accuracy": 0.5}
            for seed, x in enumerate(losses)
        ]

    budgets = {1000: {XGB: runs(2.0, 2.5), ortho: runs(1.75, 2.0), r8: runs(2.25, 2.25)}}
    table = cs.paired_differences(budgets)
    rows = {tuple(line.split(" | ")[:2]): line for line in table if line.startswith("| XGBLoRA (")}
    assert set(rows) == {(f"| {XGB}", r8), (f"| {ortho}", r8), (f"| {ortho}", XGB)}
    # orthogonal minus defaults: -0.25 and -0.5 (lower loss: ahead on both seeds)
    assert "| -0.3750 ± 0.1250 (2 seeds, ahead on 2, behind on 0) |" in rows[(f"| {ortho}", XGB)]
    assert "| +0.0000 ± 0.2500 (2 seeds, ahead on 1, behind on 1) |" in rows[(f"| {XGB}", r8)]
    # Without its parent in the budget, a variant still meets the baselines.
    del budgets[1000][XGB]
    rows = [line for line in cs.paired_differences(budgets) if line.startswith("| XGBLoRA (")]
    assert len(rows) == 1 and rows[0].startswith(f"| {ortho} | {r8} |")


def test_late_train_loss_is_the_mean_of_the_last_tenth_of_the_curve():
    curve = [5.0] * 90 + [2.0] * 9 + [3.0]  # 1000 steps in 10-step means
    assert cs.late_train_loss({"loss_curve": curve}) == pytest.approx(2.1)
    assert cs.late_train_loss({"loss_curve": [4.0, 3.0]}) == 3.0  # short runs: the last mean


def test_a_cell_is_mean_and_sd_over_seeds_or_the_one_value():
    assert cs.cell([1.0, 2.0], 2) == "1.50 ± 0.71"
    assert cs.cell([1.23456], 3) == "1.235"  # no "± 0.000" that would read as a spread of 0


def test_held_out_loss_every_100_steps_or_5_times_in_longer_runs():
    args = cs.parse_args([])
    spec = {"data_dir": "/d", "model": "/m", "gguf_file": None}

    def every(steps):
        options = cs.cli_options(XGB, 5e-3, steps, 0, args, spec)
        return int(options[options.index("--eval-every") + 1])

    assert [every(s) for s in (200, 500, 1000, 3000)] == [100, 100, 200, 600]
    with pytest.raises(SystemExit):
        cs.parse_args(["--jobs", "0"])
