"""Fine-tune a model folder on a text data set with XGBLoRA (or a baseline) and evaluate it.

This is the engine behind ``xgblora-fast finetune`` and the accuracy study in ``bench/``:

- ``method="xgblora"``: rank-1 boosters, merged into the weights at the end of every round;
- ``method="lora"``: peft LoRA of rank ``lora_rank`` on the same target modules (baseline);
- ``method="full"``: every parameter trains (baseline).

For sequence classification the freshly initialised head (the modules whose weights were missing
from the checkpoint, e.g. ``classifier``) trains fully in every method, as peft's
``modules_to_save`` does. Every method sees the same batches in the same order for a given seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from xgblora_fast.boosting.booster import Booster
from xgblora_fast.boosting.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from xgblora_fast.boosting.config import XGBLoRAConfig, meta
from xgblora_fast.boosting.export import CHECKPOINT_METADATA, adapter_metadata, export_lora
from xgblora_fast.cli import data as data_mod
from xgblora_fast.cli.data import UsageError
from xgblora_fast.cli.peak_memory import PhasePeaks
from xgblora_fast.nn.patching import eject, inject

METHODS = ("xgblora", "lora", "full")
TASKS = ("seq-cls", "causal-lm")
# Learning-rate envelopes after the linear warm-up (transformers' scheduler names).
LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Compute dtypes of --autocast. float16 would need loss scaling (GradScaler), which the CLI's
# CPU loop does not do: the Python API with torch.amp covers it.
AUTOCAST = {"none": None, "bfloat16": torch.bfloat16}
# A folder holding one of these has its own tokenizer (save_pretrained writes both).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The attention and MLP projections of BERT-, Llama- and GPT-2-style models (not the task head).
DEFAULT_TARGETS = (
    r".*\.(query|key|value|dense|q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    r"|c_attn|c_proj|c_fc)"
)


# Learning rates per method: the adapters' (boosters', LoRA's) or, for full fine-tuning, the
# model's. XGBLoRA's boosters restart every round, so they take larger steps than LoRA's (see
# bench/results/schedule.md).
DEFAULT_LR = {"xgblora": 5e-3, "lora": 5e-3, "full": 5e-5}
# What fine-tuning sets on top of an XGBLoRAConfig preset: the attention and MLP projections as
# targets, and the booster scale the accuracy study ran.
XGBLORA_OVERRIDES: dict[str, Any] = {"target_modules": DEFAULT_TARGETS, "alpha": 2.0}


@dataclasses.dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the CLI maps its options one to one onto these.

    Each field's one-line help and group ("core" or "advanced") is in its ``metadata``;
    ``xgblora`` defaults to ``XGBLoRAConfig(**XGBLORA_OVERRIDES)`` (docs/method.md).
    """

    model: str | None = dataclasses.field(
        default=None, metadata=meta("model folder (None: the embedded MiniLM)", core=True)
    )
    gguf_file: str | None = dataclasses.field(
        default=None,
        metadata=meta(
            "a GGUF checkpoint in the model folder (or a path), dequantised to dtype; the result "
            "saves as a plain transformers model (pip install gguf)"
        ),
    )
    data: str | None = dataclasses.field(
        default=None,
        metadata=meta(
            "CSV/TSV/JSONL file of training rows (None: the embedded movie reviews)", core=True
        ),
    )
    eval_data: str | None = dataclasses.field(
        default=None,
        metadata=meta(
            "CSV/TSV/JSONL file of test rows, same columns as data (None: test_size of data)"
        ),
    )
    task: str = dataclasses.field(
        default="seq-cls", metadata=meta("seq-cls (sequence classification) or causal-lm")
    )
    text_column: str = dataclasses.field(
        default="text", metadata=meta("the column that holds the texts")
    )
    label_column: str = dataclasses.field(
        default="label", metadata=meta("the column of the seq-cls labels (ints or names)")
    )
    output: str = dataclasses.field(
        default="runs/xgblora", metadata=meta("folder for the model, history, summary and plot")
    )
    method: str = dataclasses.field(
        default="xgblora",
        metadata=meta("xgblora, or a baseline: lora (peft) or full fine-tuning", core=True),
    )
    steps: int = dataclasses.field(
        default=300, metadata=meta("optimizer steps in total", core=True)
    )
    batch_size: int = dataclasses.field(default=32, metadata=meta("rows per optimizer step"))
    lr: float | None = dataclasses.field(
        default=None,
        metadata=meta(
            "learning rate of the adapters (full: of the model); None: the method's, "
            + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()),
            core=True,
        ),
    )
    head_lr: float = dataclasses.field(
        default=2e-3, metadata=meta("learning rate of a fresh task head")
    )
    warmup_ratio: float = dataclasses.field(
        default=0.05, metadata=meta("fraction of the steps that warm the lr up linearly")
    )
    lr_schedule: str = dataclasses.field(
        default="linear",
        metadata=meta("after the warm-up: linear or cosine decay to 0, or constant"),
    )
    max_length: int = dataclasses.field(default=64, metadata=meta("tokens per text"))
    test_size: float = dataclasses.field(
        default=0.2,
        metadata=meta("held-out fraction (or count) of data's rows (not used with eval_data)"),
    )
    train_limit: int | None = dataclasses.field(
        default=None, metadata=meta("use only this many train rows (None: all)")
    )
    eval_limit: int | None = dataclasses.field(
        default=None, metadata=meta("use only this many test rows (None: all)")
    )
    eval_every: int = dataclasses.field(
        default=100, metadata=meta("evaluate every N steps (0: only at the end)")
    )
    eval_batch_size: int = dataclasses.field(
        default=128,
        metadata=meta(
            "rows per evaluation batch (a causal LM's logits take rows x max_length x vocabulary"
            " x 4 bytes)"
        ),
    )
    dtype: str = dataclasses.field(default="float32", metadata=meta("dtype of the base weights"))
    autocast: str = dataclasses.field(
        default="none",
        metadata=meta(
            "bfloat16: forward passes (training and evaluation) under torch.autocast, weights"
            " and optimizer state stay in dtype, as Trainer(bf16=True); none: off"
        ),
    )
    seed: int = dataclasses.field(
        default=0,
        metadata=meta(
            "seeds the batch order and the fresh head (on the command line: the boosters too)"
        ),
    )
    lora_rank: int = dataclasses.field(default=8, metadata=meta("rank of the lora baseline"))
    save_every: int = dataclasses.field(
        default=0, metadata=meta("checkpoint every N steps (0: never)")
    )
    resume: bool = dataclasses.field(default=False, metadata=meta("resume from output/checkpoints"))
    stop_after: int | None = dataclasses.field(
        default=None,
        metadata=meta(
            "end this job after N steps with a checkpoint (time-limited slots; resume goes on)"
        ),
    )
    save_model: bool = dataclasses.field(
        default=True, metadata=meta("write the merged model into output (--no-save-model: skip)")
    )
    export_lora: str | None = dataclasses.field(
        default=None,
        metadata=meta(
            "with method xgblora: also write the fine-tune as a peft LoRA adapter (rank = "
            "rounds) to this folder"
        ),
    )
    measure_weight_change: bool = dataclasses.field(
        default=True,
        metadata=meta(
            "|W - W0| / |W0| per layer in summary.json (reads the base checkpoint again)"
        ),
    )
    xgblora: XGBLoRAConfig = dataclasses.field(
        default_factory=lambda: XGBLoRAConfig(**XGBLORA_OVERRIDES),
        metadata=meta("the boosters' settings (XGBLoRAConfig.preset picks a preset)", core=True),
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {tuple(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {tuple(AUTOCAST)}, got {self.autocast!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        at_least = {"steps": 1, "batch_size": 1, "eval_batch_size": 1, "max_length": 1}
        at_least |= {"lora_rank": 1}
        at_least |= {"eval_every": 0, "save_every": 0}
        at_least |= {"train_limit": 1, "eval_limit": 1, "stop_after": 1}  # or None
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.head_lr) and self.head_lr >= 0):
            raise ValueError(f"head_lr must be >= 0, got {self.head_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        ts = self.test_size
        if isinstance(ts, bool) or not (
            (isinstance(ts, float) and 0 < ts < 1) or (isinstance(ts, int) and ts >= 1)
        ):
            raise ValueError(f"test_size must be a fraction in (0, 1) or a count >= 1, got {ts!r}")
        if self.export_lora and (self.method != "xgblora" or not self.xgblora.record):
            raise ValueError("export_lora needs method='xgblora' with recording on")


# ---------------------------------------------------------------- data
def load_rows(cfg: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    """Train and test rows (``{"text"[, "label"]}``): ``eval_data``'s rows as the test set, or
    a fixed split of ``data`` (``test_size``). String labels are numbered over both sets
    together, in sorted order. Raises ``UsageError`` for unusable files or labels."""
    label = cfg.label_column if cfg.task == "seq-cls" else None
    if cfg.data is None:
        rows = data_mod.movie_reviews()
    else:
        rows = data_mod.read_table(cfg.data, cfg.text_column, label, option="--data")
    if cfg.eval_data is None:
        test_rows = []
    else:
        test_rows = data_mod.read_table(cfg.eval_data, cfg.text_column, label, option="--eval-data")
    if label:
        data_mod.index_labels(rows + test_rows)  # one numbering for both files
        check_labels(rows + test_rows)
    if cfg.eval_data is None:
        train, test = data_mod.split_rows(rows, cfg.test_size, seed=1234)  # fixed split: fair
    else:
        train, test = rows, test_rows
    if cfg.train_limit:
        train = train[: cfg.train_limit]
    if cfg.eval_limit:
        test = test[: cfg.eval_limit]
    return train, test


def check_labels(rows: list[dict]) -> None:
    """Sequence-classification labels: ints >= 0 (the class index), at least two classes."""
    labels = {r["label"] for r in rows}
    if min(labels) < 0:
        raise UsageError(
            f"--label-column: labels must be class indices >= 0 or names, got {min(labels)}"
        )
    if len(labels) < 2:
        raise UsageError(
            f"--label-column: every row has the label {labels.pop()}; classification needs at "
            "least two classes (for plain text use --task causal-lm)"
        )


def count_labels(rows: list[dict]) -> int:
    """The classifier's number of classes: the largest class index + 1."""
    return max(r["label"] for r in rows) + 1


def batch_order(n_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices of every training batch: seeded epochs of shuffled rows."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_rows, generator=g).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def encode(tokenizer, rows: list[dict], max_length: int, task: str) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [r["text"] for r in rows],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    if task == "seq-cls":
        enc["labels"] = torch.tensor([r["label"] for r in rows])
    else:
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
    return dict(enc)


# ---------------------------------------------------------------- model
def load_model(cfg: FinetuneConfig, num_labels: int):
    """``(model, tokenizer, names of freshly initialised modules)``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    path = model_folder(cfg)
    gguf = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    tokenizer = load_tokenizer(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.task == "seq-cls":
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, output_loading_info=True, **gguf
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **gguf
        )
    if gguf:
        drop_quantization(model)
    fresh = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    return model, tokenizer, fresh


def load_tokenizer(cfg: FinetuneConfig):
    """The model's tokenizer (pad token: eos where it has none): the folder's own tokenizer
    files first, else the one a GGUF file carries."""
    from transformers import AutoTokenizer

    path = model_folder(cfg)
    has_tokenizer = any((Path(path) / name).is_file() for name in TOKENIZER_FILES)
    gguf = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not has_tokenizer else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def drop_quantization(model: nn.Module) -> None:
    """A GGUF checkpoint loads dequantised but keeps its quantisation config and quantizer: drop
    them, so the model trains, saves and reloads as a plain transformers model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None


def model_folder(cfg: FinetuneConfig) -> str:
    """``cfg.model``, checked to be a model folder (``UsageError`` if not), or the default; with
    ``cfg.gguf_file``, checked to hold that file (and ``gguf`` to be installed)."""
    if cfg.model is None:
        if cfg.gguf_file:
            raise UsageError("--gguf-file needs --model, the folder that holds the GGUF file")
        return data_mod.default_model_path()
    path = Path(cfg.model)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UsageError(
            f"--model {path} {what}; give a model folder as save_pretrained writes it "
            "(config.json, weights, tokenizer)"
        )
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise UsageError(
                f"--gguf-file {cfg.gguf_file} is not a file in --model {path}; give the name of "
                "the .gguf file in that folder (or its path)"
            )
        if importlib.util.find_spec("gguf") is None:
            raise UsageError('--gguf-file needs the gguf package: pip install "xgblora-fast[gguf]"')
        return str(path)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model {path} holds no config.json; give a model folder as save_pretrained "
            "writes it (config.json, weights, tokenizer)"
        )
    return str(path)


def _import_peft():
    try:
        import peft
    except ImportError as e:
        raise UsageError(f'--method lora needs peft ({e}): pip install "xgblora-fast[peft]"') from e
    return peft


def _target_error(cfg: FinetuneConfig, error: Exception) -> UsageError:
    message = " ".join(str(error).split())
    if "target" not in message.lower():
        return UsageError(message)
    return UsageError(
        f"--target-modules: {message}; give comma-separated names (q_proj,v_proj), all-linear, "
        "or a regex over the full names"
    )


def check_target_modules(cfg: FinetuneConfig) -> None:
    """Before any weight is read: ``UsageError`` if ``cfg.xgblora.target_modules`` matches no
    linear layer of the model (tried on a weightless copy built from its config.json)."""
    if cfg.method == "full":
        return
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if cfg.task == "seq-cls" else AutoModelForCausalLM
    path = model_folder(cfg)
    try:
        with torch.device("meta"):
            gguf = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
            skeleton = auto.from_config(AutoConfig.from_pretrained(path, **gguf))
    except Exception:  # only a pre-check: loading the model reports what is wrong
        return
    try:
        inject(skeleton, cfg.xgblora.target_modules)
    except ValueError as e:
        raise _target_error(cfg, e) from e


def prepare_method(cfg: FinetuneConfig, model: nn.Module, fresh: list[str]):
    """Set up the trainable parameters: ``(model, booster or None, param groups)``."""
    head_params = [p for name in fresh for p in model.get_submodule(name).parameters()]
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        head_ids = {id(p) for p in head_params}
        body = [p for p in model.parameters() if id(p) not in head_ids]
        return model, None, [{"params": body, "lr": cfg.lr}]
    if cfg.method == "lora":
        peft = _import_peft()
        lora = peft.LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.xgblora.alpha * cfg.lora_rank,  # same scaling s as the boosters
            target_modules=cfg.xgblora.target_modules,
            lora_dropout=cfg.xgblora.dropout,
            modules_to_save=fresh or None,
        )
        try:
            model = peft.get_peft_model(model, lora)
        except ValueError as e:  # peft's NoMatchingPeftModuleError (no target matched) is one
            raise _target_error(cfg, e) from e
        trainable = [p for p in model.parameters() if p.requires_grad]
        head_ids = {id(p) for n, p in model.named_parameters() if "modules_to_save" in n}
        return (
            model,
            None,
            [
                {
                    "params": [p for p in trainable if id(p) not in head_ids],
                    "lr": cfg.lr,
                    "weight_decay": cfg.xgblora.weight_decay,
                },
                {"params": [p for p in trainable if id(p) in head_ids], "lr": cfg.head_lr},
            ],
        )
    try:
        booster = Booster(model, cfg.xgblora)
    except ValueError as e:  # no target matched, or options that do not fit this model
        raise _target_error(cfg, e) from e
    for p in head_params:
        p.requires_grad_(True)
    groups = [*booster.param_groups(lr=cfg.lr), {"params": head_params, "lr": cfg.head_lr}]
    return model, booster, groups


# ---------------------------------------------------------------- evaluate
def compute_context(cfg: FinetuneConfig) -> contextlib.AbstractContextManager:
    """The context of the run's forward passes: ``torch.autocast`` with ``cfg.autocast``'s
    dtype (CPU), or nothing."""
    dtype = AUTOCAST[cfg.autocast]
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


@torch.no_grad()
def evaluate(model, tokenizer, rows, cfg: FinetuneConfig) -> dict:
    """Seq-cls: accuracy and loss (two classes: also the AUC); causal LM: loss per predicted
    token (the same for any ``cfg.eval_batch_size``) and perplexity."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    margins, labels = [], []
    for i in range(0, len(rows), cfg.eval_batch_size):
        enc = encode(tokenizer, rows[i : i + cfg.eval_batch_size], cfg.max_length, cfg.task)
        with compute_context(cfg):
            out = model(**enc)
        if cfg.task == "seq-cls":
            n = len(enc["labels"])
            correct += int((out.logits.argmax(-1) == enc["labels"]).sum())
            if out.logits.shape[-1] == 2:
                margins.append((out.logits[:, 1] - out.logits[:, 0]).float())
                labels.append(enc["labels"])
        else:  # out.loss is the mean over the batch's predicted tokens (position t predicts t+1)
            n = int((enc["labels"][:, 1:] != -100).sum())
        total_loss += float(out.loss) * n
        count += n
    model.train(was_training)
    result = {"loss": total_loss / count}
    if cfg.task == "seq-cls":
        result["accuracy"] = correct / count
        if margins:
            result["auc"] = binary_auc(torch.cat(margins), torch.cat(labels))
    else:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative (ties count half), from average ranks. ``scores [N]`` float, ``labels [N]`` 0/1.
    NaN when one class is missing. Threshold-free, unlike accuracy."""
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based, ties share their mean rank
    positive = labels.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return (float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ---------------------------------------------------------------- resume
# Options a resumed run may change: they do not alter the training trajectory.
RESUME_FREE = frozenset(
    {"output", "eval_every", "eval_batch_size", "save_every", "resume", "stop_after"}
    | {"save_model", "export_lora", "measure_weight_change"}
)
# The booster options that a run of each method uses (xgblora: all of them).
LORA_OPTIONS = ("target_modules", "alpha", "dropout", "weight_decay")


def resume_options(cfg: FinetuneConfig) -> dict[str, Any]:
    """The options a checkpoint was saved with that a resumed run must repeat (as JSON)."""
    options = {}
    for field in dataclasses.fields(FinetuneConfig):
        value = getattr(cfg, field.name)
        if field.name in RESUME_FREE or field.name == "xgblora":
            continue
        if field.name == "test_size" and cfg.eval_data is not None:
            continue  # not used
        if field.name in ("model", "data", "eval_data") and value is not None:
            value = str(Path(value).resolve())
        options[field.name] = value
    booster = cfg.xgblora.to_dict()
    del booster["total_steps"]  # = steps (the CLI's --steps sets both)
    if cfg.method == "lora":
        booster = {k: booster[k] for k in LORA_OPTIONS}
    if cfg.method != "full":
        options |= {f"xgblora.{k}": v for k, v in booster.items()}
    return json.loads(json.dumps(options))


def _flag(option: str) -> str:
    return "--" + option.rpartition(".")[2].replace("_", "-")


def check_resume(cfg: FinetuneConfig, ckpt_dir: Path) -> None:
    """With ``resume``: ``UsageError`` naming each option whose value differs from the one the
    latest checkpoint in ``ckpt_dir`` was saved with (nothing to resume from: nothing to check).
    """
    if not (cfg.resume and (ckpt_dir / "latest").exists()):
        return
    try:
        extra = json.loads((resolve_checkpoint(ckpt_dir) / "extra.json").read_text())
    except (CheckpointError, OSError, ValueError) as e:
        raise UsageError(f"--resume: {e}; remove {ckpt_dir} or drop --resume to start over") from e
    saved = extra.get("options")
    if saved is None:  # an older checkpoint: load_checkpoint still checks the boosters' config
        return
    given = resume_options(cfg)
    differing: dict[str, str] = {}
    for key in sorted(set(saved) | set(given), key=lambda k: (k.startswith("xgblora."), k)):
        old, new = saved.get(key), given.get(key)
        if (type(old), old) != (type(new), new) and _flag(key) not in differing:
            differing[_flag(key)] = f"{_flag(key)} saved {old!r}, given {new!r}"
    if differing:
        raise UsageError(
            f"--resume: the checkpoint in {ckpt_dir} was saved with other options ("
            + "; ".join(differing.values())
            + "); repeat the saved values, or drop --resume to start over"
        )


# ---------------------------------------------------------------- run
def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: FinetuneConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_ratio * steps``, then ``cfg.lr_schedule`` to the end.

    Every param group follows it (a booster's re-warm-up scales whatever lr it finds).
    """
    from transformers import get_scheduler

    return get_scheduler(
        LR_SCHEDULES[cfg.lr_schedule],
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * cfg.steps),
        num_training_steps=cfg.steps,
    )


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune, evaluate before and after, save the merged model, history and plot.

    Returns a summary dict (also written to ``output/summary.json``).
    """
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    # What a user can get wrong is checked before anything heavy runs (UsageError).
    model_folder(cfg)
    if cfg.method == "lora":
        _import_peft()
    check_resume(cfg, ckpt_dir)
    train_rows, test_rows = load_rows(cfg)
    check_target_modules(cfg)
    out.mkdir(parents=True, exist_ok=True)
    num_labels = count_labels(train_rows + test_rows) if cfg.task == "seq-cls" else 0
    model, tokenizer, fresh = load_model(cfg, num_labels)
    model, booster, groups = prepare_method(cfg, model, fresh)
    trainable_per_step = sum(p.numel() for g in groups for p in g["params"])
    head_params = 0
    if booster is not None:  # only the active boosters (and the head) train at a time
        head_params = sum(p.numel() for g in groups[1:] for p in g["params"])
        active = sum(
            booster.layers[n].in_features + booster.layers[n].out_features for n in booster.active
        )
        trainable_per_step = active + head_params
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    if booster is not None:
        booster.attach(optimizer)
    scheduler = make_scheduler(optimizer, cfg)
    batches = batch_order(len(train_rows), cfg.batch_size, cfg.steps, cfg.seed)
    memory = PhasePeaks()  # the process so far: "loading"
    eval_seconds = 0.0

    def timed_evaluation() -> dict:
        nonlocal eval_seconds
        start = time.perf_counter()
        with memory.phase("evaluation"):
            result = evaluate(model, tokenizer, test_rows, cfg)
        eval_seconds += time.perf_counter() - start
        return result

    before = timed_evaluation()
    evals = [{"step": 0, **before}]
    start_step = 0
    if cfg.resume and (ckpt_dir / "latest").exists():
        try:
            extra = load_checkpoint(ckpt_dir, model, booster, optimizer, scheduler)
        except CheckpointError as e:
            raise UsageError(
                f"--resume: {' '.join(str(e).split())}; remove {ckpt_dir} or drop --resume to "
                "start over"
            ) from e
        start_step, evals = extra["step"], extra["evals"]
    model.train()
    losses: list[float] = []
    memory.enter("training")
    t0, evaluating_before = time.perf_counter(), eval_seconds  # steps' time: evaluations apart
    last = min(cfg.steps, cfg.stop_after or cfg.steps)
    bar = tqdm(range(start_step, last), desc=f"fine-tune ({cfg.method})", unit="step")
    for step in bar:
        enc = encode(tokenizer, [train_rows[i] for i in batches[step]], cfg.max_length, cfg.task)
        with compute_context(cfg):
            loss = model(**enc).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if booster is not None:
            booster.step(losses[-1])
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evals.append({"step": step + 1, **timed_evaluation()})
            bar.set_postfix({k: f"{v:.3f}" for k, v in evals[-1].items() if k != "step"})
        stopping = step + 1 == last < cfg.steps
        if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_checkpoint(
                ckpt_dir,
                model,
                booster,
                optimizer,
                scheduler,
                extra={"step": step + 1, "evals": evals, "options": resume_options(cfg)}
                # what `xgblora-fast export-lora` needs besides the records (base, head)
                | ({CHECKPOINT_METADATA: adapter_metadata(model)} if booster else {}),
                step=step + 1,
            )
    memory.enter(None)
    if last < cfg.steps:  # stopped early: the checkpoint carries the run on (--resume)
        return {"method": cfg.method, "stopped_at": last, "train_loss": losses}
    seconds = time.perf_counter() - t0 - (eval_seconds - evaluating_before)
    if booster is not None:
        booster.finish()
    after = timed_evaluation()
    evals.append({"step": cfg.steps, **after})
    summary = {
        "method": cfg.method,
        "task": cfg.task,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "before": before,
        "after": after,
        "seconds_per_step": seconds / max(1, cfg.steps - start_step),
        "eval_seconds": eval_seconds,  # before, during and after the steps
        "phase_peak_rss_mib": memory.peaks,  # loading, evaluation, training (Linux)
        "trainable_params_per_step": trainable_per_step,
        "cumulative_trainable_params": (
            booster.history[-1]["cumulative_trainable_params"] + head_params
            if booster and booster.history
            else trainable_per_step
        ),
        "evals": evals,
        "train_loss": losses,
    }
    if booster is not None:
        booster.save_history(str(out / "history.json"))
    if cfg.export_lora:  # before plain_model, which ejects the boosted layers
        export_lora(booster, cfg.export_lora)
    model = plain_model(model, booster, cfg)
    if booster is not None:
        summary["successive_cosine"] = successive_cosine(booster)
    change = {}
    if cfg.measure_weight_change:
        change = weight_change(model, cfg)
    if change:
        summary["weight_change"] = {"mean": sum(change.values()) / len(change), "layers": change}
        if booster is not None:  # the length of the path the rounds took: net <= path
            path = {n: 0.0 for n in change}
            for record in booster.history:
                for name, relative in record["relative_update"].items():
                    path[name] += relative
            summary["weight_change"]["path_mean"] = sum(path.values()) / len(path)
            summary["weight_change"]["path_layers"] = path
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_run(summary, booster, out / "training.png")
    if cfg.save_model:  # the original architecture, keys and dtype (plus the tokenizer)
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    return summary


def plain_model(model: nn.Module, booster: Booster | None, cfg: FinetuneConfig) -> nn.Module:
    """The fine-tuned model with the base architecture: boosters ejected, LoRA merged."""
    if booster is not None:
        return eject(model)
    if cfg.method == "lora":
        return model.merge_and_unload()
    return model


@torch.no_grad()
@contextlib.contextmanager
def base_weights(cfg: FinetuneConfig) -> Iterator[dict[str, Callable[[], torch.Tensor]]]:
    """``{key: read that tensor of the base checkpoint}``: one tensor at a time from the model
    folder's ``*.safetensors``, or from a dequantised load of ``cfg.gguf_file``."""
    folder = cfg.model or data_mod.default_model_path()
    if cfg.gguf_file:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=cfg.gguf_file)
        yield {key: (lambda t=t: t) for key, t in base.state_dict().items()}
        return
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        files = {}  # key -> its open file, each file opened once
        for path in sorted(Path(folder).glob("*.safetensors")):
            f = stack.enter_context(safe_open(path, "pt"))
            files.update(dict.fromkeys(f.keys(), f))
        yield {key: (lambda f=f, key=key: f.get_tensor(key)) for key, f in files.items()}


def weight_change(model: nn.Module, cfg: FinetuneConfig) -> dict[str, float]:
    """``|W - W0|_F / |W0|_F`` of every ``nn.Linear`` weight, ``W0`` from the base checkpoint.

    How far a fine-tune moved each layer (XGBLoRA and LoRA compared at equal steps). ``model``
    must have the base architecture (``plain_model``); its module names may carry a prefix the
    checkpoint's keys lack (``bert.`` of a classifier around a bare encoder). ``W0`` is read one
    tensor at a time (``base_weights``). Layers the checkpoint lacks, holds with another shape
    (a fresh head) or as zeros are left out; no base weights found: ``{}``.
    """
    change = {}
    with base_weights(cfg) as files:
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            parts = f"{name}.weight".split(".")
            suffixes = (".".join(parts[i:]) for i in range(len(parts)))
            key = next((k for k in suffixes if k in files), None)
            if key is None:
                continue
            w0 = files[key]().double()
            norm = float(w0.norm())
            if w0.shape == module.weight.shape and norm > 0:
                # On the CPU, where W0 is: the model may sit on a GPU.
                w = module.weight.detach().to("cpu", torch.float64)
                change[name] = float((w - w0).norm()) / norm
    return change


COSINE_LAGS = (1, 2, 3, 4)


def successive_cosine(booster: Booster) -> dict[str, Any]:
    """How each layer's merged pieces relate to the previous ones, averaged over every pair.

    ``piece``: the mean cosine between successive pieces ``P_t``, ``P_{t-1}`` of a layer (near
    0: new directions each round; negative: rounds undoing each other); ``a_abs``, ``b_abs``:
    the mean ``|cos|`` of their input and output vectors (``MergeRecord.successive_cosines``);
    ``piece_by_lag``: ``{lag: mean cosine of P_t and P_{t-lag}}`` for ``COSINE_LAGS`` (a
    zig-zag shows as about 0 at lag 1 and positive at lag 2), lags with no pair left out.
    Empty when no layer was merged twice.
    """
    by_lag: dict[str, float] = {}
    successive: dict[str, torch.Tensor] = {}
    for lag in COSINE_LAGS:
        cosines = [
            r.successive_cosines(lag) for r in booster.records.values() if len(r.rounds) > lag
        ]
        if not cosines:  # the lags grow: no layer has pairs further apart either
            break
        joined = {key: torch.cat([c[key] for c in cosines]) for key in ("a", "b", "piece")}
        if lag == 1:  # the successive pieces themselves
            successive = joined
        by_lag[str(lag)] = float(joined["piece"].mean())
    if not successive:
        return {}
    return {
        "piece": by_lag["1"],
        "a_abs": float(successive["a"].abs().mean()),
        "b_abs": float(successive["b"].abs().mean()),
        "pairs": len(successive["piece"]),
        "piece_by_lag": by_lag,
    }


def plot_run(summary: dict, booster: Booster | None, path: Path) -> None:
    """Training loss (per round for XGBLoRA, smoothed per step otherwise) and the eval metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    if booster is not None and booster.history:
        ends = [h["steps"][1] for h in booster.history if h["loss"] is not None]
        ax_loss.plot(ends, [h["loss"] for h in booster.history if h["loss"] is not None], ".-")
        ax_loss.set_xlabel("step (end of round)")
        ax_loss.set_title("mean training loss per boosting round")
    else:
        losses = summary["train_loss"]
        window = max(1, len(losses) // 30)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1])
            / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax_loss.plot(range(1, len(losses) + 1), smooth)
        ax_loss.set_xlabel("step")
        ax_loss.set_title("training loss (moving average)")
    metric = "accuracy" if summary["task"] == "seq-cls" else "perplexity"
    ax_eval.plot([e["step"] for e in summary["evals"]], [e[metric] for e in summary["evals"]], "o-")
    ax_eval.set_xlabel("step")
    ax_eval.set_title(f"test {metric}")
    fig.suptitle(
        f"{summary['method']}: {metric} {summary['before'][metric]:.3f} -> "
        f"{summary['after'][metric]:.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
