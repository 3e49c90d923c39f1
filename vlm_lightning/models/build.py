"""``build_model``: the one recipe both LightningModules compose: load -> kernels -> LoRA (or all weights
trainable) -> speed levers -> train mode.

The order matters: kernels patch the HF modules before PEFT wraps them (LoRA layers inside the patched MLP
and attention keep working); the levers act on the wrapped model (they look for LoRA layers). What this
leaves out: anything about training (losses, optimizers, checkpoints): those are the modules'.

Example:
    >>> model, processor = build_model("tiny:qwen2_vl", dtype="float32", lora={"r": 8})
    >>> model.print_trainable_parameters()
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from vlm_lightning.models.levers import apply_speed_levers, parse_checkpointing
from vlm_lightning.models.loading import load_vlm
from vlm_lightning.models.lora import apply_lora, prepare_full_finetune
from vlm_lightning.models.patch import apply_kernels
from vlm_lightning.models.vision_attention import batch_vision_windows

__all__ = ["build_model"]

log = logging.getLogger(__name__)


def build_model(model_name_or_path: str, *, quantization: str | None = None, dtype: str = "bfloat16",
                attn_implementation: str | None = None, trust_remote_code: bool = False,
                bnb_4bit_quant_storage: str | None = None, use_kernels: bool = False,
                lora: dict[str, Any] | None = None, gradient_checkpointing: bool | str = True,
                frozen_vision_no_grad: bool = False, fused_lora: bool = False,
                compile_layers: bool | str = False) -> tuple[nn.Module, Any]:
    """Load a VLM and make it trainable.

    Args:
        model_name_or_path, quantization, dtype, attn_implementation, trust_remote_code, bnb_4bit_quant_storage:
            see ``models.loading.load_vlm``.
        use_kernels: swap in the fused Triton ops (``models.patch.apply_kernels``) before LoRA, and batch the
            Qwen-VL vision windows (``models.vision_attention.batch_vision_windows``).
        lora: keyword arguments of ``models.lora.apply_lora`` (r, lora_alpha, finetune_*...), or None to
            train every weight (full fine-tune).
        gradient_checkpointing: True/"full", False/"none", "lean", "offload" (``models.checkpointing``), or a
            selective mode ("mlp", "attention", "every_N") of ``models.levers.set_checkpointing_mode``.
        frozen_vision_no_grad, fused_lora, compile_layers: the levers of ``models.levers.apply_speed_levers``.
    Returns:
        (model in train mode: a PeftModel, or the HF model for a full fine-tune; its processor).
    """
    checkpointing = parse_checkpointing(gradient_checkpointing)
    model, processor = load_vlm(model_name_or_path, quantization=quantization, dtype=dtype,
                                attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                                bnb_4bit_quant_storage=bnb_4bit_quant_storage)
    if use_kernels:
        apply_kernels(model)
        batch_vision_windows(model)  # Qwen-VL vision windows: one SDPA call per run of equal-length windows
    if lora is not None:
        model = apply_lora(model, gradient_checkpointing=checkpointing != "none", **lora)
    else:
        model = prepare_full_finetune(model, gradient_checkpointing=checkpointing != "none")
    if frozen_vision_no_grad or fused_lora or compile_layers or checkpointing not in ("full", "none"):
        apply_speed_levers(model, frozen_vision_no_grad=frozen_vision_no_grad, fused_lora=fused_lora,
                           gradient_checkpointing=checkpointing, compile_layers=compile_layers)
    model.train()  # from_pretrained returns eval mode: no dropout, and HF skips checkpointing in eval
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("build_model: %s trainable of %s parameters", f"{n_train:,}", f"{n_all:,}")
    return model, processor
