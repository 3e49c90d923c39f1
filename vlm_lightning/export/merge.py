"""Merge a LoRA adapter into 16-bit base weights (or apply a full fine-tune's weights) and write a
standalone transformers folder.

The merge never happens on quantised weights when it can be avoided: with a 4-bit (or 8-bit) base, the
original 16-bit weights are reloaded from `name_or_path` and the adapter goes on top of those (merging
onto dequant(W4) would bake the quantisation error into every merged layer). Only when no 16-bit source
can be found does it dequantise the in-memory base, with a warning. The base is always loaded as the stock
transformers class and refused when a weight was missing from its files (see `base_weights.py`).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict

from vlm_lightning.models.hf import resolve_dtype
from vlm_lightning.models.tiny import resolve_model_path

from .atomic import atomic_dir, inside
from .base_weights import clean_merged_config, load_base_16bit, stock_model_class
from .checkpoint import is_deepspeed_checkpoint, source_from_checkpoint
from .hub import push_folder
from .source import (
    ADAPTER_CONFIG,
    ExportSource,
    is_peft_model,
    is_transformers_model,
    load_processor,
    source_from_adapter_dir,
    source_from_full_model,
    source_from_peft_model,
)

__all__ = ["merge_lora", "merge_lora_into", "apply_full_weights", "check_finite", "resolve_source"]


def _dtype(dtype) -> torch.dtype:
    """The merged weights' dtype (``models.hf.resolve_dtype``); "auto" is refused: the files need one."""
    value = resolve_dtype(dtype) if dtype not in (None, "auto") else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: use one of bfloat16, float16, float32")
    return value


def resolve_source(obj, base_name_or_path: str | None = None, processor=None) -> ExportSource:
    """Accept a `PeftModel`, a module whose `.model` is a `PeftModel` (LoRA) or a transformers model (full
    fine-tune), an adapter folder or a Lightning `.ckpt`."""
    src = _resolve(obj, base_name_or_path, processor)
    if src.base_name_or_path:  # tiny:<name> -> its folder
        src.base_name_or_path = resolve_model_path(src.base_name_or_path)
    return src


def _resolve(obj, base_name_or_path: str | None, processor) -> ExportSource:
    inner = getattr(obj, "model", None)
    if is_peft_model(obj):
        return source_from_peft_model(obj, processor, base_name_or_path)
    if inner is not None and is_peft_model(inner):
        return source_from_peft_model(inner, processor or getattr(obj, "processor", None), base_name_or_path)
    if inner is not None and is_transformers_model(inner):
        return source_from_full_model(inner, processor or getattr(obj, "processor", None), base_name_or_path)
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
            src = source_from_adapter_dir(path, base_name_or_path)
        elif (path.is_file() and path.suffix == ".ckpt") or is_deepspeed_checkpoint(path):
            src = source_from_checkpoint(path, base_name_or_path)
        elif path.is_dir() and (path / "config.json").is_file():
            raise ValueError(f"{path} is a full model folder with no LoRA adapter (no {ADAPTER_CONFIG}): "
                             "nothing to merge")
        else:
            raise FileNotFoundError(f"{path}: expected an adapter folder (with {ADAPTER_CONFIG}), a Lightning .ckpt "
                                    "file or a DeepSpeed checkpoint folder (with checkpoint/)")
        if processor is not None:
            src.processor = processor
        return src
    raise TypeError(
        f"cannot merge from {type(obj).__name__}: pass a PeftModel, a module with a PeftModel or transformers "
        "`.model`, an adapter folder or a .ckpt"
    )


def check_finite(model_or_state_dict) -> None:
    """Raise `ValueError` naming the first tensor that holds NaN or Inf."""
    sd = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    items = sd.items()
    for name, t in items:
        if t.is_floating_point() and not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"merged weight {name!r} has {n_bad} NaN/Inf values: the adapter is broken, "
                             "nothing was written")


def apply_full_weights(base_model, src: ExportSource):
    """Copy a full fine-tune's trained weights onto `base_model`; every one of them must land (a key the
    base lacks, or a wrong shape, raises). Returns `base_model`."""
    sd = src.full_state_dict or {}
    if not sd:
        raise ValueError(f"{src.origin} holds no trained weights")
    missing, unexpected = base_model.load_state_dict(sd, strict=False)
    if unexpected:
        raise RuntimeError(f"{len(unexpected)} trained weight(s) from {src.origin} do not exist in the base "
                           f"{src.base_name_or_path!r}, e.g. {sorted(unexpected)[:3]}; nothing was written")
    base_model.tie_weights()
    return base_model


