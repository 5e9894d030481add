"""A tiny Llama written as a GGUF checkpoint with the ``gguf`` package (no download).

The tensors are named and laid out as llama.cpp's converter writes them (q/k rows permuted for
its rotary layout), fp32, so that transformers' GGUF loader gives back the very weights.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from transformers import LlamaForCausalLM

# Hugging Face Llama module -> GGUF tensor name ({} is the block index).
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    halves = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """Write ``model`` (an untied Llama) to ``path`` as GGUF; returns ``path``."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, tensor in model.state_dict().items():
        w = tensor.detach().float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, block, module = key.split(".", 3)
            module, kind = module.rsplit(".", 1)
            name = f"blk.{block}.{GGUF_NAMES[module]}.{kind}"
            if module == "self_attn.q_proj":
                w = rotary_permute(w, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = rotary_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
