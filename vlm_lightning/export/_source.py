"""Find what an export starts from: a PEFT model in memory, a LightningModule, an adapter folder or a
Lightning checkpoint, and the 16-bit base weights and processor that belong to it.

Shared by `merge.py`, the callbacks and `cli.py`; nothing here writes files.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSource:
    """Everything a merge needs, wherever it came from.

    `adapter_state_dict` holds PEFT keys without the adapter name (as `get_peft_model_state_dict` returns
    them), on the CPU. `model` is the in-memory PEFT model when there is one (its base may be 4-bit).
    """

    peft_config: Any
    adapter_state_dict: dict[str, torch.Tensor]
    base_name_or_path: str | None
    model: Any = None
    processor: Any = None
    adapter_dir: Path | None = None
    origin: str = ""
    extra: dict = field(default_factory=dict)


def _is_peft_model(obj) -> bool:
    from peft import PeftModel

    return isinstance(obj, PeftModel)


def _name_or_path_of(model) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return name or None


def lora_source_from_model(model, processor=None, base_name_or_path: str | None = None) -> LoraSource:
    """Collect the active adapter of an in-memory `PeftModel` (weights copied to CPU)."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    cfg = model.peft_config[name]
    sd = get_peft_model_state_dict(model, adapter_name=name)
    sd = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
    base = base_name_or_path or cfg.base_model_name_or_path or _name_or_path_of(model.get_base_model())
    return LoraSource(copy.deepcopy(cfg), sd, base, model=model, processor=processor, origin="in-memory PEFT model")


def lora_source_from_adapter_dir(path: Path, base_name_or_path: str | None = None) -> LoraSource:
    """Read a `PeftModel.save_pretrained` folder (adapter_config.json + adapter weights)."""
    from peft import PeftConfig, load_peft_weights

    cfg = PeftConfig.from_pretrained(str(path))
    sd = load_peft_weights(str(path), device="cpu")
    base = base_name_or_path or cfg.base_model_name_or_path
    if not base:
        raise ValueError(
            f"{path / ADAPTER_CONFIG} names no base_model_name_or_path: pass base_name_or_path= (or --base)"
        )
    return LoraSource(cfg, sd, base, adapter_dir=path, origin=f"adapter folder {path}")


def lora_source_from_checkpoint(path: Path, base_name_or_path: str | None = None) -> LoraSource:
    """A Lightning `.ckpt` of `VisionSFTModule`: rebuild the module from its hyperparameters, load the
    (trainable-only) state dict, and read the adapter out of it."""
    from ..modules import VisionSFTModule  # imported late: the modules package pulls in Lightning

    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if base_name_or_path:
        hparams["model_name_or_path"] = base_name_or_path
    if not hparams.get("model_name_or_path"):
        raise ValueError(f"checkpoint {path} has no model_name_or_path hyperparameter: pass --base")
    # The merge reloads 16-bit weights itself, so never build the 4-bit model for this.
    for key in ("quantization", "load_in_4bit"):
        if key in hparams:
            hparams[key] = None if key == "quantization" else False
    module = VisionSFTModule(**hparams)
    module.configure_model()
    state = ckpt.get("state_dict") or {}
    missing, unexpected = module.load_state_dict(state, strict=False)
    lora_keys = [k for k in state if "lora_" in k or "modules_to_save" in k]
    if not lora_keys:
        raise ValueError(f"checkpoint {path} holds no LoRA weights (keys like '*.lora_A.*')")
    if unexpected:
        raise ValueError(f"checkpoint {path} has keys the rebuilt model lacks, e.g. {unexpected[:3]}")
    src = lora_source_from_model(module.model, getattr(module, "processor", None), hparams["model_name_or_path"])
    src.origin = f"Lightning checkpoint {path}"
    return src


