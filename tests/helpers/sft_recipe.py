"""The TRL ``SFTTrainer`` recipe on a tiny Llama: helpers for test_trl.py, and a script.

As a script (tests/ on PYTHONPATH) it is what test_trl.py starts with ``accelerate launch`` on 2
CPU processes (gloo):
``python -m accelerate.commands.launch --multi_gpu --num_processes 2 sft_recipe.py OUT``.
Each rank writes ``OUT/rank{r}.pt``: its weights checksum, its round losses and the history.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers.offline_models import LLAMA_VOCAB, tiny_llama

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: 4 special tokens and ``w0 .. w39`` (fits the Llama)."""
    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    assert len(vocab) <= LLAMA_VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def text_dataset(n: int = 64) -> Dataset:
    """``n`` rows of ``text``: arithmetic word sequences of 6-10 words (a learnable pattern)."""
    g = torch.Generator().manual_seed(0)
    texts = []
    for i in range(n):
        start = int(torch.randint(0, len(WORDS), (1,), generator=g))
        texts.append(" ".join(WORDS[(start + 3 * j) % len(WORDS)] for j in range(6 + i % 5)))
    return Dataset.from_dict({"text": texts})


def sft_config(output_dir: str | Path, max_steps: int, **overrides):
    """TRL's defaults (bf16 autocast, gradient checkpointing, ...) on CPU, sized for tests."""
    from trl import SFTConfig

    kw = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        use_cpu=True,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_length=32,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return SFTConfig(**(kw | overrides))


def main(out: Path) -> None:
    """The documented recipe (docs/trainers.md), run under ``accelerate launch``."""
    from trl import SFTTrainer

    import xgblora_fast as xf
    from xgblora_fast.boosting.distributed import verify_replicas, weights_checksum
    from xgblora_fast.integrations.hf import add_xgblora

    model = tiny_llama()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(out / "run", max_steps=6),
        train_dataset=text_dataset(),
        processing_class=tiny_tokenizer(),
    )
    config = xf.XGBLoRAConfig(kappa=2, kappa_growth=1.0, booster_init="gradient")
    booster = add_xgblora(trainer, config)
    trainer.train()
    # Bit-identical replicas (this raises on every rank if one diverged), and the checksums.
    verify_replicas(booster)
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "world": trainer.accelerator.num_processes,
            "checksum": weights_checksum(booster),
            "losses": [h["loss"] for h in booster.history],
            "steps": [h["steps"] for h in booster.history],
            "sigmas": [h["gradient_sigma"] for h in booster.history],
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
