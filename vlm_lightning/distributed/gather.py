"""Getting the trained weights (and model calls) out of a sharded run, and doing file work on rank zero.

* ``gather_full_state_dict(trainer, module)``: the unsharded weights (FSDP, ZeRO-3) with clean names;
* ``save_adapter_gathered(trainer, module, dir)``: a PEFT adapter folder written from them, which
  ``vlm_lightning.export.merge_lora`` and the GGUF export read;
* ``exportable_source(trainer, module, dir)``: what an export should read (the module, or that folder);
* ``run_unsharded(trainer, module, "generate", batch)``: a model call from outside a step (a callback);
* ``on_rank_zero(trainer, fn, name)``: run ``fn`` on global rank zero while the others wait at a barrier,
  re-raising rank zero's error after it (so no rank is left waiting);
* ``all_gather_objects(trainer, items)``: every rank's list, concatenated.

All but ``on_rank_zero``'s ``fn`` are collectives under FSDP / ZeRO-3: call them on every rank, outside
forward/backward. Left out: sharded (per-rank) checkpoint formats, which Lightning writes itself.

Example:
    >>> src = exportable_source(trainer, module, "runs/ocr/adapter_gathered")      # every rank
    >>> on_rank_zero(trainer, lambda: merge_lora(src, "runs/ocr/merged"), "merge")  # rank 0 writes
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

from vlm_lightning.export.atomic import atomic_dir

from .checks import shards_parameters, strategy_kind, strategy_of

__all__ = ["all_gather_objects", "clean_parameter_name", "exportable_source", "gather_full_state_dict",
           "on_rank_zero", "run_unsharded", "save_adapter_gathered"]

T = TypeVar("T")
# wrapper prefixes that FSDP / activation checkpointing insert into parameter names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_parameter_name(name: str) -> str:
    """Drop the wrapper segments FSDP and activation checkpointing insert (``_fsdp_wrapped_module.``)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def on_rank_zero(trainer: Any, fn: Callable[[], T], name: str) -> T | None:
    """``fn()`` on global rank zero, then a barrier named ``name`` on every rank; returns ``fn``'s result on
    rank zero (None elsewhere). An error raised by ``fn`` is re-raised on rank zero after the barrier, so
    the other ranks leave it instead of waiting forever.

    Example:
        >>> path = on_rank_zero(trainer, lambda: merge_lora(module, "runs/merged"), "vlm_lightning.merge_lora")
    """
    strategy = strategy_of(trainer)
    result, error = None, None
    if getattr(strategy, "global_rank", 0) == 0:
        try:
            result = fn()
        except BaseException as err:  # let the other ranks leave the barrier, then raise
            error = err
    if hasattr(strategy, "barrier"):
        strategy.barrier(name)
    if error is not None:
        raise error
    return result


