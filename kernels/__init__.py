"""Fused Triton kernels, installed as ``vlm_lightning.kernels`` (never as a top-level ``kernels``).

Each op: Triton kernel(s) -> launcher -> ``torch.autograd.Function`` -> a function below; the torch
references live in ``vlm_lightning.kernels.reference``. Every function falls back to its reference where
Triton cannot run (CPU without ``TRITON_INTERPRET=1``; bf16 under the interpreter).

Ops only: swapping a model's HF modules for these is ``vlm_lightning.models.patch.apply_kernels``.

Example:
    >>> from vlm_lightning.kernels import fused_linear_cross_entropy
    >>> loss = fused_linear_cross_entropy(h.view(-1, H), model.lm_head.weight, labels.view(-1))
"""
from .cross_entropy import fused_linear_cross_entropy
from .gated_mlp import gated_act, geglu_tanh, swiglu
from .layer_norm import layer_norm
from .logprobs import fused_linear_token_logprobs
from .rms_norm import rms_norm
from .rope import apply_rope, apply_rope_from_positions

__all__ = [
    "apply_rope",
    "apply_rope_from_positions",
    "fused_linear_cross_entropy",
    "fused_linear_token_logprobs",
    "gated_act",
    "geglu_tanh",
    "layer_norm",
    "rms_norm",
    "swiglu",
]
