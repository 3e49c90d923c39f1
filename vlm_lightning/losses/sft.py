"""Supervised next-token loss on the assistant tokens, as pure functions of tensors.

``token_loss`` takes the decoder's last hidden state, the lm_head (its weight, or the head module when it is
not a plain bias-free Linear, e.g. LoRA on the lm_head), the labels and Gemma's softcap, and returns the sum
of next-token cross-entropies over supervised positions divided by a normaliser. ``fused=True`` runs the
Triton fused linear cross-entropy (the (N, V) logits are never materialised); otherwise only the N supervised
rows go through the head. Nothing here knows a model: callers ask ``models.hf`` for the head weight and the
softcap (``VisionSFTModule``, and the patched HF forward of ``models.patch``).

The normaliser makes gradient accumulation exact: with ``normalizer`` = the supervised-token count of the
whole optimizer step, accumulated micro-batches add up to the token mean of one big batch.

Example:
    >>> loss = token_loss(hidden, labels, lm_head_weight(hf), softcap=final_logit_softcap(hf), fused=True)
    >>> loss = masked_token_loss(logits, batch["labels"])                 # from full (B, T, V) logits
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vlm_lightning.kernels import fused_linear_cross_entropy

__all__ = ["masked_token_loss", "shift_labels", "token_loss"]


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) labels aligned with the inputs (HF convention) -> (B, T) targets: position t predicts t + 1."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def token_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
               *, softcap: float | None = None, normalizer: float | torch.Tensor | None = None,
               fused: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions, divided by ``normalizer``.

    Args:
        hidden: (B, T, H) decoder output. labels: (B, T), ``ignore_index`` where there is no loss, aligned
            with the inputs (position t predicts labels[t + 1]).
        head: the lm_head weight (V, H), or a callable (N, H) -> (N, V) when the head is not a plain
            bias-free Linear (then the logits of the supervised rows are materialised, also with ``fused``).
        softcap: Gemma's final-logit softcap (logits -> softcap * tanh(logits / softcap)), or None.
        normalizer: the divisor (the step's supervised-token count); None: this batch's supervised tokens.
        fused: the Triton fused linear cross-entropy over all rows instead of the supervised rows' logits.
    Returns:
        () fp32; 0 with a zero gradient (never NaN) when no token is supervised.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"token_loss: hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                         "must share the (batch, seq) shape")
    shifted = shift_labels(labels.to(hidden.device), ignore_index)  # (B, T)
    if fused and isinstance(head, torch.Tensor):
        return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, shifted.reshape(-1),
                                          ignore_index=ignore_index, num_items_in_batch=normalizer, softcap=softcap)
    keep = shifted != ignore_index
    h = hidden[keep]  # (N, H)
    logits = h @ head.t() if isinstance(head, torch.Tensor) else head(h)  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits.float() / softcap)
    if normalizer is None:
        normalizer = keep.sum()
    return masked_token_loss(logits[None], shifted[keep][None], num_items_in_batch=normalizer,
                             ignore_index=ignore_index, shift=False)


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
