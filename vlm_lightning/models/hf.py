"""Facts about a loaded HF (or PEFT-wrapped) vision-language model, asked in one place.

Every room that holds a model asks here instead of re-deriving: the HF model under a PeftModel, its text
config, whether it is quantized, the dtype activations run in, the lm_head weight the fused loss can use, the
final-logit softcap its forward applies, the decoder's last hidden state, and which tensors of a collated
batch are model inputs. Nothing here changes a model; loading lives in ``loading.py``, patching in
``patch.py``.

Example:
    >>> hf = unwrap_model(peft_model)                     # Qwen2_5_VLForConditionalGeneration
    >>> hidden = decoder_hidden_states(hf, model_inputs(batch), batch["labels"])
    >>> head, cap = lm_head_weight(hf), final_logit_softcap(hf)
"""
from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn

__all__ = [
    "IGNORE_INDEX", "NON_MODEL_KEYS", "SEQ_LENS", "compute_dtype", "count_images", "decoder_hidden_states",
    "final_logit_softcap", "forward_source", "is_quantized", "lm_head_weight", "model_inputs", "resolve_dtype",
    "text_config", "unwrap_model",
]

IGNORE_INDEX = -100
# collated-batch keys that are not model inputs (labels, generation and bookkeeping extras)
NON_MODEL_KEYS = ("labels", "references", "row_index", "images", "prompts")
#: the key of a packed batch (``packing=True``): (R,) lengths of the rows in its one sequence
SEQ_LENS = "seq_lens"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``*ForConditionalGeneration`` model under a PeftModel (or the model itself). LoRA layers are
    injected in place, so what is patched or read here is what the PeftModel runs."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(model_or_config) -> Any:
    """The language model's config (``config.get_text_config()`` where the VLM config nests one)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def is_quantized(model: nn.Module) -> bool:
    """Loaded in 4 or 8 bit (bitsandbytes or any other HF quantizer)."""
    model = unwrap_model(model)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "hf_quantizer", None) is not None)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``; ``"auto"``/None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (use bfloat16, float16, float32 or auto)")
    return value


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: the 4-bit compute dtype, else the dtype of the 16/32-bit weights."""
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if qcfg is not None:
        get = qcfg.get if isinstance(qcfg, dict) else lambda key: getattr(qcfg, key, None)
        value = get("bnb_4bit_compute_dtype")
        if isinstance(value, str):
            value = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    for p in model.parameters():
        if p.is_floating_point() and p.dtype not in (torch.uint8, torch.int8):
            return p.dtype
    return torch.float32


_SOURCE_CACHE: dict = {}


def forward_source(fn) -> str:
    """Whitespace-free source of a function (cached), '' when unavailable: what a forward really does.

    Keyed by the *unwrapped* function's code: every forward wrapped by the same decorator (transformers'
    ``deprecate_kwarg``) shares the wrapper's code object, which once made Llama 3.2 Vision's cross-attention
    read as its self-attention."""
    fn = inspect.unwrap(fn) if callable(fn) else fn
    key = getattr(fn, "__code__", fn)
    if key not in _SOURCE_CACHE:
        try:
            _SOURCE_CACHE[key] = re.sub(r"\s+", "", inspect.getsource(fn))
        except (OSError, TypeError):
            _SOURCE_CACHE[key] = ""
    return _SOURCE_CACHE[key]


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma's final-logit softcap if this model's forward applies it (the text config may carry a value
    that a ``*ForConditionalGeneration`` forward ignores, so the forward's source decides; where the source
    cannot be read, a configured cap is trusted)."""
    base = unwrap_model(model)
    cap = getattr(text_config(base), "final_logit_softcapping", None)
    if cap is None:
        return None
    source = forward_source(type(base).forward)
    return float(cap) if not source or "final_logit_softcapping" in source else None


def lm_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The lm_head weight (V, H) the fused loss multiplies by, or None when the head is not a plain bias-free
    Linear (LoRA on the lm_head, or a bias): callers then compute the loss from materialised logits."""
    model = unwrap_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    active = getattr(head, "active_adapter", None)  # PEFT ModulesToSaveWrapper: the trained copy
    saved = getattr(head, "modules_to_save", None)
    if isinstance(saved, nn.ModuleDict) and isinstance(active, str) and active in saved:
        inner = saved[active]
        if type(inner) is nn.Linear and inner.bias is None:
            return inner.weight
    return None


def model_inputs(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that the model's forward / generate takes (labels excluded). A packed
    batch is refused: its rows stay apart only through ``models.packing.forward_inputs(model, batch)``."""
    if SEQ_LENS in batch:
        raise ValueError("a packed batch (packing=True) needs the model's packed kwargs: use "
                         "vlm_lightning.models.packing.forward_inputs(model, batch), not model_inputs(batch)")
    out = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in NON_MODEL_KEYS}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def count_images(batch: dict[str, Any]) -> int:
    """Images in a collated batch: one row of image_grid_thw / image_sizes, or of pixel_values, per image (Llama 3.2
    Vision: the non-zero ``aspect_ratio_ids``; its pixel_values have one row per batch row)."""
    if isinstance(batch.get("aspect_ratio_ids"), torch.Tensor):
        return int((batch["aspect_ratio_ids"] != 0).sum())
    for key in ("image_grid_thw", "image_sizes"):
        if isinstance(batch.get(key), torch.Tensor):
            return int(batch[key].shape[0])
    pv = batch.get("pixel_values")
    return int(pv.shape[0]) if isinstance(pv, torch.Tensor) and pv.dim() >= 4 else 0


def decoder_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor],
                          labels: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden state (B, T, H) of the multimodal decoder (``hf_model.model``), without the lm_head."""
    inner = unwrap_model(model).model
    kwargs = dict(inputs)
    if labels is not None and "labels" in inspect.signature(inner.forward).parameters:
        kwargs["labels"] = labels  # Gemma 3 builds its bidirectional image mask from labels in training
    out = inner(**kwargs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
