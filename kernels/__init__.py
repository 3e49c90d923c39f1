"""Fused Triton kernels, installed as ``vlm_lightning.kernels`` (never as a top-level ``kernels``).

Each op: Triton kernel(s) -> launcher -> ``torch.autograd.Function`` -> a function below; the torch
references live in ``vlm_lightning.kernels.reference``. Every function falls back to its reference where
Triton cannot run (CPU without ``TRITON_INTERPRET=1``; bf16 under the interpreter).

Example:
    >>> from vlm_lightning.kernels import apply_kernels, fused_linear_cross_entropy
    >>> apply_kernels(model)                                   # norms, RoPE, gated MLP, lm_head + loss
    >>> loss = fused_linear_cross_entropy(h.view(-1, H), model.lm_head.weight, labels.view(-1))
"""
from .cross_entropy import fused_linear_cross_entropy
from .gated_mlp import gated_act, geglu_tanh, swiglu
from .layer_norm import layer_norm
from .logprobs import fused_linear_token_logprobs
from .patch import apply_kernels, final_logit_softcap, fused_causal_lm_loss, unwrap_model
from .rms_norm import rms_norm
from .rope import apply_rope, apply_rope_from_positions

__all__ = [
    "apply_kernels",
    "apply_rope",
    "apply_rope_from_positions",
    "final_logit_softcap",
    "fused_causal_lm_loss",
    "fused_linear_cross_entropy",
    "fused_linear_token_logprobs",
    "gated_act",
    "geglu_tanh",
    "layer_norm",
    "rms_norm",
    "swiglu",
    "unwrap_model",
]
