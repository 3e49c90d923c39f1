"""Rollouts for GRPO: G samples per prompt from a (LoRA) VLM, the same distribution as HF ``generate``, fast.

``generate`` is the entry the GRPO module calls with a collated prompt batch; ``fast_generate`` does the work
on model inputs. Where the time goes in HF ``generate`` for a LoRA VLM (Qwen2.5-VL-7B shape, 64 x 256 new
tokens, one H200: 517 new tokens/s) and the levers used here, in order of gain (6,059 tokens/s, 10.3x):

1. LoRA merged for the duration (``lora.merged_lora``, bit-exact undo);
2. prefix sharing: image + prompt prefilled once per prompt, the KV cache repeated G times (``decode.prefill``);
3. own decode loop: static KV cache, GQA without ``repeat_kv``, masks on device, the step in a CUDA graph
   (``decode.DecodeStep``); sampling on device (``sampling.sample_next``); the host syncs every
   ``check_every`` steps only to ask "all finished?";
4. fallback to HF ``generate`` (``hf.hf_generate``: same outputs, same masks) for a text decoder we have not
   checked, ``min_p`` / ``repetition_penalty``, or ``backend="hf"``. The fast path runs on the CPU too
   (without CUDA graphs), which is how the tests compare it with ``generate``.

Both paths mask the completions once (``masks.finish_completions``). Row order: row ``g * B + b`` is sample g
of prompt b (``batch.tile_batch``).

Example:
    >>> out = fast_generate(model, inputs, num_generations=8, max_new_tokens=256, temperature=1.0,
    ...                     eos_token_ids=[151645, 151643], pad_token_id=151643)
    >>> out.completion_ids.shape, out.completion_mask.shape   # (B*8, C), (B*8, C)
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..models.hf import is_quantized, model_inputs, unwrap_model
from .batch import eos_token_ids, tile_batch, vision_placeholder_ids
from .decode import DecodeStep, GraphedStep, decode_positions, fast_path_unsupported, prefill
from .hf import hf_generate
from .lora import merged_lora
from .masks import finish_completions, rows_with_stop_string
from .sampling import sample_next
from .types import Rollout

log = logging.getLogger(__name__)


def generate(model: nn.Module, batch: Mapping[str, Any], num_generations: int, tokenizer: Any, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, stop_strings: Sequence[str] | None = None,
             backend: Literal["auto", "fast", "hf"] = "auto") -> Rollout:
    """Sample ``num_generations`` completions for each prompt of a collated, left-padded prompt batch.

    The EOS ids (generation config, tokenizer, chat-template end of turn), the pad id (the tokenizer's, else
    the first EOS) and the vision placeholder ids (suppressed while sampling, rejected if present) are taken
    from ``model`` and ``tokenizer``; the model is in eval mode while sampling. Temperature 0 is greedy
    decoding (``min_p`` / ``repetition_penalty`` are then ignored).

    Returns:
        a ``Rollout`` with texts; row g * B + b is sample g of prompt b, as ``tile_batch(batch, G)``.

    Example:
        >>> out = generate(peft_model, prompt_batch, 8, tokenizer, max_new_tokens=256, stop_strings=["</answer>"])
    """
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    forbidden = vision_placeholder_ids(model.config)
    greedy = temperature == 0
    was_training = model.training
    model.eval()
    try:
        return fast_generate(model, model_inputs(batch), num_generations, max_new_tokens, temperature=temperature,
                             top_p=top_p, eos_token_ids=eos, pad_token_id=pad, stop_strings=stop_strings,
                             tokenizer=tokenizer, top_k=top_k, suppress_token_ids=forbidden, forbidden_ids=forbidden,
                             min_p=None if greedy else min_p,
                             repetition_penalty=None if greedy else repetition_penalty, backend=backend)
    finally:
        model.train(was_training)


@torch.no_grad()
def fast_generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    use_cuda_graphs: bool = True,
    *,
    top_k: int | None = None,
    suppress_token_ids: Sequence[int] = (),
    forbidden_ids: Sequence[int] = (),
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    share_prefix: bool = True,
    merge_lora: bool = True,
    backend: Literal["auto", "fast", "hf"] = "auto",
    check_every: int = 16,
    return_logits: bool = False,
    fuse_decode: bool = True,
) -> Rollout:
    """Sample ``num_generations`` completions for each of the B prompts in ``inputs``.

    Args:
        model: a HF ``*ForConditionalGeneration`` or a PeftModel over one (adapters as currently active).
        inputs: one collated, left-padded prompt batch (B rows; ``input_ids``, ``attention_mask``, vision
            tensors). Not tiled: this function tiles (row g * B + b = sample g of prompt b).
        num_generations: G samples per prompt.
        max_new_tokens: at most this many new tokens per sample.
        temperature: 0 means greedy (argmax; top-k / top-p ignored, like ``do_sample=False``).
        top_p, top_k: nucleus / top-k filtering with HF's rules (top_k None or 0: off; the model's generation
            config defaults are NOT applied).
        eos_token_ids: a row ends at its first one of these (kept in the mask).
        pad_token_id: written after each row's end.
        stop_strings, tokenizer: a row also ends at the end of its first stop string (checked on the host at
            every ``check_every`` steps and at the end; the kept tokens are exactly those up to the string).
            With a tokenizer the kept tokens are also decoded (``Rollout.texts``).
        generator: a ``torch.Generator`` on the model's device for the sampling draws.
        use_cuda_graphs: capture the decode step in a CUDA graph (CUDA only; not for quantized models).
        suppress_token_ids: ids that are never sampled (``generate``'s ``suppress_tokens``).
        forbidden_ids: a completion holding one of these is rejected (``masks.finish_completions``).
        min_p, repetition_penalty: not in the fast path: given, the call goes to HF ``generate``.
        share_prefix: prefill each prompt once and share its KV cache across its G samples (False: prefill
            all B * G rows, as ``generate`` does; the same result, slower).
        merge_lora: sample with LoRA folded into the base weights (``merged_lora``).
        backend: "auto" (fast path when supported, else HF ``generate``), "fast" (raise when unsupported),
            "hf" (HF ``generate`` on the tiled batch).
        check_every: decode steps between host syncs that stop the loop once every row has ended.
        return_logits: also return the raw next-token logits of every step, (N, C, V) float32 (tests/benchmarks).
        fuse_decode: the decode step with fused q/k/v GEMM, RoPE, norms and MLP activation (``DecodeStep``'s
            ``fuse``; the same math in fewer launches). False: the HF modules one by one.

    Returns:
        a ``Rollout`` (``texts`` only when a tokenizer is given).

    Example:
        >>> out = fast_generate(peft_model, prompt_batch, num_generations=8, max_new_tokens=256,
        ...                     temperature=1.0, top_p=1.0, eos_token_ids=[151645], pad_token_id=151643)
        >>> rewards = score(out.completion_ids, out.completion_mask)   # rows in tile order
    """
    if num_generations < 1:
        raise ValueError(f"num_generations={num_generations}: must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    inputs = model_inputs(inputs)
    if "input_ids" not in inputs:
        raise ValueError("fast_generate: inputs need 'input_ids' (a collated prompt batch)")
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    mask = inputs["attention_mask"]
    if (mask[:, -1] == 0).any():
        raise ValueError("fast_generate: prompts must be left padded (attention_mask[:, -1] has zeros)")
    hf = unwrap_model(model)
    reason = None
    if backend == "hf":
        reason = "backend='hf'"
    elif min_p is not None or (repetition_penalty not in (None, 1.0)):
        reason = "min_p / repetition_penalty are only in HF generate"
    else:
        reason = fast_path_unsupported(hf)
    if reason is not None and backend == "fast":
        raise ValueError(f"fast_generate(backend='fast'): {reason}")
    g = num_generations
    eos = sorted({int(e) for e in eos_token_ids})
    was_training = hf.training
    hf.eval()
    try:
        if reason is not None:
            log.info("fast_generate: HF generate (%s)", reason)
            return hf_generate(model, inputs, g, max_new_tokens, temperature, top_p, top_k, eos, pad_token_id,
                               stop_strings, tokenizer, suppress_token_ids, forbidden_ids, min_p, repetition_penalty,
                               return_logits)
        ctx = merged_lora(model) if merge_lora else contextlib.nullcontext(0)
        with ctx as n_merged:
            out = _fast_generate(hf, inputs, g, max_new_tokens, temperature, top_p, top_k or 0, eos, pad_token_id,
                                 stop_strings, tokenizer, generator, use_cuda_graphs, suppress_token_ids,
                                 forbidden_ids, share_prefix, check_every, return_logits, fuse_decode)
        out.stats["merged_layers"] = n_merged
        return out
    finally:
        hf.train(was_training)


def _fast_generate(hf, inputs, g, max_new_tokens, temperature, top_p, top_k, eos, pad, stop_strings, tokenizer,
                   generator, use_cuda_graphs, suppress_token_ids, forbidden_ids, share_prefix, check_every,
                   return_logits, fuse_decode=True) -> Rollout:
    device = inputs["input_ids"].device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    b, p = prompt_ids.shape
    n = b * g
    prefill_inputs = inputs if share_prefix else tile_batch(inputs, g)
    repeats = g if share_prefix else 1
    logits0, layer_kv, pos = prefill(hf, prefill_inputs)
    if repeats > 1:
        logits0 = logits0.repeat(repeats, 1)
    dpos = decode_positions(pos)
    if dpos.ndim == 3:
        dpos = dpos.repeat(1, repeats, 1)
    else:
        dpos = dpos.repeat(repeats, 1)
    dtype = layer_kv[0][0].dtype
    step = DecodeStep(hf, n, p + max_new_tokens, device, dtype, fuse=fuse_decode)
    step.load_prefix(layer_kv, p, repeats)
    del layer_kv
    step.pos = dpos.contiguous()
    step.idx.fill_(p)
    step.valid[:, :p] = prompt_mask.repeat(g, 1).bool()
    step.valid[:, p:] = True
    graphed = bool(use_cuda_graphs and cuda and not is_quantized(hf))
    sync()
    t_prefill = time.perf_counter() - t0

    suppress = (torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=device)
                if len(suppress_token_ids) else None)
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=device)
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    all_logits: list[torch.Tensor] = []
    sample_lp = torch.zeros(n, max_new_tokens, dtype=torch.float32, device=device)  # the engine's log-probs
    plain_sampling = temperature > 0 and not top_k and top_p >= 1.0 and suppress is None
    run = None
    graph_error = None
    t1 = time.perf_counter()
    logits = logits0
    steps = 0
    for t in range(max_new_tokens):
        if t > 0:
            if run is None:
                run = step
                if graphed:
                    try:
                        run = GraphedStep(step)
                    except Exception as exc:  # noqa: BLE001 - a capture failure costs speed, not correctness
                        log.warning("fast_generate: CUDA graph capture failed (%s); decoding eagerly", exc)
                        torch.cuda.synchronize()
                        graph_error, graphed = repr(exc)[:300], False
            run()
            logits = step.logits
            step.idx.add_(1)
            step.pos.add_(1)
        if return_logits:
            all_logits.append(logits.clone())
        if plain_sampling:  # no filter: the draw's own softmax gives the log-prob (one pass over V, not two)
            probs = (logits / temperature if temperature != 1.0 else logits).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            sample_lp[:, t] = probs.gather(1, nxt[:, None]).squeeze(1).log()
        else:
            nxt = sample_next(logits, temperature, top_k, top_p, suppress, generator)
            if temperature > 0:  # log_softmax(logits / T) at the token: what the trainer's completion_logprobs has
                sample_lp[:, t] = torch.log_softmax(logits / temperature, -1).gather(1, nxt[:, None]).squeeze(1)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens[:, t] = nxt
        finished |= torch.isin(nxt, eos_t) if len(eos) else torch.zeros_like(finished)
        step.ids.copy_(nxt)
        steps = t + 1
        if (t + 1) % check_every == 0 and t + 1 < max_new_tokens:
            if stop_strings:
                finished |= rows_with_stop_string(tokens[:, : t + 1], finished, tokenizer, stop_strings)
            if bool(finished.all()):
                break
    sync()
    t_decode = time.perf_counter() - t1
    ids, cmask, truncated, rejected, texts = finish_completions(tokens[:, :steps], eos, pad, stop_strings, tokenizer,
                                                                forbidden_ids)
    logits_out = torch.stack(all_logits, 1)[:, : ids.shape[1]] if return_logits else None
    sampling_lp = sample_lp[:, : ids.shape[1]] * cmask.to(sample_lp) if temperature > 0 else None  # (N, C)
    stats = {"prefill_s": t_prefill, "decode_s": t_decode, "steps": steps, "new_tokens": int(cmask.sum()),
             "rows": n, "prompt_len": p, "graph_error": graph_error}
    return Rollout(prompt_ids=prompt_ids.repeat(g, 1), prompt_mask=prompt_mask.repeat(g, 1), completion_ids=ids,
                   completion_mask=cmask, truncated=truncated, rejected=rejected, texts=texts, logits=logits_out,
                   backend="fast+cuda_graph" if graphed else "fast", stats=stats, sampling_logprobs=sampling_lp)

