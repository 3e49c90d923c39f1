"""The one completion-masking implementation: where each sampled completion ends, and what is kept.

A completion ends at its first EOS (kept in the mask: the model must learn to stop) or at the last token of
its first stop string, whichever comes first; tokens after the end become ``pad_token_id``. A completion with
neither is truncated. One that contains a forbidden id (a vision placeholder) is rejected: ids all pad, mask
all zero. Both rollout paths (``engine.fast_generate`` and ``hf.hf_generate``) sample raw tokens and call
``finish_completions`` once. Left out: DAPO's overlong filter (``losses.grpo.mask_truncated_completions``).

Example:
    >>> ids, mask, truncated = completion_masks(tokens, eos_token_ids=[151645], pad_token_id=151643,
    ...                                         stop_strings=["</answer>"], tokenizer=tok)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: int | Sequence[int] | torch.Tensor,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of each completion up to and including its first EOS, and whether it was truncated.

    Args:
        completion_ids: (B, T) sampled tokens (anything after the first EOS is padding/garbage).
        eos_token_ids: one id or several (e.g. ``<|im_end|>`` and ``<|endoftext|>``); all count as EOS.

    Returns:
        mask (B, T) int64, 1 on tokens up to and including the first EOS; is_truncated (B,) bool, True for
        rows with no EOS in the T tokens (they hit ``max_new_tokens``).

    Example:
        >>> completion_mask_from_ids(torch.tensor([[5, 2, 0], [5, 6, 7]]), eos_token_ids=2)
        (tensor([[1, 1, 0], [1, 1, 1]]), tensor([False,  True]))
    """
    eos = torch.as_tensor(eos_token_ids, dtype=completion_ids.dtype, device=completion_ids.device).flatten()
    is_eos = torch.isin(completion_ids, eos)  # (B, T)
    b, t = completion_ids.shape
    has_eos = is_eos.any(dim=1)  # (B,)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full((b,), t, device=completion_ids.device))
    pos = torch.arange(t, device=completion_ids.device).unsqueeze(0)  # (1, T)
    mask = (pos <= first.unsqueeze(1)).long()
    return mask, ~has_eos


def stop_string_end(tokenizer: Any, ids: list[int], stop_strings: Sequence[str]) -> int | None:
    """Smallest k such that decode(ids[:k]) contains a stop string (binary search; containment is monotone)."""
    def hit(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not ids or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def rows_with_stop_string(tokens: torch.Tensor, finished: torch.Tensor, tokenizer: Any,
                          stop_strings: Sequence[str]) -> torch.Tensor:
    """(N,) bool: unfinished rows whose text so far contains a stop string (host-side decode; the decode loop
    asks this every few steps to stop early, the exact end is ``completion_masks``'s)."""
    if tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    hit = torch.zeros_like(finished)
    open_rows = (~finished).nonzero().flatten().tolist()
    texts = tokenizer.batch_decode(tokens[open_rows].tolist(), skip_special_tokens=False) if open_rows else []
    for i, text in zip(open_rows, texts):
        if any(s in text for s in stop_strings):
            hit[i] = True
    return hit


def completion_masks(tokens: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: int,
                     stop_strings: Sequence[str] | None = None, tokenizer: Any = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row at its first EOS (kept) or the end of its first stop string, whichever comes first.

    Args:
        tokens: (N, T) sampled tokens.
    Returns:
        ids (N, C) with pad after each end, mask (N, C) int64, truncated (N,) bool; C = the longest kept row
        (T when a row is truncated), which is the length ``generate`` returns.
    """
    n = tokens.shape[0]
    mask, truncated = completion_mask_from_ids(tokens, list(eos_token_ids))  # (N, T), (N,)
    lengths = mask.sum(1)  # (N,)
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        lens = lengths.tolist()
        for i in range(n):
            end = stop_string_end(tokenizer, tokens[i, : lens[i]].tolist(), stop_strings)
            if end is not None and end <= lens[i]:
                lengths[i] = end
                truncated[i] = False
    c = int(lengths.max()) if n else 0
    pos = torch.arange(c, device=tokens.device)[None]
    mask = (pos < lengths[:, None]).long()
    ids = tokens[:, :c].masked_fill(mask == 0, pad_token_id)
    return ids, mask, truncated


def finish_completions(tokens: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: int,
                       stop_strings: Sequence[str] | None = None, tokenizer: Any = None,
                       forbidden_ids: Sequence[int] = ()
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str] | None]:
    """``completion_masks``, then rejection of rows holding a forbidden id, then the kept texts.

    A completion must never contain an image/video placeholder: re-scoring it would feed the vision merger a
    placeholder without features (R1-V#91). Such a row is rejected (ids pad, mask 0, not truncated).

    Args:
        tokens: (N, T) sampled tokens.
        forbidden_ids: ids that reject a row when they occur inside its kept part.
    Returns:
        ids (N, C), mask (N, C) int64, truncated (N,) bool, rejected (N,) bool, and the (N,) texts of the kept
        tokens with special tokens skipped (None when no tokenizer is given).
    """
    ids, mask, truncated = completion_masks(tokens, eos_token_ids, pad_token_id, stop_strings, tokenizer)
    lengths = mask.sum(1).tolist()
    forbidden = torch.as_tensor(list(forbidden_ids), dtype=ids.dtype, device=ids.device)
    if len(forbidden):
        rejected = (torch.isin(ids, forbidden) & mask.bool()).any(1)
    else:
        rejected = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    ids = ids.masked_fill(rejected[:, None], pad_token_id)
    mask = mask.masked_fill(rejected[:, None], 0)
    truncated = truncated & ~rejected
    texts = None
    if tokenizer is not None:
        texts = tokenizer.batch_decode([ids[i, :n].tolist() for i, n in enumerate(lengths)], skip_special_tokens=True)
    return ids, mask, truncated, rejected, texts
