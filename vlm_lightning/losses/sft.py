"""Supervised token loss on the assistant tokens, with the gradient-accumulation-exact normaliser.

Example:
    >>> loss = masked_token_loss(logits, batch["labels"])                        # mean over labelled tokens
    >>> loss = masked_token_loss(logits, labels, num_items_in_batch=n_global)    # sum / global count
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                      ignore_index: int = -100, shift: bool = True, is_logprobs: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not ``ignore_index``.

    Args:
        logits: (B, T, V) logits (or log-probs with ``is_logprobs=True``).
        labels: (B, T) token ids, ``ignore_index`` where there is no loss (prompt, image, pad tokens).
        num_items_in_batch: the labelled-token count over every micro-batch of the optimizer step; the loss
            is then ``sum / num_items_in_batch`` so accumulated micro-batches add up to the exact token mean
            (transformers' convention). None: mean over this batch's labelled tokens.
        shift: labels are aligned with the inputs (HF convention), so logits[:, t] predicts labels[:, t+1].

    Returns:
        () fp32 scalar; 0 (with zero gradient, never NaN) when no token is labelled.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1]).float()
    tgt = labels.reshape(-1).to(flat.device)
    if is_logprobs:
        total = F.nll_loss(flat, tgt, ignore_index=ignore_index, reduction="sum")
    else:
        total = F.cross_entropy(flat, tgt, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        denom = (tgt != ignore_index).sum().clamp(min=1)
    else:
        denom = torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
    return total / denom.to(total.dtype)
