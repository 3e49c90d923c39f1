"""``merged_lora``: LoRA folded into the base weights for the duration of a rollout, undone bit-exactly.

Every active, mergeable LoRA ``Linear`` gets a new base weight ``W + s * B @ A`` and its adapter switched off,
so the decode loop runs one matmul per linear instead of three; on exit the original weight *tensors* are put
back (a pointer swap, no arithmetic). PEFT's ``merge_adapter`` / ``unmerge_adapter`` unmerge by subtraction,
which is not bit-exact, hence this. Left out: layers that cannot be merged exactly (4-bit / 8-bit bases, DoRA,
LoRA bias) keep their adapter active. Costs one extra copy of the merged weights while sampling.

Example:
    >>> with merged_lora(peft_model) as n:
    ...     out = fast_generate(peft_model, inputs, 8, 256, merge_lora=False)   # n layers merged
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


def _mergeable(mod: nn.Module) -> bool:
    """A plain LoRA ``Linear`` over a float ``nn.Linear``, vanilla LoRA (no DoRA / LoRA bias) on every active
    adapter."""
    base = mod.get_base_layer()
    if type(base) is not nn.Linear or not base.weight.is_floating_point():
        return False
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if not active:
        return False
    variants = getattr(mod, "lora_variant", {}) or {}
    lora_bias = getattr(mod, "lora_bias", {}) or {}
    return not any(a in variants or lora_bias.get(a, False) for a in active)


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """Fold every active, mergeable LoRA adapter into its base weight for the duration of the block.

    Each merged layer's base ``weight.data`` is replaced by a new tensor ``W + s * B @ A`` (computed in fp32,
    stored in W's dtype) and the layer's adapters are switched off (``_disable_adapters``), so forwards see the
    merged weight only. On exit the original weight tensors and adapter flags are put back: bit-exact, nothing
    is subtracted. Layers that cannot be merged (quantized bases, DoRA, LoRA bias) stay as they are, adapter
    active. Yields the number of merged layers (0 for a model without LoRA).

    Example:
        >>> with merged_lora(peft_model) as n:
        ...     logits = peft_model(**batch).logits   # same function, no LoRA matmuls
    """
    swaps: list[tuple[nn.Module, torch.Tensor, bool]] = []
    try:
        with torch.no_grad():
            for mod in model.modules():
                if not isinstance(mod, LoraLinear) or mod.disable_adapters or mod.merged or not _mergeable(mod):
                    continue
                weight = mod.get_base_layer().weight
                orig = weight.data
                merged = orig.to(torch.float32, copy=True)  # never in place: orig is put back
                for a in mod.active_adapters:
                    if a in mod.lora_A:
                        merged += mod.get_delta_weight(a).float()
                swaps.append((mod, orig, mod._disable_adapters))
                weight.data = merged.to(orig.dtype)
                mod._disable_adapters = True  # the flag only: enable_adapters() would touch requires_grad
        yield len(swaps)
    finally:
        for mod, orig, flag in reversed(swaps):
            mod.get_base_layer().weight.data = orig
            mod._disable_adapters = flag

