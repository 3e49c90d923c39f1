"""What every tiny family builder shares: the text decoder sizes, the builder's result, vocabulary padding, and the
config overrides with the fields that follow from them (head_dim, Qwen's vision width and M-RoPE sections)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

# Text decoder shared by all families (the vision side is per family).
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)


@dataclass
class _Built:
    """What a family builder returns: the model config and the processor (tokenizer inside)."""

    config: PretrainedConfig
    processor: Any
    eos_token_ids: list[int]
    pad_token_id: int
    bos_token_id: int | None


def _padded_vocab(n: int, multiple: int = 64) -> int:
    # The real Qwen / LLaVA / Gemma checkpoints pad the embedding matrix past len(tokenizer); we keep
    # that quirk so code that assumes vocab_size == len(tokenizer) fails here too.
    return int(math.ceil(n / multiple) * multiple)


def _resolve(cfg: dict, overrides: dict) -> dict:
    """Merge `overrides` into `cfg` and re-derive the fields that depend on the sizes, unless overridden.

    So `text_config={"hidden_size": 128}` alone gives a consistent model: head_dim = hidden / heads,
    Qwen's vision output width = text width and its mrope_section re-split over head_dim / 2,
    Gemma's query_pre_attn_scalar = head_dim.
    """
    out = _merge(cfg, overrides)
    text, text_over = out["text_config"], overrides.get("text_config", {})
    vision_over = overrides.get("vision_config", {})
    if "head_dim" in text and "head_dim" not in text_over:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if out["model_type"] in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        width_key = "hidden_size" if out["model_type"] == "qwen2_vl" else "out_hidden_size"
        if width_key not in vision_over:
            out["vision_config"][width_key] = text["hidden_size"]
        if "rope_parameters" not in text_over:
            # real: [16, 24, 24] of 64 rotary pairs (Qwen2-VL / 2.5-VL), [24, 20, 20] of 64 (Qwen3-VL, interleaved)
            half = head_dim // 2
            hw = 5 * half // 16 if out["model_type"] == "qwen3_vl" else 3 * half // 8
            text["rope_parameters"]["mrope_section"] = [half - 2 * hw, hw, hw]
    if out["model_type"] == "gemma3" and "query_pre_attn_scalar" not in text_over:
        text["query_pre_attn_scalar"] = head_dim
    if "layer_types" in text and "layer_types" not in text_over:
        # Gemma 3 interleaves sliding-window and global layers (5:1 in the real models; 1:1 here).
        text["layer_types"] = [
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(text["num_hidden_layers"])
        ]
    return out


def _merge(base: dict, overrides: dict) -> dict:
    """Recursive dict merge: nested dicts (text_config, vision_config) merge key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_QWEN_SPECIALS = [  # the real order (ids 151643..151656 in the real vocabulary)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
