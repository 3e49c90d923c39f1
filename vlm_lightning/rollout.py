"""Fast rollouts for GRPO: G samples per prompt from a (LoRA) VLM, the same distribution as HF ``generate``.

Where the time goes in HF ``generate`` for a LoRA VLM (Qwen2.5-VL-7B shape, 64 x 256 new tokens, one H200:
517 new tokens/s): two extra small matmuls per LoRA linear, a Python-level loop that launches ~1,500 kernels
per token, ``repeat_kv`` copies of the whole KV cache at every step (transformers 5.17), mask rebuilding, and
a prefill of the image + prompt once per *sample* although the G samples of a prompt share it. The levers,
in order of gain:

1. **LoRA merged for the duration** (``merged_lora``): every active LoRA ``Linear`` gets a new base weight
   ``W + s * B @ A`` and its adapter switched off; on exit the original weight *tensors* are put back (a
   pointer swap, no arithmetic: bit-exact). Non-mergeable layers (4-bit / 8-bit bases, DoRA, LoRA bias,
   embeddings) keep their adapter active. Costs one extra copy of the merged weights while sampling.
2. **Prefix sharing**: the image + prompt is prefilled once per prompt with the model's own forward
   (vision tower, masks, M-RoPE positions exactly as ``generate`` builds them), and its KV cache is
   repeated G times along the batch.
3. **Own decode loop**: a static KV cache (one ``(N, H_kv, P + C, d)`` buffer per layer), GQA without
   ``repeat_kv`` (queries grouped per KV head), masks built on device, and the whole one-token step
   captured in a CUDA graph (``torch.cuda.CUDAGraph``; replay = one launch). Sampling (suppressed ids,
   temperature, top-k, top-p with HF's exact rules, ``torch.multinomial``) runs on device; the host only
   syncs every ``check_every`` steps to ask "all finished?".
4. **Fallback** to HF ``generate`` (same outputs, same masks) for a text decoder we have not checked
   (``SUPPORTED_TEXT_MODEL_TYPES``), ``min_p`` / ``repetition_penalty``, or ``backend="hf"``. The fast path
   runs on the CPU too (without CUDA graphs), which is how the tests compare it with ``generate``.

Positions: the prefill gets the position ids that ``generate`` would build
(``model._prepare_position_ids_for_generation``: attention-mask cumsum, or Qwen-VL's 3-D M-RoPE index);
decode token k (k = 0 is the first generated token, fed at the second step) sits at the prompt's last
position + 1 + k in every component, which is what ``generate`` does in transformers 5.17 and 5.24 (for
Qwen-VL: ``rope_deltas`` + text position). The KV cache index of that token is P + k.

Row order: row ``g * B + b`` is sample g of prompt b (tile order, as
``vlm_lightning.modules.grpo_rollout.tile_batch``).

Example:
    >>> out = fast_generate(model, batch, num_generations=8, max_new_tokens=256, temperature=1.0,
    ...                     eos_token_ids=[151645, 151643], pad_token_id=151643)
    >>> out.completion_ids.shape, out.completion_mask.shape   # (B*8, C), (B*8, C)
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Text decoders whose one-token step ``_DecodeStep`` reproduces (checked against transformers 5.17 and 5.24).
SUPPORTED_TEXT_MODEL_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text", "gemma3_text", "llama", "mistral", "qwen2")
#: Batch entries that are never model inputs.
_META_KEYS = ("labels", "references", "row_index", "images", "prompts")


class RolloutOutput(NamedTuple):
    """Result of ``fast_generate``; N = B * G rows in tile order (row g * B + b: sample g of prompt b)."""

    prompt_ids: torch.Tensor  # (N, P) int64, left padded as given
    prompt_mask: torch.Tensor  # (N, P) int64
    completion_ids: torch.Tensor  # (N, C) int64, C <= max_new_tokens; pad_token_id after each row's end
    completion_mask: torch.Tensor  # (N, C) int64, 1 up to and incl. the first EOS / the end of a stop string
    truncated: torch.Tensor  # (N,) bool, no EOS and no stop string within max_new_tokens
    logits: torch.Tensor | None  # (N, C, V) float32 raw next-token logits (``return_logits=True``), else None
    backend: str  # "fast", "fast+cuda_graph" or "hf_generate"
    stats: dict  # prefill_s, decode_s, steps, new_tokens, merged_layers


# ----------------------------------------------------------------------------------------------- LoRA merge
def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except Exception:  # noqa: BLE001 - peft missing: nothing to merge
        return None
    return LoraLinear


def _mergeable(mod: nn.Module) -> bool:
    """A plain LoRA ``Linear`` over a float ``nn.Linear``, vanilla LoRA (no DoRA / LoRA bias) on every active adapter."""
    base = mod.get_base_layer()
    if type(base) is not nn.Linear or not base.weight.is_floating_point():
        return False
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if not active:
        return False
    variants = getattr(mod, "lora_variant", {}) or {}
    lora_bias = getattr(mod, "lora_bias", {}) or {}
    return not any(a in variants or lora_bias.get(a, False) for a in active)


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """Fold every active, mergeable LoRA adapter into its base weight for the duration of the block.

    Each merged layer's base ``weight.data`` is replaced by a new tensor ``W + s * B @ A`` (computed in fp32,
    stored in W's dtype) and the layer's adapters are switched off (``_disable_adapters``), so forwards see the
    merged weight only. On exit the original weight tensors and adapter flags are put back: bit-exact, nothing
    is subtracted. Layers that cannot be merged (quantized bases, DoRA, LoRA bias) stay as they are, adapter
    active. Yields the number of merged layers (0 for a model without LoRA).

    Example:
        >>> with merged_lora(peft_model) as n:
        ...     logits = peft_model(**batch).logits   # same function, no LoRA matmuls
    """
    lora_linear = _lora_linear_class()
    swaps: list[tuple[nn.Module, torch.Tensor, bool]] = []
    try:
        if lora_linear is not None:
            with torch.no_grad():
                for mod in model.modules():
                    if not isinstance(mod, lora_linear) or mod.disable_adapters or mod.merged or not _mergeable(mod):
                        continue
                    weight = mod.get_base_layer().weight
                    orig = weight.data
                    merged = orig.to(torch.float32, copy=True)  # never in place: orig is put back
                    for a in mod.active_adapters:
                        if a in mod.lora_A:
                            merged += mod.get_delta_weight(a).float()
                    swaps.append((mod, orig, mod._disable_adapters))
                    weight.data = merged.to(orig.dtype)
                    mod._disable_adapters = True  # the flag only: enable_adapters() would touch requires_grad
        yield len(swaps)
    finally:
        for mod, orig, flag in reversed(swaps):
            mod.get_base_layer().weight.data = orig
            mod._disable_adapters = flag


# -------------------------------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _language_model(hf: nn.Module) -> nn.Module:
    inner = getattr(hf, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        from .models.families import get_family_spec

        lm = hf.get_submodule(get_family_spec(hf).language_model)
    return lm


def _tile(inputs: Mapping[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Every tensor repeated ``times`` along dim 0 (tile order; Qwen's flat pixel_values stay consistent)."""
    return {k: (v if times == 1 else torch.cat([v] * times, dim=0)) for k, v in inputs.items()}


