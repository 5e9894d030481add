"""The CLI a user meets: every user error ends with one line on stderr and exit status 2, and
writes nothing into --output.

Each error case runs ``cli.main`` in-process (one runs ``python -m xgblora_fast.cli``); those that
need a model use the tiny offline folders of ``offline_models`` and stop before any training.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel

import xgblora_fast as xf
from xgblora_fast.boosting.config import XGBLoRAConfig
from xgblora_fast.cli import finetune
from xgblora_fast.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def common(tiny_folder, sentiment_csv, tmp_path):
    """A finetune command line that would run: the tiny BERT on the toy sentiment table."""
    return [
        "finetune",
        "--model",
        str(tiny_folder / "bert"),
        "--data",
        str(sentiment_csv),
        "--output",
        str(tmp_path / "run"),
    ]


def folder_state(path: Path) -> dict[Path, bytes | None] | None:
    """Every file's bytes (``None`` for a folder) under ``path``; ``None`` if it does not exist."""
    if not path.exists():
        return None
    return {p.relative_to(path): p.read_bytes() if p.is_file() else None for p in path.rglob("*")}


def user_error(capsys, argv: list[str], *needles: str) -> str:
    """Run ``cli.main(argv)``: exit status 2 and exactly one line on stderr that names each of
    ``needles``, no traceback, and the ``--output`` folder (if given) left exactly as it was:
    not created, nothing in it written. Returns that line."""
    at = len(argv) - 1 - argv[::-1].index("--output") if "--output" in argv else None
    output = Path(argv[at + 1]) if at is not None else None
    before = folder_state(output) if output else None
    status = cli.main(argv)
    _, err = capsys.readouterr()
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xgblora-fast") and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if output:
        assert folder_state(output) == before, f"a failing command wrote into {output}"
    return lines[0]


def test_user_error_fails_a_command_that_writes_into_its_output(capsys, common, monkeypatch):
    """The helper's check that a failing command leaves ``--output`` alone can fail."""
    output = Path(common[common.index("--output") + 1])

    def writes_then_fails(argv):
        output.mkdir()
        print("xgblora-fast finetune: error: bad", file=sys.stderr)
        return 2

    monkeypatch.setattr(cli, "main", writes_then_fails)
    with pytest.raises(AssertionError, match="a failing command wrote into"):
        user_error(capsys, common, "bad")


# ------------------------------------------------------------------ model and data
def test_missing_model_folder(capsys, common, tmp_path):
    argv = [*common, "--model", str(tmp_path / "no-such-model")]
    user_error(capsys, argv, "--model", "no-such-model", "does not exist")


def test_model_folder_without_config(capsys, common, tmp_path):
    (tmp_path / "empty").mkdir()
    user_error(capsys, [*common, "--model", str(tmp_path / "empty")], "no config.json")


def test_gguf_file_missing_or_without_a_model_folder(capsys, common, tmp_path):
    (tmp_path / "folder").mkdir()
    argv = [*common, "--model", str(tmp_path / "folder"), "--gguf-file", "nope.gguf"]
    user_error(capsys, argv, "--gguf-file", "nope.gguf", "not a file in --model")
    at = common.index("--model")
    no_model = common[:at] + common[at + 2 :]
    user_error(capsys, [*no_model, "--gguf-file", "x.gguf"], "--gguf-file needs --model")


def test_missing_data_file(capsys, common, tmp_path):
    user_error(capsys, [*common, "--data", str(tmp_path / "nope.csv")], "--data", "nope.csv")


