"""Models: the family table, loading, LoRA, kernel patching, speed levers, the tiny zoo (``models.tiny``).

Example:
    >>> from vlm_lightning.models import apply_lora, load_vlm
    >>> model = apply_lora(load_vlm("tiny:qwen2_vl", dtype="float32")[0], r=8)
"""

from .families import FAMILIES, FamilySpec, get_family_spec
from .loading import build_quantization_config, load_vlm, quantization_skip_modules
from .lora import (
    apply_lora,
    build_target_regex,
    enable_gradient_checkpointing,
    prepare_full_finetune,
    select_lora_modules,
)

__all__ = [
    "FAMILIES", "FamilySpec", "apply_lora", "build_quantization_config", "build_target_regex",
    "enable_gradient_checkpointing", "get_family_spec", "load_vlm", "prepare_full_finetune",
    "quantization_skip_modules", "select_lora_modules",
]
