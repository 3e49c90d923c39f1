"""What an export starts from: an ``ExportSource`` from a PEFT model in memory (or a module holding one), a
fully fine-tuned model, or an adapter folder, and the processor that belongs to it. A Lightning checkpoint
is read by ``checkpoint.py``; ``merge.resolve_source`` picks the reader. Merge internals (base weights,
dequantisation, config cleaning) are ``base_weights.py``'s.

Shared by `merge.py`, the callbacks and `cli.py`; nothing here writes files. Nothing here imports
``vlm_lightning.modules``: a module is read through its attributes (``.model``, ``.processor``), a checkpoint
through its ``vlm_lightning`` block.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, load_peft_weights
from transformers import PreTrainedModel

from vlm_lightning.data.datamodule import build_processor

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ExportSource:
    """Everything a merge needs, wherever it came from.

    LoRA: `peft_config` and `adapter_state_dict` (PEFT keys without the adapter name, as
    `get_peft_model_state_dict` returns them, on the CPU). Full fine-tune: `peft_config` is None and
    `full_state_dict` holds the trained weights by transformers key (applied onto the base, strictly).
    `model` is the in-memory model when there is one (its base may be 4-bit, its classes patched).
    `processor_kwargs` rebuild the training processor from the base when no `processor` is given.
    """

    peft_config: Any
    adapter_state_dict: dict[str, torch.Tensor]
    base_name_or_path: str | None
    model: Any = None
    processor: Any = None
    adapter_dir: Path | None = None
    origin: str = ""
    processor_kwargs: dict = field(default_factory=dict)
    full_state_dict: dict[str, torch.Tensor] | None = None

    @property
    def is_full(self) -> bool:
        return self.peft_config is None


def is_peft_model(obj) -> bool:
    return isinstance(obj, PeftModel)


def is_transformers_model(obj) -> bool:
    return isinstance(obj, PreTrainedModel)


def _name_or_path_of(model) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return name or None


def source_from_peft_model(model, processor=None, base_name_or_path: str | None = None) -> ExportSource:
    """The active adapter of an in-memory `PeftModel` (weights copied to CPU)."""
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    cfg = model.peft_config[name]
    sd = get_peft_model_state_dict(model, adapter_name=name)
    sd = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
    base = base_name_or_path or cfg.base_model_name_or_path or _name_or_path_of(model.get_base_model())
    return ExportSource(copy.deepcopy(cfg), sd, base, model=model, processor=processor, origin="in-memory PEFT model")


def source_from_full_model(model, processor=None, base_name_or_path: str | None = None) -> ExportSource:
    """A fully fine-tuned in-memory transformers model: all its weights, applied onto the reloaded base."""
    sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return ExportSource(None, {}, base_name_or_path or _name_or_path_of(model), model=model, processor=processor,
                        origin="in-memory fully fine-tuned model", full_state_dict=sd)


def source_from_adapter_dir(path: Path, base_name_or_path: str | None = None) -> ExportSource:
    """Read a `PeftModel.save_pretrained` folder (adapter_config.json + adapter weights)."""
    cfg = PeftConfig.from_pretrained(str(path))
    sd = load_peft_weights(str(path), device="cpu")
    base = base_name_or_path or cfg.base_model_name_or_path
    if not base:
        raise ValueError(
            f"{path / ADAPTER_CONFIG} names no base_model_name_or_path: pass base_name_or_path= (or --base)"
        )
    return ExportSource(cfg, sd, base, adapter_dir=path, origin=f"adapter folder {path}")


def load_processor(src: ExportSource):
    """The processor to save next to the merged weights: the one given (the module's, which is the data
    module's), the adapter folder's, else the base's rebuilt with the recorded `processor_kwargs`."""
    if src.processor is not None:
        return src.processor
    tried = []
    places = [(src.adapter_dir, {}), (src.base_name_or_path, src.processor_kwargs)]
    for place, kwargs in places:
        if place is None:
            continue
        try:
            proc = build_processor(str(place), **kwargs)
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
