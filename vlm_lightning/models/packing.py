"""Padding-free packing on the model side: the forward kwargs of a packed batch, exact for every family.

A packed batch (``VisionChatCollator(packing=True)``) is one sequence ``(1, T)`` holding several rows back to
back, with ``seq_lens`` (R,) giving each row's length and ``position_ids`` (1, T) restarting at 0 per row. What a
family's forward needs on top of that, so that every row sees exactly what it would see alone in a padded batch:

  * all families: no ``attention_mask``. transformers then reads the row boundaries off the restarting
    ``position_ids`` (``masking_utils.find_packed_sequence_indices``): a block-diagonal causal mask for
    SDPA / eager / flex, ``cu_seqlens`` for flash-attention (from the position ids the decoder layers get).
  * Qwen2-VL / Qwen2.5-VL / Qwen3-VL (M-RoPE): the 3-D rope index is the model's own ``get_rope_index`` run on
    each row (with that row's ``image_grid_thw``), concatenated, with the per-row text positions prepended:
    ``position_ids`` (4, 1, T), the layout whose first row transformers uses for the packed mask.
  * Gemma 3: image tokens attend to each other bidirectionally. transformers' packed path evaluates that
    overlay at per-row positions in its sliding-window mask (it indexes the token types of the *first* row
    for every row), so here both masks are built by ``create_causal_mask`` from global token indices:
    ``(causal OR same image block) AND same row`` (and the sliding window), passed as the mask dict
    Gemma 3's forward accepts.

Nothing here pads or batches; ``data/packing.py`` builds the packed batch. Exactness against the padded
forward (loss and every gradient, per family): ``tests/data/test_packing.py``.

Example:
    >>> inputs = forward_inputs(model, batch)       # padded batch: model_inputs(batch); packed: the above
    >>> hidden = decoder_hidden_states(model, inputs, batch["labels"])
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from .families import get_family_spec
from .hf import NON_MODEL_KEYS, SEQ_LENS, compute_dtype, model_inputs, text_config, unwrap_model

__all__ = ["PACKED_FAMILIES", "SEQ_LENS", "forward_inputs", "is_packed", "packed_inputs", "packed_position_ids"]

#: Families whose packed forward is exact (tested per family); any other family is refused.
PACKED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "pixtral", "gemma3", "mistral3",
                   "mistral3_small")
# vision-grid inputs of the M-RoPE families, by the mm_token_type_ids value of their tokens
_GRIDS = ((1, "image_grid_thw"), (2, "video_grid_thw"))


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether a collated batch is packed (one sequence of several rows) rather than padded."""
    return isinstance(batch.get(SEQ_LENS), torch.Tensor)


def packed_position_ids(seq_lens: torch.Tensor) -> torch.Tensor:
    """(R,) row lengths -> (1, T) positions restarting at 0 for every row."""
    lens = seq_lens.long()
    starts = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)  # (T,) start of each token's row
    return (torch.arange(int(lens.sum()), device=lens.device) - starts)[None]


def forward_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The kwargs of the decoder forward for a collated batch: ``model_inputs(batch)`` for a padded batch,
    ``packed_inputs(model, batch)`` for a packed one."""
    return packed_inputs(model, batch) if is_packed(batch) else model_inputs(batch)


def packed_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The forward kwargs of a packed batch (see the module docstring), for a model of ``PACKED_FAMILIES``.

    Args:
        model: the HF VLM (or its PeftModel). batch: ``input_ids`` (1, T), ``seq_lens`` (R,) summing to T, the
            family's token extras (``mm_token_type_ids`` / ``token_type_ids``, (1, T)) and vision inputs.
    Returns:
        ``model_inputs(batch)`` without ``attention_mask``, with ``position_ids`` (1, T) or (4, 1, T) for
        M-RoPE, and for Gemma 3 ``attention_mask`` = {"full_attention", "sliding_attention"} masks.
    """
    family = get_family_spec(model).name
    if family not in PACKED_FAMILIES:
        raise NotImplementedError(f"packing=True is not supported for the {family!r} family (exact packing is "
                                  f"implemented and tested for {', '.join(PACKED_FAMILIES)}); use packing=False")
    skip = (*NON_MODEL_KEYS, SEQ_LENS, "attention_mask", "position_ids")
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in skip}
    input_ids, seq_lens = inputs["input_ids"], batch[SEQ_LENS].to(inputs["input_ids"].device)
    if input_ids.shape[0] != 1 or int(seq_lens.sum()) != input_ids.shape[1]:
        raise ValueError(f"a packed batch holds one sequence of sum(seq_lens) tokens: input_ids "
                         f"{tuple(input_ids.shape)}, seq_lens summing to {int(seq_lens.sum())}")
    positions = packed_position_ids(seq_lens)  # (1, T)
    inner = unwrap_model(model).model
    if callable(getattr(inner, "get_rope_index", None)):  # M-RoPE: text positions first, then (t, h, w)
        rope = _mrope_position_ids(inner, inputs, seq_lens)  # (3, 1, T)
        inputs["position_ids"] = torch.cat([positions[None], rope], 0)  # (4, 1, T)
    else:
        inputs["position_ids"] = positions
    if family == "gemma3":
        inputs["attention_mask"] = _gemma3_packed_masks(model, inputs, seq_lens)
    return inputs


