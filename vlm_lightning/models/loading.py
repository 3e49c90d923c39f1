"""Load a vision-language model and its processor: 16-bit, or 4-/8-bit bitsandbytes on the language model only.

Quantisation touches only the language model's linear layers. The vision tower, the projector and the
lm_head stay in 16 bits: they are small, and quantising them is a known way to get nonsense from a VLM
(unsloth#1347). The skip list is built from the family table (``vlm_lightning.models.families``) and always
keeps ``lm_head``: a user skip list that replaces transformers' defaults would otherwise drop it
(transformers#45674).

``name_or_path`` may be a hub id, a local directory, or ``tiny:<name>[@<dir>]``: a small random-weight model
from the tiny zoo (``vlm_lightning.models.tiny``), built on first use. The demo presets and the zoo live
there, not here.

Example:
    >>> model, processor = load_vlm("Qwen/Qwen2.5-VL-7B-Instruct", quantization="4bit")
    >>> model, processor = load_vlm("tiny:qwen2_vl", dtype="float32")      # CPU tests and the demo
"""
from __future__ import annotations

import os
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from .families import get_family_spec
from .hf import resolve_dtype
from .tiny import resolve_model_path

Quantization = Literal["4bit", "8bit"] | None


def quantization_skip_modules(family_spec) -> list[str]:
    """Module paths kept in 16 bits under 4-/8-bit loading: vision tower, projector, lm_head.

    transformers skips a module when a pattern is its dotted path (or a prefix of it at a module boundary),
    in every 5.x version; plain dotted paths are used so the saved ``quantization_config`` stays readable.
    """
    skip = [family_spec.vision_tower, family_spec.projector, family_spec.lm_head]
    # the projector may sit inside the vision tower (Qwen's ``model.visual.merger``): keep both anyway
    return list(dict.fromkeys(s for s in skip if s))


def build_quantization_config(quantization: Quantization, family_spec=None, compute_dtype="bfloat16",
                              quant_type: str = "nf4", double_quant: bool = True, quant_storage=None,
                              skip_modules: list[str] | None = None):
    """A ``BitsAndBytesConfig`` quantising only the language model's linear layers (or None for 16-bit).

    Args:
        quantization: "4bit" (NF4, double quantisation, 16-bit compute), "8bit" (LLM.int8) or None.
        family_spec: the ``FamilySpec`` whose vision tower / projector / lm_head are skipped.
        compute_dtype: the 4-bit matmul dtype (bf16 by default).
        quant_storage: the dtype the packed 4-bit weights are stored in; set it to the compute dtype for
            FSDP, which cannot flatten uint8 next to bf16 parameters (peft#1432).
        skip_modules: extra module paths to keep 16-bit (added to the family's, never replacing them).

    Example:
        >>> cfg = build_quantization_config("4bit", get_family_spec("qwen2_vl"), quant_storage="bfloat16")
    """
    if quantization is None or quantization in ("none", "None", ""):
        return None

    skip = quantization_skip_modules(family_spec) if family_spec is not None else ["lm_head"]
    skip = list(dict.fromkeys(skip + list(skip_modules or [])))
    if quantization == "4bit":
        kwargs = {}
        if quant_storage is not None:
            kwargs["bnb_4bit_quant_storage"] = resolve_dtype(quant_storage)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=resolve_dtype(compute_dtype),
                                  llm_int8_skip_modules=skip, **kwargs)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"quantization={quantization!r}: use None, '4bit' or '8bit'")


def load_vlm(name_or_path: str | os.PathLike, quantization: Quantization = None, dtype: str | torch.dtype = "bfloat16",
             attn_implementation: str | None = None, trust_remote_code: bool = False, device_map: Any = None,
             bnb_4bit_quant_storage: str | None = None, **processor_kwargs):
    """Build ``(model, processor)`` with ``AutoModelForImageTextToText`` + ``AutoProcessor``.

    Args:
        name_or_path: hub id, local directory, or ``tiny:<name>[@<dir>]`` (see the module docstring).
        quantization: None (16-bit), "4bit" (NF4 + double quant, compute in ``dtype``) or "8bit";
            only the language model's linears are quantised.
        dtype: weight dtype of everything not quantised (and the 4-bit compute dtype).
        attn_implementation: "sdpa", "eager", "flash_attention_2", ... (None: transformers' default).
        device_map: passed to ``from_pretrained``; for 4/8-bit on a GPU give ``{"": device}`` so
            weights are quantised while loading.
        bnb_4bit_quant_storage: storage dtype of packed 4-bit weights (set to ``dtype`` for FSDP).
        **processor_kwargs: forwarded to ``AutoProcessor.from_pretrained`` (e.g. ``min_pixels``).

    Example:
        >>> model, processor = load_vlm("Qwen/Qwen2-VL-2B-Instruct", quantization="4bit", device_map={"": 0})
    """
    path = resolve_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization:
        spec = get_family_spec(config)
        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        kwargs["quantization_config"] = build_quantization_config(
            quantization, spec, compute_dtype=compute, quant_storage=bnb_4bit_quant_storage)
        if device_map is None:
            kwargs["device_map"] = _default_quantized_device_map()
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **processor_kwargs)
    return model, processor


def _default_quantized_device_map():
    """bitsandbytes quantises weights as they land on their device: the current GPU, else the CPU."""
    default = torch.get_default_device()
    if default.type == "cuda":
        return {"": default}
    if torch.cuda.is_available():
        return {"": torch.cuda.current_device()}
    return {"": "cpu"}
