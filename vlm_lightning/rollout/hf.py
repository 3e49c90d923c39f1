"""The one HF ``generate`` path: sampling and greedy decoding of left-padded prompts with ``model.generate``.

``hf_generate`` is the rollout's reference and fallback (a text decoder the fast engine does not cover,
``min_p`` / ``repetition_penalty``, or ``rollout_backend="hf"``): the prompts are tiled G times, sampled in one
``generate`` call, and masked like the fast path (``masks.finish_completions``). ``generate_tokens`` is the
bare call under it, which ``VisionSFTModule.generate`` also uses. Left out: beam search settings of our own
(extra ``generate`` keyword arguments pass through ``generate_tokens`` untouched).

Example:
    >>> out = hf_generate(peft_model, inputs, 8, max_new_tokens=64, temperature=1.0, eos_token_ids=[151645],
    ...                   pad_token_id=151643)                                   # a Rollout, tile order
    >>> new, _ = generate_tokens(model, inputs, max_new_tokens=16, do_sample=False)   # (B, C) new tokens
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batch import tile_batch
from .masks import finish_completions
from .types import Rollout


@torch.no_grad()
def generate_tokens(model: nn.Module, inputs: Mapping[str, torch.Tensor], **generate_kwargs: Any
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """``model.generate`` on left-padded prompts: the new tokens (N, C) int64, and the per-step raw logits
    (C tensors of (N, V)) when ``generate`` returned them (``return_dict_in_generate``, ``output_logits``)."""
    out = model.generate(**inputs, **generate_kwargs)
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[:, inputs["input_ids"].shape[1]:].long(), getattr(out, "logits", None)


@torch.no_grad()
def hf_generate(model: nn.Module, inputs: Mapping[str, torch.Tensor], num_generations: int, max_new_tokens: int,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                eos_token_ids: Sequence[int] = (), pad_token_id: int = 0, stop_strings: Sequence[str] | None = None,
                tokenizer: Any = None, suppress_token_ids: Sequence[int] = (), forbidden_ids: Sequence[int] = (),
                min_p: float | None = None, repetition_penalty: float | None = None,
                return_logits: bool = False) -> Rollout:
    """HF ``generate`` on the prompts tiled ``num_generations`` times, masked like the fast path.

    Args: as ``engine.fast_generate`` (temperature 0: greedy, ``do_sample=False``).

    Returns:
        a ``Rollout`` (backend "hf_generate"); rows in tile order.
    """
    t0 = time.perf_counter()
    tiled = tile_batch(inputs, num_generations)
    eos = sorted({int(e) for e in eos_token_ids})
    greedy = temperature == 0
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=eos or None,
                              pad_token_id=pad_token_id, use_cache=True, return_dict_in_generate=True,
                              output_logits=return_logits)
    if not greedy:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)
    if min_p is not None:
        kw["min_p"] = min_p
    if repetition_penalty is not None:
        kw["repetition_penalty"] = repetition_penalty
    if suppress_token_ids:
        kw["suppress_tokens"] = list(suppress_token_ids)
    if stop_strings:
        kw.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    tokens, step_logits = generate_tokens(model, tiled, **kw)
    ids, cmask, truncated, rejected, texts = finish_completions(tokens, eos, pad_token_id, stop_strings, tokenizer,
                                                                forbidden_ids)
    logits = torch.stack([x.float() for x in step_logits], 1)[:, : ids.shape[1]] if return_logits else None
    if torch.cuda.is_available() and tokens.is_cuda:
        torch.cuda.synchronize()
    p = tiled["input_ids"].shape[1]
    stats = {"prefill_s": 0.0, "decode_s": time.perf_counter() - t0, "steps": tokens.shape[1],
             "new_tokens": int(cmask.sum()), "rows": tokens.shape[0], "prompt_len": p, "merged_layers": 0}
    return Rollout(prompt_ids=tiled["input_ids"], prompt_mask=tiled["attention_mask"], completion_ids=ids,
                   completion_mask=cmask, truncated=truncated, rejected=rejected, texts=texts, logits=logits,
                   backend="hf_generate", stats=stats)