def _is_quantized(hf: nn.Module) -> bool:
    return bool(getattr(hf, "is_quantized", False) or getattr(hf, "is_loaded_in_4bit", False)
                or getattr(hf, "is_loaded_in_8bit", False) or getattr(hf, "hf_quantizer", None) is not None)


def fast_path_unsupported(model: nn.Module) -> str | None:
    """Why the own decode loop cannot run this model (None: it can)."""
    hf = _unwrap(model)
    text_cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    mt = getattr(text_cfg, "model_type", None)
    if mt not in SUPPORTED_TEXT_MODEL_TYPES:
        return f"text decoder {mt!r} not in SUPPORTED_TEXT_MODEL_TYPES"
    if getattr(text_cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit softcapping"
    try:
        lm = _language_model(hf)
    except Exception as exc:  # noqa: BLE001
        return f"no language model found ({exc})"
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(lm, attr):
            return f"language model has no {attr!r}"
    return None


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


def _sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 suppress: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """(N, V) raw logits -> (N,) next tokens: argmax when temperature == 0, else softmax of the warped scores
    and one multinomial draw per row (as ``generate``)."""
    scores = warp_logits(logits, temperature, top_k, top_p, suppress)
    if temperature == 0:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _stop_string_end(tokenizer: Any, ids: list[int], stop_strings: Sequence[str]) -> int | None:
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
    n, t = tokens.shape
    eos = torch.as_tensor(list(eos_token_ids), dtype=tokens.dtype, device=tokens.device)
    is_eos = torch.isin(tokens, eos) if len(eos) else torch.zeros_like(tokens, dtype=torch.bool)
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, t, dtype=torch.long))
    lengths = torch.where(has_eos, first + 1, first)  # (N,)
    ended = has_eos.clone()
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        lens = lengths.tolist()
        for i in range(n):
            end = _stop_string_end(tokenizer, tokens[i, : lens[i]].tolist(), stop_strings)
            if end is not None and end <= lens[i]:
                lengths[i] = end
                ended[i] = True
    c = int(lengths.max()) if n else 0
    pos = torch.arange(c, device=tokens.device)[None]
    mask = (pos < lengths[:, None]).long()
    ids = tokens[:, :c].masked_fill(mask == 0, pad_token_id)
    return ids, mask, ~ended