def _mrope_position_ids(inner: nn.Module, inputs: dict[str, torch.Tensor], seq_lens: torch.Tensor) -> torch.Tensor:
    """(3, 1, T): the model's ``get_rope_index`` run on each row alone (its own images), concatenated."""
    input_ids = inputs["input_ids"]
    types = inputs.get("mm_token_type_ids")
    if types is None:  # the collator always sends them; a hand-built batch may not: images only
        image_id = getattr(getattr(inner, "config", None), "image_token_id", None)
        types = (input_ids == image_id).long()
    consumed = {key: 0 for _, key in _GRIDS}
    out, start = [], 0
    for length in seq_lens.tolist():
        ids, tt = input_ids[:, start:start + length], types[:, start:start + length]  # (1, L)
        kwargs: dict[str, Any] = {}
        for value, key in _GRIDS:
            is_kind = tt[0] == value
            n = int((is_kind & ~F.pad(is_kind, (1, 0))[:-1]).sum())  # spans = media items
            if n:
                grid = inputs[key]
                kwargs[key] = grid[consumed[key]:consumed[key] + n]
                if key == "video_grid_thw" and "second_per_grid_ts" in inputs:  # Qwen2.5-VL videos
                    kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"][consumed[key]:consumed[key] + n]
                consumed[key] += n
        if "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters:  # transformers >= 5.x
            kwargs["mm_token_type_ids"] = tt
        rope, _ = inner.get_rope_index(input_ids=ids, **kwargs)  # (3, 1, L)
        out.append(rope)
        start += length
    return torch.cat(out, -1)


def _gemma3_packed_masks(model: nn.Module, inputs: dict[str, torch.Tensor], seq_lens: torch.Tensor) -> dict:
    """Gemma 3's {"full_attention", "sliding_attention"} masks of a packed sequence, from global token indices:
    (causal OR same image block) AND same row, and for sliding layers AND the sliding window (the composition
    of Gemma 3's own training masks, plus the row boundaries). Only ``create_causal_mask`` with an or- and an
    and-function is asked of transformers (both since 4.53), so the masks follow the attention implementation."""
    device = inputs["input_ids"].device
    token_types = inputs.get("token_type_ids")
    images = (token_types == 1) if token_types is not None else torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    starts = images & ~F.pad(images, (1, 0))[:, :-1]  # (1, T) first token of each image
    blocks = torch.where(images, torch.cumsum(starts.long(), 1) - 1, -1)  # (1, T) image number, -1 for text
    rows = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), seq_lens.long())[None]  # (1, T)
    cfg = text_config(unwrap_model(model).model)
    window = getattr(cfg, "sliding_window", None)

    def same_image(b, h, q, kv):
        return (blocks[b, q] == blocks[b, kv]) & (blocks[b, q] >= 0)

    def same_row(b, h, q, kv):
        return rows[b, q] == rows[b, kv]

    def same_row_in_window(b, h, q, kv):
        return (rows[b, q] == rows[b, kv]) & (kv > q - window)

    common = _mask_kwargs(cfg, rows.shape[1], compute_dtype(model), device, or_mask_function=same_image)
    masks = {"full_attention": create_causal_mask(**common, and_mask_function=same_row)}
    if window is not None:
        masks["sliding_attention"] = create_causal_mask(**common, and_mask_function=same_row_in_window)
    return masks


def _mask_kwargs(config, length: int, dtype: torch.dtype, device: torch.device, **extra) -> dict:
    """``create_causal_mask`` kwargs of a fresh (no cache) sequence of ``length`` tokens, whatever the installed
    transformers calls them (``cache`` / ``past_key_values``, ``inputs_embeds`` / ``input_embeds``,
    ``cache_position`` in older 5.x): it reads only (B, T), the dtype and the device of the embeddings."""
    params = inspect.signature(create_causal_mask).parameters
    kwargs = dict(config=config, attention_mask=None, position_ids=None, **extra)
    embeds = torch.empty((1, length, 1), dtype=dtype, device=device)
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    kwargs.update({name: None for name in ("cache", "past_key_values") if name in params})
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(length, device=device)
    return kwargs
