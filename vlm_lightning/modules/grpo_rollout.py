"""Rollout pieces of the GRPO loop: expand prompts, sample, mask completions, score token log-probs.

Group expansion by *tiling*: a collated prompt batch of B rows is repeated G times along dim 0
(``tile_batch``), so generation row ``g * B + b`` is sample ``g`` of prompt ``b``. Tiling keeps every
family's vision inputs consistent without knowing their layout (Qwen's flat ``pixel_values`` with
``image_grid_thw``, Pixtral's per-image ``image_sizes``, LLaVA's per-row tensors): each tile is an exact
copy of a valid batch. A micro-batch of ``k`` whole tiles is then ``tile_batch(prompts, k)`` plus the
matching completion rows, again valid for any family.

Example:
    >>> inputs = tile_batch(prompt_batch, G)                               # (G*B, P) + vision tiled
    >>> ids = sample_completions(model, inputs, max_new_tokens=64, temperature=1.0, ...)   # (G*B, C)
    >>> comp = postprocess_completions(ids, tokenizer, eos_token_ids=[...], stop_strings=["</answer>"])
    >>> logp = completion_logprobs(model, inputs, comp.ids, comp.mask)     # (G*B, C) fp32
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..losses.grpo import completion_mask_from_ids, selective_log_softmax

#: Token-level keys that grow with the sequence (the completion part gets zeros: text tokens).
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
#: Non-model entries of a generation batch (``VisionChatCollator(for_generation=True)``).
META_KEYS = ("references", "row_index", "images", "prompts")
_VISION_CONFIG_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                        "vision_start_token_id", "vision_end_token_id", "boi_token_index", "eoi_token_index",
                        "image_break_token_id", "image_end_token_id")


class Completions(NamedTuple):
    """Sampled completions after masking; N = G * B rows in tile order."""

    ids: torch.Tensor  # (N, C) int64; tokens after the end are pad
    mask: torch.Tensor  # (N, C) int64; 1 up to and including the first EOS / the end of a stop string
    is_truncated: torch.Tensor  # (N,) bool; no EOS and no stop string within max_new_tokens
    rejected: torch.Tensor  # (N,) bool; contained an image/video placeholder id (masked out entirely)
    texts: list[str]  # (N,) decoded kept tokens, special tokens skipped


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


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor entries a model forward / generate takes (drops references, images, prompts...)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in META_KEYS}


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
    for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "</s>"):
        if tok in vocab:
            ids.append(int(vocab[tok]))
    return sorted(set(int(i) for i in ids))


def _stop_string_end(tokenizer: Any, ids: list[int], stop_strings: Sequence[str]) -> int | None:
    """Smallest k such that decode(ids[:k]) contains a stop string (binary search; decode is monotone)."""
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


def postprocess_completions(completion_ids: torch.Tensor, tokenizer: Any, eos_token_ids: Sequence[int],
                            pad_token_id: int, stop_strings: Sequence[str] | None = None,
                            forbidden_ids: Sequence[int] = ()) -> Completions:
    """Mask each completion after its end and find truncated and invalid ones.

    A completion ends at its first EOS (included in the mask: the model must learn to stop) or at the
    last token of its first stop string, whichever comes first; tokens after the end become
    ``pad_token_id``. A completion with neither is truncated. A completion containing a vision
    placeholder id (``forbidden_ids``) is rejected: its mask is zeroed and the ids replaced by pad.

    Args:
        completion_ids: (N, C) sampled tokens (what ``generate`` returned after the prompt).
    """
    ids = completion_ids.clone()
    n, c = ids.shape
    mask, no_eos = completion_mask_from_ids(ids, list(eos_token_ids))  # (N, C), (N,)
    lengths = mask.sum(1)  # (N,) = C for rows without EOS
    if stop_strings:
        for i in range(n):
            end = _stop_string_end(tokenizer, ids[i, : int(lengths[i])].tolist(), stop_strings)
            if end is not None and end < int(lengths[i]) + (0 if no_eos[i] else 1):
                lengths[i] = end
                no_eos[i] = False
    pos = torch.arange(c, device=ids.device).unsqueeze(0)
    mask = (pos < lengths.unsqueeze(1)).long()
    forbidden = torch.as_tensor(list(forbidden_ids), dtype=ids.dtype, device=ids.device)
    rejected = (torch.isin(ids, forbidden) & mask.bool()).any(1) if len(forbidden) else torch.zeros(n, dtype=torch.bool)
    ids[~mask.bool()] = pad_token_id
    ids[rejected] = pad_token_id
    mask[rejected] = 0
    texts = tokenizer.batch_decode([ids[i, : int(lengths[i])].tolist() for i in range(n)], skip_special_tokens=True)
    return Completions(ids=ids, mask=mask, is_truncated=no_eos & ~rejected, rejected=rejected, texts=texts)


@torch.no_grad()
def sample_completions(model: Any, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, top_k: int | None = None, eos_token_ids: Sequence[int] = (),
                       pad_token_id: int | None = None, suppress_token_ids: Sequence[int] = (),
                       stop_strings: Sequence[str] | None = None, tokenizer: Any = None,
                       min_p: float | None = None, repetition_penalty: float | None = None) -> torch.Tensor:
    """Sample one completion per row of ``inputs`` (left-padded prompts) with HF ``generate``.

    Returns:
        (N, C) int64 completion tokens, C <= max_new_tokens (rows that stopped early are padded).
    """
    prompt_len = inputs["input_ids"].shape[1]
    kwargs: dict[str, Any] = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                                  max_new_tokens=max_new_tokens, eos_token_id=list(eos_token_ids) or None,
                                  pad_token_id=pad_token_id, use_cache=True)
    if min_p is not None:
        kwargs["min_p"] = min_p
    if repetition_penalty is not None:
        kwargs["repetition_penalty"] = repetition_penalty
    if suppress_token_ids:
        kwargs["suppress_tokens"] = list(suppress_token_ids)
    if stop_strings:
        kwargs["stop_strings"] = list(stop_strings)
        kwargs["tokenizer"] = tokenizer
    out = model.generate(**inputs, **kwargs)
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[:, prompt_len:].long()


def extend_inputs(inputs: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt + completion as one forward input: ids and attention mask concatenated, token-type ids
    extended with zeros; vision tensors unchanged. (N, P) + (N, C) -> (N, P + C)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], completion_ids.to(inputs["input_ids"])], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask.to(inputs["attention_mask"])], dim=1)
    for k in ("token_type_ids", "mm_token_type_ids"):
        if k in inputs:
            out[k] = torch.cat([inputs[k], torch.zeros_like(completion_ids).to(inputs[k])], dim=1)
    return out


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
            lm_head weight (no (N, C, V) logits); otherwise logits for the C positions only
            (``logits_to_keep``) and a row-wise selective log-softmax.

    Returns:
        (N, C) float32; entries outside the mask are meaningless (mask them).
    """
    p, c = inputs["input_ids"].shape[1], completion_ids.shape[1]
    full = extend_inputs(inputs, completion_ids, completion_mask)
    if use_kernels:
        from vlm_lightning.kernels import fused_linear_token_logprobs

        from .sft import decoder_hidden_states, final_logit_softcap, unwrap_hf_model

        hf = unwrap_hf_model(model)
        head = hf.get_output_embeddings()
        if type(head) is torch.nn.Linear and head.bias is None:  # LoRA on the lm_head: logits path below
            hidden = decoder_hidden_states(hf, full)  # (N, P + C, H)
            h = hidden[:, p - 1: p + c - 1]  # (N, C, H): position t predicts token t + 1
            return fused_linear_token_logprobs(h, head.weight, completion_ids, temperature=temperature,
                                               softcap=final_logit_softcap(hf))
    out = model(**full, use_cache=False, logits_to_keep=c + 1)
    logits = out.logits[:, :-1]  # (N, C, V)
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, completion_ids)
