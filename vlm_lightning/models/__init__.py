"""Model loading, LoRA and the per-family table."""

from .families import FAMILIES, FamilySpec, get_family_spec
from .loading import TINY_PRESETS, build_quantization_config, load_vlm, quantization_skip_modules, resolve_model_path
from .lora import (
    apply_lora,
    build_target_regex,
    enable_gradient_checkpointing,
    prepare_full_finetune,
    select_lora_modules,
)
