"""Prompt batches for a rollout: group expansion by tiling, prompt + completion inputs, the ids that end or
must never appear in a completion.

Group expansion by *tiling*: a collated prompt batch of B rows is repeated G times along dim 0
(``tile_batch``), so generation row ``g * B + b`` is sample ``g`` of prompt ``b``. Tiling keeps every
family's vision inputs consistent without knowing their layout (Qwen's flat ``pixel_values`` with
``image_grid_thw``, Pixtral's per-image ``image_sizes``, LLaVA's per-row tensors): each tile is an exact
copy of a valid batch. A micro-batch of ``k`` whole tiles is then ``tile_batch(prompts, k)`` plus the
matching completion rows, again valid for any family. Which batch entries are model inputs is
``models.hf.model_inputs``'s one key list.

Example:
    >>> tiled = tile_batch(prompt_batch, G)                                 # (G*B, P) + vision, lists tiled
    >>> full = extend_inputs(model_inputs(tiled), completion_ids, completion_mask)   # (G*B, P + C)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

_VISION_CONFIG_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                        "vision_start_token_id", "vision_end_token_id", "boi_token_index", "eoi_token_index",
                        "image_break_token_id", "image_end_token_id")
#: End-of-turn tokens of the chat templates we know; each one the tokenizer has is an EOS of a completion.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "</s>")


def tile_batch(batch: Mapping[str, Any], times: int) -> dict[str, Any]:
    """Repeat a collated batch ``times`` times along dim 0 (tensors concatenated, lists repeated)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v if times == 1 else torch.cat([v] * times, dim=0)
        elif isinstance(v, (list, tuple)):
            out[k] = list(v) * times
        else:
            out[k] = v
    return out


def vision_placeholder_ids(config: Any) -> list[int]:
    """Ids of image/video placeholder and vision-span tokens from a model config (any family).

    A completion must never contain them: re-scoring it would feed the vision merger a placeholder
    without features ("image features and image tokens do not match", R1-V#91).
    """
    ids: set[int] = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in _VISION_CONFIG_ATTRS:
            v = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(v, int) and v >= 0:
                ids.add(v)
    return sorted(ids)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every EOS id: the generation config's (int or list), the tokenizer's eos, and the end-of-turn
    token of the chat template when the tokenizer knows it (e.g. ``<|im_end|>``, ``<end_of_turn>``)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.extend([src] if isinstance(src, int) else list(src))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.append(int(vocab[tok]))
    return sorted(set(int(i) for i in ids))


def extend_inputs(inputs: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt + completion as one forward input: ids and attention mask concatenated, token-type ids
    extended with zeros (completion tokens are text), Llama 3.2 Vision's ``cross_attention_mask`` with the prompt's last
    row; other vision tensors unchanged. (N, P) + (N, C) -> (N, P + C)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], completion_ids.to(inputs["input_ids"])], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask.to(inputs["attention_mask"])], dim=1)
    for k in ("token_type_ids", "mm_token_type_ids"):
        if k in inputs:
            out[k] = torch.cat([inputs[k], torch.zeros_like(completion_ids).to(inputs[k])], dim=1)
    if "cross_attention_mask" in inputs:  # Llama 3.2 Vision, (N, P, images, tiles): as in HF generate, a completion
        xm = inputs["cross_attention_mask"]  # token sees the images the prompt's last token sees
        out["cross_attention_mask"] = torch.cat([xm, xm[:, -1:].expand(-1, completion_ids.shape[1], *xm.shape[2:])], 1)
    return out


def plan_tile_micro_batches(tile_tokens: Sequence[int], max_tokens: int | None = None,
                            max_tiles: int | None = None) -> list[tuple[int, int]]:
    """Group consecutive tiles into micro-batches: [(first tile, end tile), ...] covering every tile once.

    Args:
        tile_tokens: the forward cost of each tile in tokens (B rows x (prompt + kept completion width)).
        max_tokens: a micro-batch holds as many consecutive tiles as fit in this many tokens (at least one,
            so a single tile larger than the budget is a micro-batch of its own). None: no token budget.
        max_tiles: at most this many tiles per micro-batch (``generations_per_micro_batch``). None: no limit.

    Example:
        >>> plan_tile_micro_batches([300, 300, 100, 500], max_tokens=700)
        [(0, 3), (3, 4)]
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch={max_tokens}: must be >= 1")
    plan: list[tuple[int, int]] = []
    start, used = 0, 0
    for t, cost in enumerate(tile_tokens):
        full = (max_tiles is not None and t - start >= max_tiles) or \
            (max_tokens is not None and t > start and used + cost > max_tokens)
        if full:
            plan.append((start, t))
            start, used = t, 0
        used += cost
    if len(tile_tokens):
        plan.append((start, len(tile_tokens)))
    return plan
