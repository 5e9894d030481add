"""``xgblora-fast``: the command line.

xgblora-fast finetune                      # the embedded default: MiniLM on movie reviews
xgblora-fast finetune --model DIR --data train.jsonl --task causal-lm --steps 2000
xgblora-fast finetune --preset paper --kappa 20  # the paper's recipe, rounds of 20 steps
xgblora-fast finetune --export-lora adapter  # also write the fine-tune as a peft LoRA adapter
xgblora-fast export-lora runs/xgblora/checkpoints adapter --rank 8   # from a checkpoint
xgblora-fast inspect --json                # AOT kernel report (sm_80 / sm_90)

A user error (a missing file or column, an invalid or contradictory option, --resume with other
options) ends with one line on stderr and exit status 2; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import traceback
from typing import Any

from xgblora_fast.boosting.checkpoint import CheckpointError
from xgblora_fast.boosting.config import (
    BOOSTER_INITS,
    GROUPS,
    OPTIMIZER_RESETS,
    PRESET_VALUES,
    PRESETS,
    SAMPLE_BY,
    SELECTIONS,
    XGBLoRAConfig,
)
from xgblora_fast.cli.data import UsageError
from xgblora_fast.cli.finetune import (
    AUTOCAST,
    DTYPES,
    LR_SCHEDULES,
    METHODS,
    TASKS,
    XGBLORA_OVERRIDES,
    FinetuneConfig,
)
from xgblora_fast.nn.layer import INITS
from xgblora_fast.nn.patching import ALL_LINEAR
from xgblora_fast.ops.checks import ROUNDINGS

# Errors that are the user's to fix: one line on stderr, exit status 2 (--debug: the traceback).
USER_ERRORS = (UsageError, CheckpointError)
# A --target-modules value holding any of these is a regex; otherwise a list of names.
REGEX_CHARS = frozenset("*+?|()[]{}^$\\")
FINETUNE_FIELDS = tuple(f.name for f in dataclasses.fields(FinetuneConfig) if f.name != "xgblora")
# The booster's fields the options set: all but the run's length (--steps sets total_steps).
BOOSTER_FIELDS = tuple(
    f.name for f in dataclasses.fields(XGBLoRAConfig) if f.name not in ("total_steps", "rounds")
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (exit status 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fraction_or_count(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 2) or a fraction (e.g. 0.35), got {text!r}"
        ) from None
    return int(value) if value >= 1 and value.is_integer() and "." not in text else value


# How argparse reads each config field's flag; its help and group come from the field's metadata.
# --seed is FinetuneConfig's and sets the booster's seed too.
FLAG_KWARGS: dict[str, dict[str, Any]] = {
    "model": {},
    "gguf_file": {"metavar": "FILE"},
    "data": {},
    "eval_data": {"metavar": "FILE"},
    "task": {"choices": TASKS},
    "text_column": {},
    "label_column": {},
    "output": {},
    "method": {"choices": METHODS},
    "steps": {"type": int},
    "batch_size": {"type": int},
    "lr": {"type": float},
    "head_lr": {"type": float},
    "warmup_ratio": {"type": float},
    "lr_schedule": {"choices": tuple(LR_SCHEDULES)},
    "max_length": {"type": int},
    "test_size": {"type": float},
    "train_limit": {"type": int},
    "eval_limit": {"type": int},
    "eval_every": {"type": int},
    "eval_batch_size": {"type": int},
    "dtype": {"choices": tuple(DTYPES)},
    "autocast": {"choices": tuple(AUTOCAST)},
    "seed": {"type": int},
    "lora_rank": {"type": int},
    "save_every": {"type": int},
    "resume": {"action": "store_true"},
    "stop_after": {"type": int},
    "save_model": {"action": "store_false"},
    "export_lora": {"metavar": "DIR"},
    "measure_weight_change": {"action": argparse.BooleanOptionalAction},
    "target_modules": {},  # parse_target_modules reads it
    "alpha": {"type": float},
    "dropout": {"type": float},
    "kappa": {"type": int},
    "kappa_growth": {"type": float},
    "layers_per_round": {"type": _fraction_or_count},
    "sample_by": {"choices": SAMPLE_BY},
    "merge_step": {"type": float},
    "rounding": {"choices": ROUNDINGS},
    "init": {"choices": INITS},
    "booster_init": {"choices": BOOSTER_INITS},
    "booster_keep": {"type": float},
    "gradient_init_rounds": {"type": int},
    "select": {"choices": SELECTIONS},
    "power_iters": {"type": int},
    "weight_decay": {"type": float},
    "optimizer_reset": {"choices": OPTIMIZER_RESETS},
    "rewarm_steps": {"type": int},
    "verify_replicas": {"action": argparse.BooleanOptionalAction},
    "record": {"action": argparse.BooleanOptionalAction},
}
PRESET_HELP = (
    "the XGBLoRA settings the other options start from: default (measured best on the demo "
    "task) or paper (arXiv 2410.19694's recipe: "
    + ", ".join(f"{k} {v}" for k, v in PRESET_VALUES["paper"].items())
    + "); options given override it"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in --help; a flag that the preset fills (argparse default SUPPRESS)
    shows each preset's value instead (``action.preset_defaults``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = getattr(action, "preset_defaults", None)
        if shown is None:
            return super()._get_help_string(action)
        return f"{action.help} ({shown.replace('%', '%%')})"


def flag_fields() -> list[dataclasses.Field]:
    """The config fields that ``finetune`` has a flag for, FinetuneConfig's then the booster's
    (``--seed`` is FinetuneConfig's and sets the booster's seed too)."""
    finetune = [f for f in dataclasses.fields(FinetuneConfig) if f.name in FINETUNE_FIELDS]
    booster = [
        f
        for f in dataclasses.fields(XGBLoRAConfig)
        if f.name in BOOSTER_FIELDS and f.name not in FINETUNE_FIELDS
    ]
    return finetune + booster


def _preset_defaults(name: str, presets: dict[str, XGBLoRAConfig]) -> str:
    """A preset-filled flag's default for --help, e.g. ``default: 1.5; --preset paper: 1.0``
    (only the presets that differ from the default one)."""
    values = {preset: getattr(config, name) for preset, config in presets.items()}
    default = values.pop(PRESETS[0])
    others = [f"--preset {preset}: {v}" for preset, v in values.items() if v != default]
    return "; ".join([f"default: {default}", *others])


def parse_target_modules(text: str) -> str | list[str]:
    """``--target-modules``: ``"all-linear"``, a regex (any of ``REGEX_CHARS`` in it), or a list
    of names from a comma-separated value. ``UsageError`` for an invalid regex or no name."""
    text = text.strip()
    if text == ALL_LINEAR:
        return text
    if REGEX_CHARS & set(text):
        try:
            re.compile(text)
        except re.error as e:
            raise UsageError(
                f"--target-modules {text!r} is not a valid regex ({e}); give comma-separated "
                "names (q_proj,v_proj), all-linear, or a valid regex"
            ) from e
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(
            f"--target-modules {text!r} names no module; give comma-separated names "
            "(q_proj,v_proj), all-linear, or a regex"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="xgblora-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    debug = ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="on a user error, show the traceback as well"
    )
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a model folder on a CSV/JSONL file (default: the embedded demo)",
        formatter_class=HelpFormatter,
        parents=[debug],
    )
    titles = {
        "core": "the options that matter most; --preset picks where the XGBLoRA ones start",
        "advanced": "the rest (docs/method.md: what each knob does and what was measured)",
    }
    groups = {name: ft.add_argument_group(name, titles[name]) for name in GROUPS}
    groups["core"].add_argument("--preset", choices=PRESETS, default=PRESETS[0], help=PRESET_HELP)
    presets = {name: XGBLoRAConfig.preset(name, **XGBLORA_OVERRIDES) for name in PRESETS}
    for field in flag_fields():
        group = groups[field.metadata["group"]]
        kwargs = {"dest": field.name, "help": field.metadata["help"], **FLAG_KWARGS[field.name]}
        if field.name in FINETUNE_FIELDS:
            group.add_argument(_flag(field.name), default=field.default, **kwargs)
        else:  # absent unless given, so that the preset fills it
            action = group.add_argument(_flag(field.name), default=argparse.SUPPRESS, **kwargs)
            action.preset_defaults = _preset_defaults(field.name, presets)

    ex = sub.add_parser(
        "export-lora",
        help="write a checkpoint's boosted fine-tune as a peft LoRA adapter",
        parents=[debug],
    )
    ex.add_argument("checkpoint", help="checkpoint folder, or a run's checkpoints folder")
    ex.add_argument("output", help="adapter folder")
    ex.add_argument("--rank", type=int, default=None, help="truncate each layer by SVD")
    ex.add_argument("--base-model", default=None, help="base_model_name_or_path to write")

    ins = sub.add_parser("inspect", help="ahead-of-time kernel report (no GPU needed)")
    ins.add_argument(
        "args", nargs=argparse.REMAINDER, help="passed to xgblora_fast.tools.kernel_report"
    )
    return parser


def _flag(field: str) -> str:
    special = {"save_model": "--no-save-model", "total_steps": "--steps"}
    return special.get(field, "--" + field.replace("_", "-"))


def _config_error(error: Exception) -> UsageError:
    """A config's ValueError/TypeError as a ``UsageError`` that names the options involved
    (the message keeps its field names, which the flags follow)."""
    message = " ".join(str(error).split())
    fields = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name != "xgblora"]
    fields += [f.name for f in dataclasses.fields(XGBLoRAConfig) if f.name != "rounds"]
    flags = []
    for name in dict.fromkeys(fields):
        # A name with an underscore anywhere; a plain word first or after "...Config.".
        where = r"\b" if "_" in name else r"(?:^|Config\.)"
        if re.search(rf"{where}{name}\b", message) and _flag(name) not in flags:
            flags.append(_flag(name))
    return UsageError(f"{', '.join(flags)}: {message}" if flags else message)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The ``FinetuneConfig`` of parsed ``finetune`` options; ``UsageError`` (a ValueError)
    when a value is invalid or options contradict each other."""
    options = vars(args)
    # The booster options given (the others are absent: the preset fills them), and --seed.
    booster = {k: options[k] for k in BOOSTER_FIELDS if k in options}
    if "target_modules" in booster:
        booster["target_modules"] = parse_target_modules(booster["target_modules"])
    try:
        xgb = XGBLoRAConfig.preset(
            args.preset, **(XGBLORA_OVERRIDES | booster), total_steps=args.steps
        )
        return FinetuneConfig(xgblora=xgb, **{k: options[k] for k in FINETUNE_FIELDS})
    except (ValueError, TypeError) as e:
        raise _config_error(e) from e


