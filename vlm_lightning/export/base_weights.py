"""The 16-bit base weights a merge starts from, loaded as the stock transformers class.

Training may have swapped module classes (``use_kernels``: ``Fused<Name>`` subclasses); reloading through such
a class makes transformers miss its checkpoint key mapping, so weights come out freshly initialised. Here
the class is always the stock one (from the config's model type, or the first transformers class in an
in-memory model's MRO), and a base weight that was not read from the files is an error, never a silent
random tensor.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from vlm_lightning.models.hf import is_quantized
from vlm_lightning.models.patch import unpatched_class

__all__ = [
    "BaseWeightsMissing", "stock_model_class", "load_base_16bit", "check_base_loaded", "quantization_of_source",
    "dequantized_base_state_dict", "clean_merged_config", "write_stock_architectures",
]


class BaseWeightsMissing(RuntimeError):
    """Some base weights were not in the base's files: merging would write freshly initialised tensors."""


def stock_model_class(model=None, config=None):
    """The stock transformers ``*ForConditionalGeneration`` class for an in-memory model (patched subclasses
    such as ``FusedQwen2_5_VLForConditionalGeneration`` are stripped) or for a config.

    Example:
        >>> stock_model_class(config=AutoConfig.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")).__name__
        'Qwen2_5_VLForConditionalGeneration'
    """
    if model is not None:
        for cls in unpatched_class(model).__mro__:  # our swaps keep transformers' module name: skip them first
            if cls.__module__.startswith("transformers."):
                return cls
        raise TypeError(f"{type(model).__name__} is not a transformers model class or a subclass of one")
    try:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    except KeyError:
        pass
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"no transformers image-text-to-text class for model_type {getattr(config, 'model_type', None)!r} "
                     f"(architectures {getattr(config, 'architectures', None)})")


def write_stock_architectures(directory: str | Path, model) -> None:
    """Rewrite ``config.json``'s ``architectures`` with the stock class name (``save_pretrained`` writes the
    in-memory class's name, ``Fused...`` after ``apply_kernels``)."""
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = [stock_model_class(model).__name__]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def quantization_of_source(name_or_path: str) -> str | None:
    """'16bit' when `name_or_path` holds unquantised weights, 'quantized' for a pre-quantised checkpoint,
    None when its config cannot be read (missing folder, hub id while offline)."""
    try:
        cfg = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # not found / offline / not a model
        warnings.warn(f"cannot read a config from {name_or_path!r} ({type(err).__name__}: {err})", stacklevel=3)
        return None
    return "quantized" if getattr(cfg, "quantization_config", None) else "16bit"


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


def check_base_loaded(model, info: dict, name_or_path: str) -> None:
    """Raise `BaseWeightsMissing` when `from_pretrained` had to initialise any weight (tied copies excepted)
    or found one with the wrong shape."""
    tied = _tied_keys(model)
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        unexpected = sorted(info.get("unexpected_keys", ()))
        raise BaseWeightsMissing(
            f"base {name_or_path!r} ({type(model).__name__}) does not hold {len(missing)} weight(s) the model needs, "
            f"e.g. {missing[:5]}" + (f"; shape mismatches {mismatched[:3]}" if mismatched else "")
            + (f"; unused keys in the files, e.g. {unexpected[:3]}" if unexpected else "")
            + ". Refusing to merge: those weights would be random. Point --base / base_name_or_path at the "
              "original 16-bit weights."
        )


def load_base_16bit(name_or_path: str | None, dtype: torch.dtype, in_memory=None):
    """The unquantised base in `dtype` on CPU as the stock class, and how it was obtained: 'reloaded' from
    `name_or_path`, else 'dequantized'/'copied' from the in-memory base model (PEFT-free)."""
    kind = quantization_of_source(name_or_path) if name_or_path else None
    if kind == "16bit":
        cls = stock_model_class(in_memory) if in_memory is not None else \
            stock_model_class(config=AutoConfig.from_pretrained(name_or_path))
        model, info = cls.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True)
        check_base_loaded(model, info, name_or_path)
        return model.eval(), "reloaded"
    if in_memory is None:
        raise ValueError(
            f"no 16-bit base weights: {name_or_path!r} is "
            + ("a pre-quantised checkpoint" if kind == "quantized" else "not readable")
            + " and there is no in-memory model; pass base_name_or_path= (--base) pointing at the 16-bit weights"
        )
    how = "dequantized" if is_quantized(in_memory) else "copied"
    if how == "dequantized":
        warnings.warn(
            f"no 16-bit source for the base ({name_or_path!r}); merging into the dequantised 4/8-bit weights, which "
            "adds the quantisation error to every merged layer. Pass base_name_or_path= with the 16-bit weights.",
            stacklevel=3,
        )
    return _rebuild_from_memory(in_memory, dtype), how


def _rebuild_from_memory(base_model, dtype: torch.dtype):
    config = base_model.config.__class__.from_dict(base_model.config.to_dict())
    clean_merged_config(type("_Holder", (), {"config": config})())
    sd = dequantized_base_state_dict(base_model, dtype)
    with torch.device("meta"):
        model = stock_model_class(base_model)._from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise BaseWeightsMissing(f"rebuilding the base from memory failed: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    model.tie_weights()
    if hasattr(base_model, "generation_config") and base_model.generation_config is not None:
        model.generation_config = base_model.generation_config
    # non-persistent buffers (rotary inv_freq) are not in any state dict: take them from the live model
    live = {k.replace(".base_layer.", "."): v for k, v in base_model.named_buffers()}
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if name not in live:
                raise BaseWeightsMissing(f"buffer {name} was not restored while rebuilding the base")
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            persistent = attr not in getattr(mod, "_non_persistent_buffers_set", set())
            mod.register_buffer(attr, live[name].detach().to("cpu", copy=True), persistent=persistent)
    return model.eval()


def dequantized_base_state_dict(base_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base weights of a (possibly bitsandbytes-quantised, possibly PEFT-wrapped) model in `dtype`.

    LoRA tensors are dropped; PEFT wrappers' `base_layer.` / `original_module.` levels are folded back,
    so the keys are the plain transformers ones.
    """
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in base_model.named_modules():
        leaf = mod_name.split(".")[-1]
        if ".modules_to_save." in f".{mod_name}." or ".lora_" in f".{mod_name}" or leaf.startswith("lora_"):
            continue
        for pname, param in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if "lora_" in full or ".modules_to_save." in full:
                continue
            if pname in getattr(module, "_non_persistent_buffers_set", set()):
                continue
            key = full.replace(".base_layer.", ".").replace(".original_module.", ".")
            cast = dtype if param.is_floating_point() or _is_bnb(param) else None
            out[key] = _dequantize(param, module).to("cpu", cast)
    return out


def _is_bnb(param) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def _dequantize(param, module) -> torch.Tensor:
    kind = type(param).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as F  # optional dependency: only 4-bit bases need it

        return F.dequantize_4bit(param.data, param.quant_state).float()
    if kind == "Int8Params":
        scb = getattr(param, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None or param.dtype != torch.int8:
            return param.data.float()
        return param.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return param.data


def clean_merged_config(model) -> None:
    """Drop the quantisation traces a 4-bit training run leaves in the config."""
    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if attr in vars(model):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
