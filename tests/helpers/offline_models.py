"""Tiny hub-like model folders and a toy sentiment table, built offline (shared by tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

WORDS = [f"w{i}" for i in range(20)]
LLAMA_VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, grouped-query attention 4/2 heads), in eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def build_tiny_models(root: Path) -> Path:
    """A tokenizer plus a tiny BERT classifier body (``root/bert``) and a tiny GPT-2
    (``root/gpt2``), saved like hub models."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", *WORDS]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer("w3 good")["input_ids"] == [2, words.index("w3"), 5, 3]
    torch.manual_seed(0)
    bert = root / "bert"
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    # Save only the body, so the classification head is fresh when loaded (as from the hub).
    BertForSequenceClassification(cfg).bert.save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    gpt = root / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=32)
    ).save_pretrained(gpt)
    tokenizer.save_pretrained(gpt)
    return root


def write_sentiment_csv(path: Path) -> Path:
    """240 rows ``text,label``: random filler words around "good" (pos) or "bad" (neg)."""
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(240):
        label = i % 2
        noise = " ".join(WORDS[int(j)] for j in torch.randint(0, 20, (4,), generator=g))
        word = "good" if label else "bad"
        lines.append(f"{noise} {word} {noise},{'pos' if label else 'neg'}")
    path.write_text("\n".join(lines))
    return path