# ------------------------------------------------------------------------------------------- decode step
class _DecodeStep:
    """One-token step of the text decoder over a static KV cache, from the HF modules themselves.

    Static state (buffers read and written in place, so the step can be captured in a CUDA graph):
    ``ids`` (N,) the tokens to feed; ``pos`` rotary positions, (3, N, 1) for M-RoPE else (N, 1); ``idx`` (1,)
    the cache index to write; ``valid`` (N, L) which cache slots hold real tokens (prompt mask, then ones);
    ``keys`` / ``values`` per layer (N, H_kv, L, d); ``logits`` (N, V) float32, the output.
    """

    def __init__(self, hf: nn.Module, n: int, max_len: int, device, dtype):
        self.hf = hf
        self.lm = _language_model(hf)
        self.head = hf.get_output_embeddings()
        text_cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        self.softcap = getattr(text_cfg, "final_logit_softcapping", None)
        layer_types = getattr(text_cfg, "layer_types", None)
        self.layers = list(self.lm.layers)[: getattr(text_cfg, "num_hidden_layers", len(self.lm.layers))]
        self.layer_types = [layer_types[i] if layer_types else "full_attention" for i in range(len(self.layers))]
        # Mistral's attention reads the window from the config for every layer; the others keep it per layer
        default_window = getattr(text_cfg, "sliding_window", None) if text_cfg.model_type == "mistral" else None
        self.windows = [getattr(layer.self_attn, "sliding_window", default_window) for layer in self.layers]
        params = inspect.signature(self.lm.rotary_emb.forward).parameters
        self.rope_by_type = "layer_type" in params
        self.n, self.max_len, self.device, self.dtype = n, max_len, device, dtype
        self.ar = torch.arange(max_len, device=device)
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.idx = torch.zeros(1, dtype=torch.long, device=device)
        self.valid = torch.zeros(n, max_len, dtype=torch.bool, device=device)
        self.pos: torch.Tensor | None = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None

    def load_prefix(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], prompt_len: int, repeats: int) -> None:
        """Copy the prefill cache ((B, H_kv, <=P, d) per layer) into the static buffers, tiled ``repeats`` times.
        A sliding-window layer's cache holds only the prompt's last tokens: they go at the end of [0, P)."""
        for k, v in layer_kv:
            b, h, lk, d = k.shape
            kb = torch.zeros(self.n, h, self.max_len, d, dtype=k.dtype, device=self.device)
            vb = torch.zeros_like(kb)
            kb[:, :, prompt_len - lk: prompt_len] = k.repeat(repeats, 1, 1, 1)
            vb[:, :, prompt_len - lk: prompt_len] = v.repeat(repeats, 1, 1, 1)
            self.keys.append(kb)
            self.values.append(vb)

    def _rope(self, h: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for lt in set(self.layer_types):
            out[lt] = self.lm.rotary_emb(h, self.pos, lt) if self.rope_by_type else self.lm.rotary_emb(h, self.pos)
        return out

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def __call__(self) -> None:
        n = self.n
        h = self.lm.embed_tokens(self.ids[:, None])  # (N, 1, H)
        rope = self._rope(h)
        causal = self.valid & (self.ar[None, :] <= self.idx)  # (N, L)
        masks: dict[Any, torch.Tensor] = {None: causal[:, None, None, :]}
        for w in set(self.windows) - {None}:
            masks[w] = (causal & (self.ar[None, :] > self.idx - w))[:, None, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            d = attn.head_dim
            q = attn.q_proj(x).view(n, 1, -1, d).transpose(1, 2)  # (N, Hq, 1, d)
            k = attn.k_proj(x).view(n, 1, -1, d).transpose(1, 2)  # (N, Hkv, 1, d)
            v = attn.v_proj(x).view(n, 1, -1, d).transpose(1, 2)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            cos, sin = rope[self.layer_types[i]]  # (N, 1, d)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            kb, vb = self.keys[i], self.values[i]
            kb.index_copy_(2, self.idx, k.to(kb.dtype))
            vb.index_copy_(2, self.idx, v.to(vb.dtype))
            hkv, hq = kb.shape[1], q.shape[1]
            qg = q.reshape(n, hkv, hq // hkv, d)  # query head j reads KV head j // rep, as repeat_kv
            o = F.scaled_dot_product_attention(qg, kb, vb, attn_mask=masks[self.windows[i]], scale=attn.scaling)
            o = attn.o_proj(o.reshape(n, 1, hq * d))
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: norms around both sub-blocks
                h = residual + layer.post_attention_layernorm(o)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = residual + o
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.lm.norm(h)
        logits = self.head(h[:, -1]).float()  # (N, V)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)


class _GraphedStep:
    """``_DecodeStep`` captured once in a CUDA graph; ``__call__`` replays it (all state in static buffers)."""

    def __init__(self, step: _DecodeStep, warmup: int = 2):
        self.step = step
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # writes K/V at the current idx, which the first real step overwrites
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()

    def __call__(self) -> None:
        self.graph.replay()


# ---------------------------------------------------------------------------------------------- prefill
def _prefill_positions(hf: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The position ids ``generate`` gives the prompt: (N, P), or (3|4, N, P) for Qwen-VL M-RoPE."""
    ids = inputs["input_ids"]
    prep = getattr(hf, "_prepare_position_ids_for_generation", None)
    if prep is not None:
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        return prep(ids, kwargs)
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(cache[i][0], cache[i][1]) for i in range(len(cache))]


def _prefill(hf: nn.Module, inputs: Mapping[str, torch.Tensor]):
    """Model forward on the prompts with a cache: (last-position logits (B, V) fp32, per-layer KV, positions)."""
    pos = _prefill_positions(hf, inputs)
    out = hf(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    logits = out.logits[:, -1].float()
    return logits, _cache_layers(cache), pos


def _decode_positions(pos: torch.Tensor) -> torch.Tensor:
    """Rotary positions of the first decode token from the prompt's: (3, B, 1) for M-RoPE, else (B, 1)."""
    if pos.ndim == 3:
        return pos[-3:, :, -1:] + 1  # drop the text-only component of a 4-row Qwen position tensor
    return pos[:, -1:] + 1


# ------------------------------------------------------------------------------------------ fast_generate
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
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    share_prefix: bool = True,
    merge_lora: bool = True,
    backend: Literal["auto", "fast", "hf"] = "auto",
    check_every: int = 16,
    return_logits: bool = False,
) -> RolloutOutput:
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
        generator: a ``torch.Generator`` on the model's device for the sampling draws.
        use_cuda_graphs: capture the decode step in a CUDA graph (CUDA only; not for quantized models).
        suppress_token_ids: ids that are never sampled (``generate``'s ``suppress_tokens``).
        min_p, repetition_penalty: not in the fast path: given, the call goes to HF ``generate``.
        share_prefix: prefill each prompt once and share its KV cache across its G samples (False: prefill
            all B * G rows, as ``generate`` does; the same result, slower).
        merge_lora: sample with LoRA folded into the base weights (``merged_lora``).
        backend: "auto" (fast path when supported, else HF ``generate``), "fast" (raise when unsupported),
            "hf" (HF ``generate`` on the tiled batch).
        check_every: decode steps between host syncs that stop the loop once every row has ended.
        return_logits: also return the raw next-token logits of every step, (N, C, V) float32 (tests/benchmarks).

    Returns:
        ``RolloutOutput``.

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
    inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k not in _META_KEYS}
    if "input_ids" not in inputs:
        raise ValueError("fast_generate: inputs need 'input_ids' (a collated prompt batch)")
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    mask = inputs["attention_mask"]
    if (mask[:, -1] == 0).any():
        raise ValueError("fast_generate: prompts must be left padded (attention_mask[:, -1] has zeros)")
    hf = _unwrap(model)
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
            return _hf_generate(model, inputs, g, max_new_tokens, temperature, top_p, top_k, eos, pad_token_id,
                                stop_strings, tokenizer, suppress_token_ids, min_p, repetition_penalty,
                                return_logits)
        ctx = merged_lora(model) if merge_lora else contextlib.nullcontext(0)
        with ctx as n_merged:
            out = _fast_generate(hf, inputs, g, max_new_tokens, temperature, top_p, top_k or 0, eos, pad_token_id,
                                 stop_strings, tokenizer, generator, use_cuda_graphs, suppress_token_ids,
                                 share_prefix, check_every, return_logits)
        out.stats["merged_layers"] = n_merged
        return out
    finally:
        hf.train(was_training)


def _fast_generate(hf, inputs, g, max_new_tokens, temperature, top_p, top_k, eos, pad, stop_strings, tokenizer,
                   generator, use_cuda_graphs, suppress_token_ids, share_prefix, check_every, return_logits
                   ) -> RolloutOutput:
    device = inputs["input_ids"].device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    b, p = prompt_ids.shape
    n = b * g
    prefill_inputs = inputs if share_prefix else _tile(inputs, g)
    repeats = g if share_prefix else 1
    logits0, layer_kv, pos = _prefill(hf, prefill_inputs)
    if repeats > 1:
        logits0 = logits0.repeat(repeats, 1)
    dpos = _decode_positions(pos)
    if dpos.ndim == 3:
        dpos = dpos.repeat(1, repeats, 1)
    else:
        dpos = dpos.repeat(repeats, 1)
    dtype = layer_kv[0][0].dtype
    step = _DecodeStep(hf, n, p + max_new_tokens, device, dtype)
    step.load_prefix(layer_kv, p, repeats)
    del layer_kv
    step.pos = dpos.contiguous()
    step.idx.fill_(p)
    step.valid[:, :p] = _tile({"m": prompt_mask}, g)["m"].bool()
    step.valid[:, p:] = True
    graphed = bool(use_cuda_graphs and cuda and not _is_quantized(hf))
    sync()
    t_prefill = time.perf_counter() - t0

    suppress = (torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=device)
                if len(suppress_token_ids) else None)
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=device)
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    all_logits: list[torch.Tensor] = []
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
                        run = _GraphedStep(step)
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
        nxt = _sample_next(logits, temperature, top_k, top_p, suppress, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens[:, t] = nxt
        finished |= torch.isin(nxt, eos_t) if len(eos) else torch.zeros_like(finished)
        step.ids.copy_(nxt)
        steps = t + 1
        if (t + 1) % check_every == 0 and t + 1 < max_new_tokens:
            if stop_strings:
                finished |= _rows_with_stop_string(tokens[:, : t + 1], finished, tokenizer, stop_strings)
            if bool(finished.all()):
                break
    sync()
    t_decode = time.perf_counter() - t1
    ids, cmask, truncated = completion_masks(tokens[:, :steps], eos, pad, stop_strings, tokenizer)
    logits_out = torch.stack(all_logits, 1)[:, : ids.shape[1]] if return_logits else None
    stats = {"prefill_s": t_prefill, "decode_s": t_decode, "steps": steps, "new_tokens": int(cmask.sum()),
             "rows": n, "prompt_len": p, "graph_error": graph_error}
    return RolloutOutput(prompt_ids=prompt_ids.repeat(g, 1), prompt_mask=prompt_mask.repeat(g, 1),
                         completion_ids=ids, completion_mask=cmask, truncated=truncated, logits=logits_out,
                         backend="fast+cuda_graph" if graphed else "fast", stats=stats)


def _rows_with_stop_string(tokens: torch.Tensor, finished: torch.Tensor, tokenizer: Any,
                           stop_strings: Sequence[str]) -> torch.Tensor:
    """(N,) bool: unfinished rows whose text so far contains a stop string (host-side decode)."""
    if tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    hit = torch.zeros_like(finished)
    open_rows = (~finished).nonzero().flatten().tolist()
    texts = tokenizer.batch_decode(tokens[open_rows].tolist(), skip_special_tokens=False) if open_rows else []
    for i, text in zip(open_rows, texts):
        if any(s in text for s in stop_strings):
            hit[i] = True
    return hit


def _hf_generate(model, inputs, g, max_new_tokens, temperature, top_p, top_k, eos, pad, stop_strings, tokenizer,
                 suppress_token_ids, min_p, repetition_penalty, return_logits) -> RolloutOutput:
    """HF ``generate`` on the tiled batch, post-processed like the fast path (the reference and the fallback)."""
    t0 = time.perf_counter()
    tiled = _tile(inputs, g)
    greedy = temperature == 0
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=eos or None,
                              pad_token_id=pad, use_cache=True, return_dict_in_generate=True,
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
    out = model.generate(**tiled, **kw)
    p = tiled["input_ids"].shape[1]
    tokens = out.sequences[:, p:].long()
    ids, cmask, truncated = completion_masks(tokens, eos, pad, stop_strings, tokenizer)
    logits = torch.stack([x.float() for x in out.logits], 1)[:, : ids.shape[1]] if return_logits else None
    if torch.cuda.is_available() and tokens.is_cuda:
        torch.cuda.synchronize()
    stats = {"prefill_s": 0.0, "decode_s": time.perf_counter() - t0, "steps": tokens.shape[1],
             "new_tokens": int(cmask.sum()), "rows": tokens.shape[0], "prompt_len": p, "merged_layers": 0}
    return RolloutOutput(prompt_ids=tiled["input_ids"], prompt_mask=tiled["attention_mask"], completion_ids=ids,
                         completion_mask=cmask, truncated=truncated, logits=logits, backend="hf_generate",
                         stats=stats)
