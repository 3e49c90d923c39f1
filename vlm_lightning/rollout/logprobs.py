"""Token log-probs of sampled completions under a policy: what the GRPO ratios and the KL are built from.

``completion_logprobs`` re-scores prompt + completion in one forward (vision inputs included, token-type ids
extended) and returns the (N, C) log-probs of the completion tokens, either from the decoder's hidden states
with the fused ``fused_linear_token_logprobs`` kernel (no (N, C, V) logits) or from the logits of the C
positions and ``selective_log_softmax``. Left out: the loss math (``losses.grpo``).

Example:
    >>> logp = completion_logprobs(model, model_inputs(tiled), out.completion_ids, out.completion_mask)  # (N, C)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlm_lightning.kernels import fused_linear_token_logprobs

from ..models.hf import decoder_hidden_states, final_logit_softcap, lm_head_weight
from .batch import extend_inputs


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[index] without materialising the full log-softmax at once.

    Args:
        logits: (..., V). index: (...) token ids.

    Returns:
        (...) float32 log-probs. Rows are processed one batch row at a time so the peak extra memory
        is one row's (T, V) fp32 copy rather than (B, T, V) (OpenRLHF PR#718, TRL's helper).
    """
    if logits.dim() == 1:
        raise ValueError("logits must have a vocab dimension (..., V)")
    flat = logits.reshape(-1, logits.shape[-2], logits.shape[-1]) if logits.dim() > 2 else logits.unsqueeze(0)
    idx = index.reshape(flat.shape[:-1])
    out = []
    for row_logits, row_idx in zip(flat, idx):
        lse = torch.logsumexp(row_logits.float(), dim=-1)  # (T,)
        tok = torch.gather(row_logits, -1, row_idx.unsqueeze(-1)).squeeze(-1).float()
        out.append(tok - lse)
    return torch.stack(out).reshape(index.shape)


def completion_logprobs(model: Any, inputs: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0, use_kernels: bool = False
                        ) -> torch.Tensor:
    """Token log-probs of the completions under ``model`` (grad flows when enabled).

    Args:
        model: the HF VLM or its PeftModel (adapters as currently enabled).
        inputs: (N, P) prompt inputs incl. vision tensors (``model_inputs`` of a tiled batch).
        completion_ids, completion_mask: (N, C).
        temperature: logits are divided by it, so log-probs match the sampling distribution (as TRL).
        use_kernels: take the decoder's last hidden states and ``fused_linear_token_logprobs`` with the
            lm_head weight (no (N, C, V) logits); otherwise, or when the lm_head has no plain weight
            (``models.hf.lm_head_weight``: LoRA on it, a bias), logits for the C positions only
            (``logits_to_keep``) and a row-wise selective log-softmax.

    Returns:
        (N, C) float32; entries outside the mask are meaningless (mask them).
    """
    p, c = inputs["input_ids"].shape[1], completion_ids.shape[1]
    full = extend_inputs(inputs, completion_ids, completion_mask)
    if use_kernels:
        weight = lm_head_weight(model)  # None for LoRA on the lm_head: logits path below
        if weight is not None:
            hidden = decoder_hidden_states(model, full)  # (N, P + C, H)
            h = hidden[:, p - 1: p + c - 1]  # (N, C, H): position t predicts token t + 1
            return fused_linear_token_logprobs(h, weight, completion_ids, temperature=temperature,
                                               softcap=final_logit_softcap(model))
    out = model(**full, use_cache=False, logits_to_keep=c + 1)
    logits = out.logits[:, :-1]  # (N, C, V)
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, completion_ids)