def merge_lora_into(base_model, src: ExportSource, safe: bool = True):
    """Put the adapter of `src` onto `base_model` (plain transformers model) and merge it; returns the
    merged plain model. `safe=True` makes PEFT check every merged layer for NaN/Inf and then checks all
    weights once more."""
    cfg = copy.deepcopy(src.peft_config)
    cfg.inference_mode = True
    # PiSSA/OLoRA/LoftQ initialisations rewrite the base weights at injection: inject plainly, the saved
    # adapter weights then replace the fresh ones.
    if getattr(cfg, "init_lora_weights", True) not in (True, False):
        cfg.init_lora_weights = True
    peft_model = PeftModel(base_model, cfg, adapter_name="default")
    result = set_peft_model_state_dict(peft_model, src.adapter_state_dict, adapter_name="default")
    lora_missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if lora_missing or getattr(result, "unexpected_keys", None):
        raise RuntimeError(
            f"adapter from {src.origin} does not fit the base {src.base_name_or_path!r}: "
            f"missing {lora_missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
        )
    try:
        merged = peft_model.merge_and_unload(safe_merge=safe)
    except ValueError as err:
        if "NaN" in str(err) or "nan" in str(err):
            raise ValueError(f"merging the adapter from {src.origin} gives NaN/Inf weights ({err}); "
                             "nothing was written") from err
        raise
    if safe:
        check_finite(merged)
    return merged


def merge_lora(
    model_or_adapter_dir,
    out_dir: str | Path,
    base_name_or_path: str | None = None,
    max_shard_size: str | int = "2GB",
    dtype: str | torch.dtype = "bfloat16",
    safe: bool = True,
    processor=None,
    push_to_hub: str | None = None,
    private: bool = True,
) -> Path:
    """Write `out_dir` with the LoRA merged into the 16-bit base (or a full fine-tune's weights applied to it):
    sharded safetensors, config (the stock class in `architectures`), generation config, processor,
    tokenizer and chat template.

    `model_or_adapter_dir` is a `PeftModel`, a LightningModule whose `.model` is one or a fully fine-tuned
    transformers model (its `.processor` is saved too), a `PeftModel.save_pretrained` folder or a Lightning
    `.ckpt` (LoRA or full). `base_name_or_path` overrides the base recorded in the adapter / checkpoint. A
    base whose files lack a weight is refused (`BaseWeightsMissing`) before anything is written. `safe=True`
    raises on NaN/Inf in the merged weights (before anything is written). The folder is written under a
    temporary name beside `out_dir` and renamed when complete (`export.atomic`). `push_to_hub="user/repo"` uploads the
    folder afterwards (token from `HF_TOKEN`); when the upload fails the folder stays on disk and the error says
    where it is.

    Example:
        >>> merge_lora("runs/demo/adapter", "runs/demo/merged", dtype="bfloat16")  # doctest: +SKIP
        PosixPath('runs/demo/merged')
    """
    out = Path(out_dir)
    for name, given in (("checkpoint", model_or_adapter_dir), ("base", base_name_or_path)):
        if isinstance(given, (str, Path)) and Path(given).exists() and inside(given, out):
            raise ValueError(f"{name} {given} is inside out_dir {out}, which the merge replaces as a whole: "
                             "write the merged folder elsewhere")
    torch_dtype = _dtype(dtype)
    src = resolve_source(model_or_adapter_dir, base_name_or_path, processor)
    proc = load_processor(src)  # fail before the (slow) merge when the folder could not be complete
    in_memory = None
    if src.model is not None:
        in_memory = src.model.get_base_model() if hasattr(src.model, "get_base_model") else src.model
    base, how = load_base_16bit(src.base_name_or_path, torch_dtype, in_memory)
    if src.is_full:
        merged = apply_full_weights(base, src)
        if safe:
            check_finite(merged)
    else:
        merged = merge_lora_into(base, src, safe=safe)
    clean_merged_config(merged)
    merged.config.use_cache = True
    merged.config.architectures = [stock_model_class(merged).__name__]
    with atomic_dir(out) as tmp:  # an interrupted merge leaves no folder under the final name
        merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        proc.save_pretrained(tmp)
        _copy_generation_config(src, tmp)
        (tmp / "merge_info.json").write_text(json.dumps({
            "base": src.base_name_or_path, "adapter": src.origin, "kind": "full" if src.is_full else "lora",
            "base_weights": how, "dtype": str(torch_dtype).replace("torch.", ""),
            "lora_r": getattr(src.peft_config, "r", None),
            "target_modules": _jsonable(getattr(src.peft_config, "target_modules", None)),
            "processor_kwargs": src.processor_kwargs,
        }, indent=2, default=str))
    del merged, base
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, commit_message="Upload merged model (vlm-lightning)")
    return out


def _jsonable(x):
    return sorted(x) if isinstance(x, (set, list, tuple)) else x


def _copy_generation_config(src: ExportSource, out: Path) -> None:
    """save_pretrained only writes generation_config.json for models that can generate: make sure the
    base's is there (it carries the eos ids that stop generation)."""
    if (out / "generation_config.json").exists():
        return
    base = src.base_name_or_path
    if base and (Path(base) / "generation_config.json").is_file():
        shutil.copy(Path(base) / "generation_config.json", out / "generation_config.json")
    elif src.model is not None and getattr(src.model, "generation_config", None) is not None:
        src.model.generation_config.save_pretrained(out)