def test_empty_data_file(capsys, common, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    user_error(capsys, [*common, "--data", str(tmp_path / "empty.csv")], "holds no rows")
    (tmp_path / "header.csv").write_text("text,label\n")  # a header but no rows
    user_error(capsys, [*common, "--data", str(tmp_path / "header.csv")], "holds no rows")


def test_unsupported_data_format(capsys, common, tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    user_error(capsys, [*common, "--data", str(tmp_path / "d.parquet")], "expected a .csv")


def test_invalid_jsonl_line(capsys, common, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    user_error(capsys, [*common, "--data", str(path)], "d.jsonl:2", "not valid JSON")


def test_wrong_text_column(capsys, common):
    line = user_error(capsys, [*common, "--text-column", "sentence"], "'sentence'")
    assert "--text-column" in line and "['label', 'text']" in line  # the columns there are


def test_missing_label_column(capsys, common, tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "good"}\n{"text": "bad"}\n')
    user_error(capsys, [*common, "--data", str(path)], "--label-column", "'label'", "['text']")


def test_a_row_without_a_value(capsys, common, tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("text,label\ngood,pos\nbad\n")  # row 3 (line 3) lacks its label
    user_error(capsys, [*common, "--data", str(path)], "short.csv:3", "'label'")


def test_a_single_class(capsys, common, tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\ngood,pos\nbad,pos\ngood,pos\n")
    user_error(capsys, [*common, "--data", str(path)], "at least two classes")


def test_test_size_that_leaves_no_rows(capsys, common, tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n")
    user_error(capsys, [*common, "--data", str(path), "--test-size", "0.1"], "--test-size")


# ------------------------------------------------------------------ --eval-data
def test_eval_data_is_the_test_set_and_test_size_is_not_used(tiny_folder, sentiment_csv, tmp_path):
    path = tmp_path / "eval.jsonl"
    # Only "pos": numbered over both files, it is class 1 as in --data (alone it would be 0).
    path.write_text("\n".join(json.dumps({"text": f"good w{i}", "label": "pos"}) for i in range(5)))
    argv = ["finetune", "--model", str(tiny_folder / "bert"), "--data", str(sentiment_csv)]
    args = cli.build_parser().parse_args([*argv, "--eval-data", str(path), "--test-size", "0.5"])
    cfg = cli.config_from_args(args)
    assert cfg.eval_data == str(path)
    train, test = finetune.load_rows(cfg)
    assert len(train) == 240  # every row of --data trains: no split
    assert test == [{"text": f"good w{i}", "label": 1} for i in range(5)]
    assert {r["label"] for r in train} == {0, 1}
    # Without it: the held-out fraction of --data.
    train, test = finetune.load_rows(cli.config_from_args(cli.build_parser().parse_args(argv)))
    assert (len(train), len(test)) == (192, 48)


def test_missing_eval_data_file(capsys, common, tmp_path):
    argv = [*common, "--eval-data", str(tmp_path / "test.csv")]
    user_error(capsys, argv, "--eval-data", "test.csv", "does not exist")


# ------------------------------------------------------------------ --target-modules
def test_target_modules_means_what_peft_means():
    assert cli.parse_target_modules("q_proj") == ["q_proj"]  # a name, not a regex
    assert cli.parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert cli.parse_target_modules("all-linear") == "all-linear"
    assert cli.parse_target_modules(r".*\.(query|value)") == r".*\.(query|value)"
    assert cli.parse_target_modules("a|b") == "a|b"
    # Names match the full name or a dotted suffix (peft's list form); a regex the full name.
    for value in ("query,value", "attention.self.query,value", r".*\.(query|value)"):
        model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2))
        chosen = xf.inject(model, cli.parse_target_modules(value))
        assert len(chosen) == 4 and all(n.endswith(("query", "value")) for n in chosen), value
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "comma-separated" in help_text and "re.fullmatch" in help_text


@pytest.mark.parametrize("method", ["xgblora", "lora"])
def test_target_modules_matching_nothing_lists_names_that_exist(capsys, common, method):
    argv = [*common, "--method", method, "--target-modules", "q_proj,v_proj"]
    # The error lists some of the tiny BERT's linear layers, from which to pick.
    user_error(capsys, argv, "--target-modules", "q_proj", "attention.self.query")


@pytest.mark.parametrize(
    ("value", "needle"), [("q_proj(", "not a valid regex"), (" , ", "names no module")]
)
def test_target_modules_that_are_not_a_list_or_a_regex(capsys, common, value, needle):
    user_error(capsys, [*common, "--target-modules", value], "--target-modules", needle)


# ------------------------------------------------------------------ invalid values
@pytest.mark.parametrize(
    ("options", "needles"),
    [
        (["--steps", "0"], ["--steps", "got 0"]),
        (["--steps", "ten"], ["--steps", "invalid int value"]),  # argparse's own errors too
        (["--method", "qlora"], ["--method", "invalid choice"]),
        (["--kappa", "0"], ["--kappa", "got 0"]),
        (["--layers-per-round", "half"], ["--layers-per-round", "a count (e.g. 2)"]),
        (["--layers-per-round", "1.5"], ["--layers-per-round", "fraction"]),
        (["--test-size", "1.5"], ["--test-size", "(0, 1)"]),
        (["--lr", "-1"], ["--lr", "must be > 0"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--booster-init", "random", "--gradient-init-rounds", "3"], ["--gradient-init-rounds"]),
        (["--method", "lora", "--export-lora", "adapter"], ["--export-lora", "method='xgblora'"]),
    ],
)
def test_invalid_values(capsys, common, options, needles):
    user_error(capsys, [*common, *options], *needles)


def test_library_config_errors_stay_value_errors():
    """config_from_args raises a UsageError, which is a ValueError (what library callers catch),
    and the message keeps the config's field name after the flags."""
    args = cli.build_parser().parse_args(["finetune", "--kappa", "0"])
    with pytest.raises(ValueError, match=r"^--kappa: .*kappa must be >= 1"):
        cli.config_from_args(args)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        finetune.FinetuneConfig(steps=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        finetune.FinetuneConfig(batch_size=2.5)


# ------------------------------------------------------------------ --resume
def test_resume_with_other_options_names_them(capsys, common, tmp_path):
    fast = ["--steps", "4", "--batch-size", "4", "--kappa", "2", "--kappa-growth", "1"]
    fast += ["--train-limit", "16", "--eval-limit", "8", "--eval-every", "0", "--max-length", "8"]
    fast += ["--target-modules", "query,value"]  # names, as peft takes them
    assert cli.main([*common, *fast, "--stop-after", "2"]) == 0  # a preempted job
    out, _ = capsys.readouterr()
    assert "stopped after step 2" in out and "--resume" in out
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    line = user_error(
        capsys, [*common, *fast, "--steps", "6", "--lr", "0.01", "--resume"], "--resume"
    )
    assert "--steps saved 4, given 6" in line and "--lr saved 0.005, given 0.01" in line
    assert "--kappa" not in line  # only what differs
    # Options that do not change the training may differ (here --eval-every).
    assert cli.main([*common, *fast, "--eval-every", "3", "--resume", "--no-save-model"]) == 0
    out, _ = capsys.readouterr()
    assert "xgblora: test accuracy before" in out


def test_resume_from_a_broken_checkpoint(capsys, common, tmp_path):
    """A checkpoint pointer to nothing complete: one line, exit 2, no traceback."""
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint-000002")  # points at nothing complete
    user_error(capsys, [*common, "--resume"], "--resume", "incomplete", "drop --resume")


# ------------------------------------------------------------------ --method lora without peft
def test_lora_without_peft_says_what_to_install(capsys, common, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    user_error(
        capsys, [*common, "--method", "lora"], "--method lora", 'pip install "xgblora-fast[peft]"'
    )


# ------------------------------------------------------------------ export-lora
def test_export_lora_from_a_missing_checkpoint(capsys, tmp_path):
    argv = ["export-lora", str(tmp_path / "runs" / "checkpoints"), str(tmp_path / "adapter")]
    user_error(capsys, argv, "xgblora-fast export-lora", "no checkpoint in", "--save-every")
    user_error(capsys, [*argv, "--rank", "0"], "--rank must be >= 1")
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------ --debug and real bugs
def test_debug_shows_the_traceback(capsys, common, tmp_path):
    status = cli.main([*common, "--model", str(tmp_path / "missing"), "--debug"])
    _, err = capsys.readouterr()
    assert status == 2
    assert "Traceback" in err and "UsageError" in err
    assert err.splitlines()[-1].startswith("xgblora-fast finetune: error: --model")


def test_a_real_bug_is_not_dressed_as_a_user_error(common, monkeypatch):
    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(finetune, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(common)


def test_help_and_argparse_errors_return_their_status(capsys):
    assert cli.main(["finetune", "--help"]) == 0
    assert "--eval-data" in capsys.readouterr().out
    assert cli.main([]) == 2  # no command
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "required" in err


def test_a_user_error_from_the_command_line_is_one_line(tiny_folder, tmp_path):
    """The real entry point, in its own process: exit status 2, one line, no traceback."""
    argv = [sys.executable, "-m", "xgblora_fast.cli", "finetune"]
    argv += ["--model", str(tiny_folder / "bert")]
    argv += ["--data", str(tmp_path / "train.csv")]  # no such file
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"xgblora-fast finetune: error: --data {tmp_path / 'train.csv'} does not exist; "
        "give a .csv, .tsv or .jsonl file"
    ]


# ------------------------------------------------------------------ presets and grouped --help
# The core group's flags: --preset, then the core fields of FinetuneConfig and XGBLoRAConfig.
CORE_FLAGS = ["--preset", "--model", "--data", "--method", "--steps", "--lr", "--target-modules"]
CORE_FLAGS += ["--alpha", "--kappa", "--kappa-growth", "--booster-init"]


def finetune_parser() -> argparse.ArgumentParser:
    return cli.build_parser()._subparsers._group_actions[0].choices["finetune"]


def config_of(*options: str) -> finetune.FinetuneConfig:
    return cli.config_from_args(cli.build_parser().parse_args(["finetune", *options]))


def test_defaults_without_preset_are_unchanged():
    """No option: the FinetuneConfig the CLI built before presets, every value spelled out."""
    xgb = XGBLoRAConfig(target_modules=finetune.DEFAULT_TARGETS, alpha=2.0, total_steps=300)
    before = finetune.FinetuneConfig(
        model=None,
        data=None,
        eval_data=None,
        task="seq-cls",
        text_column="text",
        label_column="label",
        output="runs/xgblora",
        method="xgblora",
        steps=300,
        batch_size=32,
        lr=None,
        head_lr=2e-3,
        warmup_ratio=0.05,
        lr_schedule="linear",
        max_length=64,
        test_size=0.2,
        train_limit=None,
        eval_limit=None,
        eval_every=100,
        dtype="float32",
        seed=0,
        lora_rank=8,
        save_every=0,
        resume=False,
        stop_after=None,
        save_model=True,
        export_lora=None,
        measure_weight_change=True,
        xgblora=xgb,
    )
    assert config_of() == before == config_of("--preset", "default")
    assert before == finetune.FinetuneConfig(xgblora=xgb)  # the library's defaults agree


def test_preset_paper_and_flags_over_it():
    paper = XGBLoRAConfig.paper(target_modules=finetune.DEFAULT_TARGETS, alpha=2.0)
    assert config_of("--preset", "paper").xgblora == dataclasses.replace(paper, total_steps=300)
    cfg = config_of("--preset", "paper", "--kappa", "7", "--steps", "50", "--seed", "3")
    assert cfg.xgblora == dataclasses.replace(paper, kappa=7, total_steps=50, seed=3)
    # A flag given with the default preset's value still overrides the paper's.
    cfg = config_of("--preset", "paper", "--kappa-growth", "1.5", "--booster-init", "carry")
    assert (cfg.xgblora.kappa_growth, cfg.xgblora.booster_init) == (1.5, "carry")
    assert cfg.xgblora.layers_per_round == 0.35 and cfg.xgblora.select == "uniform"


def test_an_unknown_preset_is_a_user_error(capsys, common):
    user_error(capsys, [*common, "--preset", "lora"], "--preset", "invalid choice")


def test_flag_help_is_the_field_help_in_core_and_advanced_groups():
    parser = finetune_parser()
    fields = {f.name: f for f in dataclasses.fields(XGBLoRAConfig)}
    fields |= {f.name: f for f in dataclasses.fields(finetune.FinetuneConfig)}  # its --seed
    groups = {g.title: g for g in parser._action_groups}
    seen = set()
    for title in ("core", "advanced"):
        for action in groups[title]._group_actions:
            if action.dest == "preset":
                continue
            field = fields[action.dest]
            assert action.help == field.metadata["help"], action.dest
            assert field.metadata["group"] == title, action.dest
            seen.add(action.dest)
    # Every field has its flag there, but the run's length (--steps sets total_steps).
    assert seen == set(fields) - {"xgblora", "total_steps", "rounds"}
    assert [a.option_strings[0] for a in groups["core"]._group_actions] == CORE_FLAGS
    # No config flag is left outside the two groups.
    for title, group in groups.items():
        if title not in ("core", "advanced"):
            assert {a.dest for a in group._group_actions} <= {"help", "debug"}, title


def test_help_shows_each_presets_default():
    text = " ".join(finetune_parser().format_help().split())
    assert "(default: 1.5; --preset paper: 1.0)" in text  # --kappa-growth
    assert "(default: carry; --preset paper: random)" in text  # --booster-init
    assert "(default: 10)" in text  # --kappa: the same in both presets
