"""``xgblora-fast``: the command line.

xgblora-fast finetune                      # the embedded default: MiniLM on movie reviews
xgblora-fast finetune --model DIR --data train.jsonl --task causal-lm --steps 2000
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

from xgblora_fast.boosting.checkpoint import CheckpointError
from xgblora_fast.boosting.config import (
    BOOSTER_INITS,
    OPTIMIZER_RESETS,
    SAMPLE_BY,
    SELECTIONS,
    XGBLoRAConfig,
)
from xgblora_fast.cli.data import UsageError
from xgblora_fast.cli.finetune import (
    DEFAULT_LR,
    DTYPES,
    LR_SCHEDULES,
    METHODS,
    TASKS,
    FinetuneConfig,
)
from xgblora_fast.nn.layer import INITS
from xgblora_fast.nn.patching import ALL_LINEAR
from xgblora_fast.ops.checks import ROUNDINGS

# Errors that are the user's to fix: one line on stderr, exit status 2 (--debug: the traceback).
USER_ERRORS = (UsageError, CheckpointError)
# A --target-modules value holding any of these is a regex; otherwise a list of names.
REGEX_CHARS = frozenset("*+?|()[]{}^$\\")
TARGET_HELP = (
    "the linear layers that get boosters (LoRA with --method lora), as in peft: "
    "comma-separated module names, each matching the full name or its dotted suffix "
    "(q_proj,v_proj or attention.self.query); all-linear (every linear layer but the output "
    "and task heads); or, when the value holds any of * + ? | ( ) [ ] { } ^ $ \\, a regex "
    "that must match the whole module name (re.fullmatch, as peft treats a string)"
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[debug],
    )
    d = FinetuneConfig()
    x = d.xgblora
    g = ft.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="model folder (default: embedded MiniLM)")
    g.add_argument("--data", default=None, help="CSV/TSV/JSONL file (default: movie reviews)")
    g.add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="CSV/TSV/JSONL file of test rows (same columns as --data); default: a held-out "
        "--test-size of --data",
    )
    g.add_argument("--task", choices=TASKS, default=d.task)
    g.add_argument("--text-column", default=d.text_column)
    g.add_argument("--label-column", default=d.label_column, help="seq-cls labels (int or str)")
    g.add_argument(
        "--test-size",
        type=float,
        default=d.test_size,
        help="held-out fraction of --data (not used with --eval-data)",
    )
    g.add_argument("--train-limit", type=int, default=None, help="use only this many train rows")
    g.add_argument("--eval-limit", type=int, default=None, help="use only this many test rows")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text")
    g.add_argument("--dtype", choices=list(DTYPES), default=d.dtype, help="base weight dtype")
    g = ft.add_argument_group("training")
    g.add_argument("--method", choices=METHODS, default=d.method, help="xgblora or a baseline")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of the adapters (full: of the model); default per method: "
        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()),
    )
    g.add_argument("--head-lr", type=float, default=d.head_lr, help="lr of a fresh task head")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument(
        "--lr-schedule",
        choices=tuple(LR_SCHEDULES),
        default=d.lr_schedule,
        help="after the warm-up: linear or cosine decay to 0, or constant",
    )
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps; 0: only at end")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="for --method lora")
    g = ft.add_argument_group("XGBLoRA")
    g.add_argument(
        "--target-modules",
        default=x.target_modules,
        help=TARGET_HELP,
    )
    g.add_argument("--alpha", type=float, default=x.alpha, help="booster scale s")
    g.add_argument("--dropout", type=float, default=x.dropout, help="dropout on booster input")
    g.add_argument("--kappa", type=int, default=x.kappa, help="optimizer steps per round")
    g.add_argument(
        "--kappa-growth",
        type=float,
        default=x.kappa_growth,
        help="round k lasts kappa * growth**k steps (1: every round kappa steps)",
    )
    g.add_argument(
        "--layers-per-round",
        type=_fraction_or_count,
        default=x.layers_per_round,
        help="L_s: a count (e.g. 2) or a fraction (e.g. 0.35) of the units",
    )
    g.add_argument("--sample-by", choices=SAMPLE_BY, default=x.sample_by)
    g.add_argument("--merge-step", type=float, default=x.merge_step, help="alpha_t")
    g.add_argument("--rounding", choices=ROUNDINGS, default=x.rounding, help="merge rounding")
    g.add_argument("--init", choices=INITS, default=x.init, help="distribution of a random a")
    g.add_argument(
        "--booster-init",
        choices=BOOSTER_INITS,
        default=x.booster_init,
        help="carry (default): each round keeps the a its layer trained last; random: a fresh "
        "a each round; gradient: a along the top singular vector of dL/dW; redraw: as carry, "
        "with a fresh a at each merge and the difference merged into W",
    )
    g.add_argument(
        "--booster-keep",
        type=float,
        default=x.booster_keep,
        help="with --booster-init carry/redraw: the fraction of each booster a merge leaves "
        "in place "
        "(default: 0.9 with every unit in every round, else 0)",
    )
    g.add_argument(
        "--select",
        choices=SELECTIONS,
        default=x.select,
        help="how rounds pick their units: uniformly or by gradient norm",
    )
    g.add_argument(
        "--gradient-init-rounds",
        type=int,
        default=x.gradient_init_rounds,
        help="with --booster-init gradient: only the first N rounds (default: every round)",
    )
    g.add_argument("--power-iters", type=int, default=x.power_iters, help="for --booster-init")
    g.add_argument(
        "--verify-replicas",
        action=argparse.BooleanOptionalAction,
        default=x.verify_replicas,
        help="under torch.distributed: check every round that all ranks hold the same weights",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=x.weight_decay,
        help="AdamW's, on the boosters (with --method lora: on LoRA's factors)",
    )
    g.add_argument(
        "--optimizer-reset",
        choices=OPTIMIZER_RESETS,
        default=x.optimizer_reset,
        help="at each merge drop the boosters' optimizer state (all), only its momentum, or none",
    )
    g.add_argument(
        "--rewarm-steps",
        type=int,
        default=x.rewarm_steps,
        help="linear lr re-warm-up after each merge (0: off)",
    )
    g.add_argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=x.record,
        help="record every merged booster (for --export-lora and xf.unmerge_)",
    )
    g = ft.add_argument_group("output")
    g.add_argument("--output", default=d.output, help="folder for model, history, plot")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    g.add_argument("--resume", action="store_true", help="resume from OUTPUT/checkpoints")
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this job after N steps with a checkpoint (time-limited slots)",
    )
    g.add_argument(
        "--no-save-model",
        dest="save_model",
        action="store_false",
        help="skip writing the merged model",
    )
    g.add_argument(
        "--measure-weight-change",
        action=argparse.BooleanOptionalAction,
        default=d.measure_weight_change,
        help="|W - W0| / |W0| per layer in summary.json (reads the base checkpoint again)",
    )
    g.add_argument(
        "--export-lora",
        default=None,
        metavar="DIR",
        help="also write the fine-tune as a peft LoRA adapter (rank = rounds) to DIR",
    )

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
    targets = parse_target_modules(args.target_modules)
    booster_fields = {f.name for f in dataclasses.fields(XGBLoRAConfig)} - {"target_modules"}
    ft_fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"xgblora"}
    try:
        xgb = XGBLoRAConfig(
            target_modules=targets,
            total_steps=args.steps,
            **{k: v for k, v in vars(args).items() if k in booster_fields and k != "total_steps"},
        )
        return FinetuneConfig(
            xgblora=xgb, **{k: v for k, v in vars(args).items() if k in ft_fields}
        )
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
