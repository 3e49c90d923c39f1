"""Questions a module asks about the strategy it runs under; the strategy never reads module settings.

* ``shards_parameters(trainer)``: whether no single rank holds the whole model (FSDP, ZeRO-3). The GRPO
  module asks it in its ``setup`` to pick its rollout path; callbacks ask it before exporting.
* ``validate_strategy_for_quantization(strategy, quantization, quant_storage, dtype)`` refuses FSDP (and
  ZeRO-3) with 4-bit weights unless ``bnb_4bit_quant_storage`` equals the compute dtype: FSDP flattens a
  unit into one tensor of one dtype, and packed 4-bit weights are uint8 by default ("Cannot flatten integer
  dtype tensors", peft#1432, bitsandbytes PR#970). ``check_module_strategy(module)`` runs it with the
  module's own settings, from the module's ``setup``.

Strategies are recognised by class (or by their registry name), so Lightning's own FSDP / DeepSpeed
classes count as well as ours.

Example:
    >>> validate_strategy_for_quantization("fsdp", "4bit", "bfloat16", "bfloat16")  # fine
    >>> shards_parameters(trainer)
    True
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from ..models.hf import resolve_dtype

__all__ = ["check_module_strategy", "shards_parameters", "strategy_kind", "strategy_of",
           "validate_strategy_for_quantization"]


def strategy_of(trainer_or_strategy: Any) -> Strategy:
    """The strategy of a Trainer (or the strategy itself)."""
    return trainer_or_strategy.strategy if hasattr(trainer_or_strategy, "strategy") else trainer_or_strategy


def strategy_kind(strategy: Any) -> str:
    """"fsdp", "deepspeed3", "deepspeed", "ddp" or "single" for a strategy object or its registry name."""
    if strategy is None:
        return "single"
    if isinstance(strategy, str):
        s = strategy.lower()
        if "fsdp" in s:
            return "fsdp"
        if "deepspeed" in s:
            return "deepspeed3" if "3" in s else "deepspeed"
        return "ddp" if "ddp" in s else "single"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if type(strategy).__name__ == "DeepSpeedStrategy" or "deepspeed" in type(strategy).__name__.lower():
        return "deepspeed3" if getattr(strategy, "zero_stage_3", False) else "deepspeed"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    if type(strategy).__name__ == "ModelParallelStrategy":
        return "fsdp"
    return "single"


def shards_parameters(trainer: Any) -> bool:
    """Whether the trainer's strategy shards parameters (FSDP, ZeRO-3): then no single rank holds the model.

    Example:
        >>> def setup(self, stage):  # in a LightningModule
        ...     if shards_parameters(self.trainer): ...
    """
    return strategy_kind(strategy_of(trainer)) in ("fsdp", "deepspeed3")


def validate_strategy_for_quantization(strategy: Any, quantization: str | None,
                                       bnb_4bit_quant_storage: str | torch.dtype | None,
                                       compute_dtype: str | torch.dtype | None) -> None:
    """Refuse combinations of a sharding strategy and bitsandbytes weights that cannot work.

    * FSDP / ZeRO-3 + "4bit": only with ``bnb_4bit_quant_storage`` equal to the compute dtype (``dtype``).
    * FSDP / ZeRO-3 + "8bit": never (int8 weights cannot be flattened or sharded).
    DDP, ZeRO-2 and one device take any quantisation (frozen weights are replicated, never flattened).

    Example:
        >>> validate_strategy_for_quantization("fsdp", "4bit", "bfloat16", "bfloat16")  # fine
        >>> validate_strategy_for_quantization("fsdp", "4bit", None, "bfloat16")
        Traceback (most recent call last):
        ValueError: strategy=fsdp with quantization='4bit' needs bnb_4bit_quant_storage ...
    """
    kind = strategy_kind(strategy)
    if kind not in ("fsdp", "deepspeed3") or quantization in (None, "", "none", "None"):
        return
    label = "fsdp" if kind == "fsdp" else "deepspeed_stage_3"
    if quantization == "8bit":
        raise ValueError(f"strategy={label} with quantization='8bit': bitsandbytes int8 weights cannot be sharded. "
                         "Use quantization='4bit' with bnb_4bit_quant_storage equal to dtype, or strategy=ddp.")
    if quantization == "4bit":
        storage = resolve_dtype(bnb_4bit_quant_storage) if bnb_4bit_quant_storage is not None else torch.uint8
        compute = resolve_dtype(compute_dtype) if compute_dtype not in (None, "auto") else None
        if compute is None or storage != compute:
            raise ValueError(
                f"strategy={label} with quantization='4bit' needs bnb_4bit_quant_storage equal to the compute dtype "
                f"(dtype={compute_dtype!r}); got bnb_4bit_quant_storage={bnb_4bit_quant_storage!r}. "
                f"{'FSDP' if kind == 'fsdp' else 'ZeRO-3'} flattens the weights of a unit into one tensor of one "
                "dtype, and packed 4-bit weights are uint8 by default ('Cannot flatten integer dtype tensors', "
                f"peft#1432). Set model.init_args.bnb_4bit_quant_storage: {compute_dtype or 'bfloat16'} "
                "(recipes/strategies/fsdp_qlora.yaml), or use strategy=ddp.")


def check_module_strategy(module: Any) -> None:
    """Validate ``module.trainer.strategy`` against the module's quantisation settings; the module calls it
    from its own ``setup``.

    Reads ``hparams.quantization``, ``hparams.bnb_4bit_quant_storage`` and ``hparams.dtype``. A no-op
    without a trainer.

    Example:
        >>> def setup(self, stage):  # in a LightningModule
        ...     check_module_strategy(self)
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return
    hp = getattr(module, "hparams", {}) or {}
    validate_strategy_for_quantization(trainer.strategy, hp.get("quantization"), hp.get("bnb_4bit_quant_storage"),
                                       hp.get("dtype"))
