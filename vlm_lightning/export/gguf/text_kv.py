"""GGUF metadata every llama.cpp text architecture here shares (``arch.py`` and ``qwen3vl.py`` both write it)."""
from __future__ import annotations

import gguf


def text_common(w: gguf.GGUFWriter, t: dict) -> None:
    """Block count, context, widths, heads and RMSNorm eps of the text config ``t``."""
    w.add_block_count(t["num_hidden_layers"])
    w.add_context_length(t.get("max_position_embeddings", 4096))
    w.add_embedding_length(t["hidden_size"])
    w.add_feed_forward_length(t["intermediate_size"])
    w.add_head_count(t["num_attention_heads"])
    w.add_head_count_kv(t.get("num_key_value_heads", t["num_attention_heads"]))
    w.add_layer_norm_rms_eps(t.get("rms_norm_eps", 1e-6))