def gather_full_state_dict(trainer: Any, pl_module: nn.Module, trainable_only: bool = True,
                           rank0_only: bool = True, clean_names: bool = True) -> dict[str, torch.Tensor]:
    """Unsharded weights of ``pl_module.model`` (PEFT names, e.g. ``base_model.model...lora_A.default.weight``)
    as CPU tensors. A collective under FSDP and ZeRO-3: call it on every rank, outside forward/backward.

    Args:
        trainer: the Trainer (or its strategy).
        trainable_only: only ``requires_grad`` parameters (what an adapter needs). With False, also the
            frozen base and buffers; for a QLoRA model those are packed 4-bit storage, so merge from the
            16-bit base on disk instead (``merge_lora`` does).
        rank0_only: return the tensors on global rank zero only (others get ``{}``), which saves memory.
        clean_names: drop the ``_fsdp_wrapped_module.`` segments (False: names as the wrapped model has them).

    Example:
        >>> sd = gather_full_state_dict(trainer, module)   # every rank
        >>> if trainer.is_global_zero: torch.save(sd, "lora.pt")
    """
    strategy = strategy_of(trainer)
    model = pl_module.model
    is_zero = getattr(strategy, "global_rank", 0) == 0
    wrapped = getattr(strategy, "model", None)

    name_of = clean_parameter_name if clean_names else (lambda n: n)

    def read() -> dict[str, torch.Tensor]:
        out = {name_of(n): p.detach().to("cpu", copy=True)
               for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
        if not trainable_only:
            out.update({name_of(n): b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
        return out

    if isinstance(wrapped, FSDP):
        # rank0_only + offload_to_cpu: only rank 0 holds the full tensors, on the CPU; offload needs a GPU,
        # and torch refuses it for NO_SHARD (what FSDP uses on a single device)
        offload = (wrapped.compute_device.type == "cuda"
                   and getattr(wrapped, "sharding_strategy", None) != ShardingStrategy.NO_SHARD)
        with FSDP.summon_full_params(wrapped, writeback=False, rank0_only=rank0_only and offload,
                                     offload_to_cpu=offload):
            return read() if (is_zero or not rank0_only) else {}
    if strategy_kind(strategy) == "deepspeed3":
        import deepspeed  # optional dependency: only ZeRO-3 runs have it

        params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return read() if (is_zero or not rank0_only) else {}
    return read() if (is_zero or not rank0_only) else {}


def save_adapter_gathered(trainer: Any, pl_module: nn.Module, directory: str | Path) -> Path:
    """Gather the LoRA weights (FSDP/ZeRO-3 safe) and write a PEFT adapter folder on rank zero
    (``adapter_model.safetensors`` + ``adapter_config.json`` + the processor). Call on every rank; all
    ranks leave after rank zero has written. ``vlm_lightning.export.merge_lora(directory, ...)`` merges it.

    Example:
        >>> path = save_adapter_gathered(trainer, module, "runs/adapter")
    """
    directory = Path(directory)
    # PEFT picks adapter keys by the model's module names, which carry FSDP's wrapper segments: keep them
    # for the selection, clean them after
    full = gather_full_state_dict(trainer, pl_module, trainable_only=True, clean_names=False)

    def write() -> None:
        peft_model = pl_module.model
        sd = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name="default")
        sd = {clean_parameter_name(k): v for k, v in sd.items()}
        if not sd:
            raise RuntimeError(f"save_adapter_gathered: no adapter weight among {len(full)} trainable tensors")
        with atomic_dir(directory) as tmp:  # renamed into place only once complete
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            peft_model.peft_config["default"].save_pretrained(str(tmp))
            processor = getattr(pl_module, "processor", None)
            if processor is not None:
                processor.save_pretrained(str(tmp))

    on_rank_zero(trainer, write, "vlm_lightning.save_adapter_gathered")
    return directory


def run_unsharded(trainer: Any, pl_module: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``pl_module.<method>(*args, **kwargs)`` with FSDP's root unit gathered, as Lightning runs
    ``training_step``: through the wrapped model's ``forward``. Needed for model calls made outside a step,
    e.g. ``generate`` from a callback: there, FSDP's root unit (embeddings, vision tower, lm_head) is
    still sharded. A plain call for every other strategy. Under FSDP it is a collective: every rank must
    make the same calls (HF ``generate`` then keeps the ranks in step by itself, ``synced_gpus``).
    Uses Lightning's private ``strategy._forward_redirection`` (what its own steps go through).

    Example:
        >>> texts = run_unsharded(trainer, module, "generate", batch, max_new_tokens=32)
    """
    strategy = strategy_of(trainer)
    wrapped = getattr(strategy, "model", None)
    if isinstance(wrapped, FSDP) and wrapped is not pl_module:
        return strategy._forward_redirection(wrapped, pl_module, method, *args, **kwargs)
    return getattr(pl_module, method)(*args, **kwargs)


def exportable_source(trainer: Any, pl_module: nn.Module, scratch_dir: str | Path) -> Any:
    """What ``merge_lora`` / the GGUF export should read after training: the module itself when rank zero
    holds full weights (one device, DDP, ZeRO-2), else an adapter folder written from the gathered state
    (FSDP, ZeRO-3). Collective under those: call on every rank, then export on rank zero only.

    Example:
        >>> src = exportable_source(trainer, module, "runs/ocr/adapter_gathered")   # every rank
        >>> if trainer.is_global_zero:
        ...     merge_lora(src, "runs/ocr/merged", base_name_or_path=module.hparams.model_name_or_path)
    """
    if shards_parameters(trainer):
        return save_adapter_gathered(trainer, pl_module, scratch_dir)
    return pl_module


def all_gather_objects(trainer: Any, items: list) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order; ``items`` itself without a process
    group. A collective: call it on every rank."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return list(items)
    parts: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]
