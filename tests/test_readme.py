"""README.md's Python snippets run as written, on a tiny offline model, on CPU.

Every ```python block of README.md is a test case (a new block is picked up by itself). Each runs
in a fresh namespace and an empty working directory, with two substitutions only: the text
``path/to/model`` becomes a tiny saved Llama folder (with a tokenizer), and the name ``loader``
is a short list of causal-LM batches. What a snippet takes from its context (say, a trained
``booster``) comes from a ``SETUP`` entry, keyed by a substring of the snippet; a ``CHECKS``
entry, keyed the same way, asserts its effect. Every snippet must also have an effect: write a
file or change a model's weights.

A block fenced ```python no-test is not run. Such exceptions stay rare (a snippet that needs a
GPU or the network) and each needs its reason in ``NO_TEST``, keyed by a substring of the block.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.offline_models import LLAMA_VOCAB, tiny_llama
from helpers.sft_recipe import text_dataset, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import xgblora_fast as xf
from xgblora_fast.cli.finetune import DEFAULT_LR, FinetuneConfig

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_PATH = "path/to/model"
FENCE = re.compile(r"^```python\b(?P<info>[^\n]*)\n(?P<code>.*?)^```\s*$", re.M | re.S)

# substring of a ```python no-test block -> why it cannot run here (none so far).
NO_TEST: dict[str, str] = {}


def readme_snippets() -> list[tuple[int, str, str]]:
    """``(line, info words after "python", code)`` of every ```python block, in order."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m["info"].strip(), m["code"])
        for m in FENCE.finditer(text)
    ]


SNIPPETS = readme_snippets()


# ---------------------------------------------------------------- the substitutions
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """``path/to/model``: a tiny Llama (``q_proj``/``v_proj``, vocab 64) saved like a hub model,
    with the word-level tokenizer of ``sft_recipe`` (44 tokens, with pad and eos)."""
    folder = tmp_path_factory.mktemp("readme_models") / "llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_loader(n: int = 30, batch: int = 4, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """``loader``: ``n`` causal-LM batches (labels = inputs), seeded."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, LLAMA_VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def probe_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(12).reshape(1, 12) % LLAMA_VOCAB}


# ---------------------------------------------------------------- per-snippet set-up
def setup_trained_booster(ns: dict, model_dir: Path) -> None:
    """A booster after 5 merged rounds (kappa 2, 10 steps, fp32), ``base_model`` (a fresh copy
    of the original), ``peft`` and ``xf``; records the model's logits for the check."""
    import peft

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = xf.XGBLoRAConfig(
        target_modules=["q_proj", "v_proj"], alpha=2.0, kappa=2, kappa_growth=1.0
    )
    booster = xf.Booster(model, config)
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=5e-3)
    booster.attach(optimizer)
    for batch in ns["loader"][:10]:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
    assert len(booster.history) == 5
    with torch.no_grad():
        ns["_logits"] = model.eval()(**probe_batch()).logits
    ns["_weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_model = AutoModelForCausalLM.from_pretrained(model_dir)
    ns.update(xf=xf, peft=peft, booster=booster, base_model=base_model)


def setup_sft_dataset(ns: dict, model_dir: Path) -> None:
    """``dataset``: 16 rows of ``text`` (6 steps of batch 8 over TRL's default 3 epochs)."""
    ns["dataset"] = text_dataset(16)


SETUP: dict[str, Callable[[dict, Path], None]] = {
    "xf.export_lora(booster": setup_trained_booster,
    "SFTTrainer(": setup_sft_dataset,
}


# ---------------------------------------------------------------- per-snippet checks
def check_quick_start(ns: dict, model_dir: Path, cwd: Path) -> None:
    # The benchmarked hyperparameters (bench/accuracy.py, the CLI's defaults).
    assert ns["optimizer"].defaults["lr"] == DEFAULT_LR["xgblora"]
    assert ns["booster"].config.alpha == FinetuneConfig().xgblora.alpha
    assert ns["booster"].global_step == len(ns["loader"])
    assert len(ns["booster"].history) >= 2  # rounds of 10 and 15 steps merged
    saved = AutoModelForCausalLM.from_pretrained(cwd / "out", dtype=torch.bfloat16).state_dict()
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    assert saved.keys() == original.keys()  # plain nn.Linear, original keys
    targets = [k for k in saved if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(targets) == 4
    for key, value in saved.items():
        assert torch.equal(value, original[key]) != (key in targets), key


def check_export(ns: dict, model_dir: Path, cwd: Path) -> None:
    assert (cwd / "adapter" / "adapter_config.json").is_file()
    assert (cwd / "adapter-r8" / "xgblora_export.json").is_file()
    peft_model = ns["model"]
    assert isinstance(peft_model, ns["peft"].PeftModel)
    with torch.no_grad():  # base + adapter = the boosted model as it computed before unmerge_
        logits = peft_model.eval()(**probe_batch()).logits
    torch.testing.assert_close(logits, ns["_logits"], atol=1e-5, rtol=1e-5)
    after = dict(ns["booster"].model.named_parameters())
    changed = [n for n, w in ns["_weights"].items() if not torch.equal(w, after[n])]
    assert changed and all(n.endswith("weight") for n in changed)  # round 3 subtracted


def check_sft(ns: dict, model_dir: Path, cwd: Path) -> None:
    args, booster = ns["trainer"].args, ns["booster"]
    assert args.bf16 and args.gradient_checkpointing  # TRL's defaults, untouched
    assert booster.optimizer is ns["trainer"].optimizer  # the callback attached it
    assert booster.global_step == ns["trainer"].state.global_step > 0
    assert booster.history and all(h["loss"] is not None for h in booster.history[:-1])
    saved = AutoModelForCausalLM.from_pretrained(cwd / "out").state_dict()
    original = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert saved.keys() == original.keys()
    changed = {k for k in saved if not torch.equal(saved[k], original[k])}
    # "all-linear": every projection moved; embeddings, norms and lm_head did not.
    assert changed == {k for k in saved if k.endswith("_proj.weight")}


CHECKS: dict[str, Callable[[dict, Path, Path], None]] = {
    "SFTTrainer(": check_sft,
    "booster.finish(); xf.eject(model).save_pretrained": check_quick_start,
    "xf.export_lora(booster": check_export,
}


# ---------------------------------------------------------------- the tests
def _hooks(code: str, table: dict) -> list:
    return [hook for key, hook in table.items() if key in code]


def _changed_modules(ns: dict, original: dict[str, torch.Tensor]) -> list[str]:
    """Names in ``ns`` of modules holding a weight of the original model, changed."""
    changed = []
    for name, value in ns.items():
        if isinstance(value, nn.Module):
            state = value.state_dict()
            for key, ref in original.items():
                w = state.get(key)
                if w is not None and w.shape == ref.shape and not torch.equal(w.float(), ref):
                    changed.append(name)
                    break
    return changed


def test_readme_has_snippets():
    codes = [code for _, _, code in SNIPPETS]
    assert any("xf.Booster(" in c and "booster.step(" in c for c in codes)


def test_no_test_blocks_are_explained():
    for line, info, code in SNIPPETS:
        if "no-test" in info.split():
            assert _hooks(code, NO_TEST), f"README.md:{line}: no reason in NO_TEST for no-test"


@pytest.mark.parametrize(
    ("line", "info", "code"), SNIPPETS, ids=[f"README.md:{line}" for line, _, _ in SNIPPETS]
)
def test_readme_snippet_runs(line, info, code, model_dir, tmp_path, monkeypatch):
    if "no-test" in info.split():
        pytest.skip(f"no-test: {'; '.join(_hooks(code, NO_TEST))}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ns: dict = {"__name__": "__readme__", "loader": make_loader()}
    for setup in _hooks(code, SETUP):
        setup(ns, model_dir)
    original = tiny_llama().state_dict()
    torch.manual_seed(0)
    exec(compile(code.replace(MODEL_PATH, str(model_dir)), f"README.md:{line}", "exec"), ns)

    written = [p for p in cwd.rglob("*") if p.is_file()]
    assert written or _changed_modules(ns, original), "the snippet had no effect"
    for check in _hooks(code, CHECKS):
        check(ns, model_dir, cwd)