def _export_lora(args: argparse.Namespace) -> int:
    from xgblora_fast.boosting.export import export_lora_from_checkpoint

    if args.rank is not None and args.rank < 1:
        raise UsageError(
            f"--rank must be >= 1, got {args.rank}; leave it out for the exact adapter"
        )
    try:
        report = export_lora_from_checkpoint(
            args.checkpoint, args.output, rank=args.rank, base_model_name_or_path=args.base_model
        )
    except CheckpointError as e:
        raise UsageError(
            f"{' '.join(str(e).split())}; give a checkpoint folder or a run's checkpoints folder "
            "(finetune writes them with --save-every N or --stop-after N)"
        ) from e
    except ValueError as e:
        if "nothing recorded" not in str(e):
            raise
        raise UsageError(
            f"{' '.join(str(e).split())}; fine-tune with recording on (the default, --record)"
        ) from e
    print(
        f"LoRA adapter of {len(report['layers'])} layers ({report['adapter_bytes']} bytes, "
        f"relative error {report['relative_error']:.2e}) in {args.output}"
    )
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from xgblora_fast.cli.finetune import run

    summary = run(config_from_args(args))
    if "stopped_at" in summary:
        print(
            f"{summary['method']}: stopped after step {summary['stopped_at']} with a checkpoint "
            f"in {args.output}/checkpoints; the same command with --resume continues"
        )
        return 0
    metric = "accuracy" if summary["task"] == "seq-cls" else "perplexity"
    print(
        f"{summary['method']}: test {metric} before {summary['before'][metric]:.4f}, "
        f"after {summary['after'][metric]:.4f} ({summary['steps']} steps, "
        f"{summary['seconds_per_step']:.2f} s/step); results in {args.output}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (2: a user error, told on one line of stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse error (2), already printed
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "inspect":
        from xgblora_fast.tools import kernel_report

        return kernel_report.main(args.args) or 0
    try:
        return _export_lora(args) if args.command == "export-lora" else _finetune(args)
    except USER_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split())
        print(f"xgblora-fast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