def resolve_lora_source(obj, base_name_or_path: str | None = None, processor=None) -> LoraSource:
    """Accept a `PeftModel`, a LightningModule whose `.model` is one, an adapter folder or a `.ckpt`."""
    if _is_peft_model(obj):
        return lora_source_from_model(obj, processor, base_name_or_path)
    inner = getattr(obj, "model", None)
    if inner is not None and _is_peft_model(inner):
        return lora_source_from_model(inner, processor or getattr(obj, "processor", None), base_name_or_path)
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
            src = lora_source_from_adapter_dir(path, base_name_or_path)
        elif path.is_file() and path.suffix == ".ckpt":
            src = lora_source_from_checkpoint(path, base_name_or_path)
        elif path.is_dir() and (path / "config.json").is_file():
            raise ValueError(f"{path} is a full model folder with no LoRA adapter (no {ADAPTER_CONFIG}): nothing to merge")
        else:
            raise FileNotFoundError(f"{path}: expected an adapter folder (with {ADAPTER_CONFIG}) or a Lightning .ckpt")
        if processor is not None:
            src.processor = processor
        return src
    raise TypeError(
        f"cannot merge from {type(obj).__name__}: pass a PeftModel, a module with a PeftModel `.model`, "
        "an adapter folder or a .ckpt"
    )


# ----------------------------------------------------------------------------------------------------
# base weights


def quantization_of_source(name_or_path: str) -> str | None:
    """'16bit' when `name_or_path` holds unquantised weights, 'quantized' for a pre-quantised checkpoint,
    None when its config cannot be read (missing folder, hub id while offline)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # not found / offline / not a model
        warnings.warn(f"cannot read a config from {name_or_path!r} ({type(err).__name__}: {err})", stacklevel=3)
        return None
    return "quantized" if getattr(cfg, "quantization_config", None) else "16bit"


def is_quantized(model) -> bool:
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    return getattr(getattr(model, "config", None), "quantization_config", None) is not None


def model_class_for(model=None, name_or_path: str | None = None):
    """The `*ForConditionalGeneration` class to rebuild: the in-memory one, else `architectures[0]`."""
    import transformers

    if model is not None:
        return type(model)
    if name_or_path:
        from transformers import AutoConfig

        archs = getattr(AutoConfig.from_pretrained(name_or_path), "architectures", None) or []
        if archs and hasattr(transformers, archs[0]):
            return getattr(transformers, archs[0])
    return transformers.AutoModelForImageTextToText


def dequantized_base_state_dict(base_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base weights of a (possibly bitsandbytes-quantised, possibly PEFT-wrapped) model in `dtype`.

    LoRA tensors are dropped; PEFT wrappers' `base_layer.` / `original_module.` levels are folded back,
    so the keys are the plain transformers ones.
    """
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in base_model.named_modules():
        if ".modules_to_save." in f".{mod_name}." or ".lora_" in f".{mod_name}" or mod_name.split(".")[-1].startswith("lora_"):
            continue
        for pname, param in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if "lora_" in full or ".modules_to_save." in full:
                continue
            if pname in getattr(module, "_non_persistent_buffers_set", set()):
                continue
            key = full.replace(".base_layer.", ".").replace(".original_module.", ".")
            out[key] = _dequantize(param, module).to("cpu", dtype if param.is_floating_point() or _is_bnb(param) else None)
    return out


def _is_bnb(param) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def _dequantize(param, module) -> torch.Tensor:
    kind = type(param).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as F

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


def load_processor(src: LoraSource):
    """The processor to save next to the merged weights: the module's, the adapter folder's, the base's."""
    if src.processor is not None:
        return src.processor
    from transformers import AutoProcessor

    tried = []
    for place in (src.adapter_dir, src.base_name_or_path):
        if place is None:
            continue
        try:
            proc = AutoProcessor.from_pretrained(str(place))
        except (OSError, ValueError, TypeError, KeyError) as err:
            tried.append(f"{place} ({type(err).__name__})")
            continue
        if getattr(proc, "image_processor", None) is not None or not hasattr(proc, "tokenizer"):
            return proc
        tried.append(f"{place} (tokenizer only)")
    raise ValueError(
        "no processor found for the merged model (tried " + ", ".join(tried or ["nothing"]) + "): "
        "a merged VLM folder without its processor cannot be used; pass processor="
    )


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
