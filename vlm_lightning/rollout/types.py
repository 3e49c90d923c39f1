"""``Rollout``: the one result type of a GRPO rollout, shared by the fast engine, the HF path and the module.

Rows are in tile order: N = B * G rows, row ``g * B + b`` is sample g of prompt b (see ``batch.tile_batch``).
The completions are masked once, where they are sampled (``masks.finish_completions``); nothing downstream
re-masks them. Left out: rewards, advantages and the trainer's log-probs, which the GRPO module computes from this.

Example:
    >>> out = fast_generate(model, inputs, num_generations=8, max_new_tokens=256, eos_token_ids=[151645])
    >>> out.completion_ids.shape, out.completion_mask.shape, out.truncated.shape   # (B*8, C), (B*8, C), (B*8,)
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Rollout(NamedTuple):
    """Sampled completions after masking; N = B * G rows in tile order (row g * B + b: sample g of prompt b)."""

    prompt_ids: torch.Tensor  # (N, P) int64, left padded as given
    prompt_mask: torch.Tensor  # (N, P) int64
    completion_ids: torch.Tensor  # (N, C) int64, C <= max_new_tokens; pad_token_id after each row's end
    completion_mask: torch.Tensor  # (N, C) int64, 1 up to and incl. the first EOS / the end of a stop string
    truncated: torch.Tensor  # (N,) bool, no EOS and no stop string within max_new_tokens (never when rejected)
    rejected: torch.Tensor  # (N,) bool, held a forbidden (vision placeholder) id: ids all pad, mask all 0
    texts: list[str] | None  # (N,) decoded kept tokens, special tokens skipped; None without a tokenizer
    logits: torch.Tensor | None  # (N, C, V) float32 raw next-token logits (``return_logits=True``), else None
    backend: str  # "fast", "fast+cuda_graph" or "hf_generate"
    stats: dict  # prefill_s, decode_s, steps, new_tokens, rows, prompt_len, merged_layers
    # (N, C) float32 the engine's own log-probs of the sampled tokens, log_softmax(raw logits / temperature) at
    # the token (before top-k / top-p, as the trainer's ``completion_logprobs``); 0 outside the mask. Only the
    # fast engine returns them (its numerics differ from the trainer's: merged LoRA, own attention); else None.
    sampling_logprobs: torch.Tensor | None = None
