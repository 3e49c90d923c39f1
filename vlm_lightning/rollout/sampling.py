"""Logit warping and the next-token draw of the fast decode loop, with HF ``generate``'s rules and order.

Suppressed ids, temperature, top-k, top-p (``TopPLogitsWarper``'s rule verbatim), then argmax (temperature 0)
or one ``torch.multinomial`` draw per row, all on device. ``tests/rollout/test_sampling.py`` checks the warped
scores against transformers' own processors. Left out: ``min_p`` and ``repetition_penalty`` (those calls go
to HF ``generate``, see ``engine.fast_generate``).

Example:
    >>> nxt = sample_next(logits, temperature=1.0, top_k=0, top_p=0.9, suppress=None, generator=None)   # (N,)
"""
from __future__ import annotations

import torch


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                suppress: torch.Tensor | None = None) -> torch.Tensor:
    """(N, V) float32 raw logits -> the scores ``generate`` samples from, with HF's processors in HF's order:
    suppressed ids, temperature, top-k, top-p (``TopPLogitsWarper``'s rule verbatim). Filtered entries are -inf.
    Temperature 0 (greedy) applies the suppression only."""
    scores = logits
    if suppress is not None:
        scores = scores.index_fill(1, suppress, -float("inf"))
    if temperature == 0:
        return scores
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # min_tokens_to_keep = 1
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                suppress: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """(N, V) raw logits -> (N,) next tokens: argmax when temperature == 0, else softmax of the warped scores
    and one multinomial draw per row (as ``generate``)."""
    scores = warp_logits(logits, temperature, top_k, top_p, suppress)
    if temperature == 0:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)

