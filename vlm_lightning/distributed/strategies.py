"""Lightning strategies for our VLM modules, registered by name: ``vision_ddp``, ``vision_fsdp``,
``vision_deepspeed_stage_2`` and ``vision_deepspeed_stage_3``.

Why our own subclasses: the HF model is built in ``configure_model`` (after the strategy exists), so the
decisions that depend on the model are taken when the strategy wraps it (the class docstrings say which).
Importing ``vlm_lightning.distributed`` registers the names in Lightning's ``StrategyRegistry``, so
``Trainer(strategy="vision_fsdp")`` and ``trainer.strategy: vision_fsdp`` in a recipe work; recipes that
set options name the class (``recipes/strategies/*.yaml``).

Left out here: what a module asks of the strategy (``checks.py``), getting weights out of a sharded run
(``gather.py``), the FSDP1 internals we patch (``fsdp.py``) and the model facts (``models/layers.py``).

Example:
    >>> trainer = L.Trainer(accelerator="gpu", devices=4, strategy="vision_fsdp", precision="bf16-true")
    >>> trainer.fit(VisionSFTModule("Qwen/Qwen2.5-VL-7B-Instruct"), datamodule=dm)
    >>> L.Trainer(devices=4, strategy=VisionFSDPStrategy(sharding_strategy="SHARD_GRAD_OP"))
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, StrategyRegistry
from torch import nn

from ..models.hf import unwrap_model
from ..models.layers import (
    DEFAULT_TEXT_LAYER_PATTERN,
    DEFAULT_VISION_LAYER_PATTERN,
    always_used_root_weights_train,
    layer_class_names,
    vision_parameters_trainable,
)
from .fsdp import (
    already_fsdp,
    finish_backward_inside_root_forward,
    norm_clipping_precision,
    root_has_trainable,
    wrap_on_cpu,
)
from .gather import gather_full_state_dict

__all__ = ["STRATEGY_NAMES", "LayerWrapPolicy", "VisionDDPStrategy", "VisionDeepSpeedStrategy",
           "VisionFSDPStrategy", "batch_has_images"]

log = logging.getLogger(__name__)

#: the names this module registers in Lightning's StrategyRegistry
STRATEGY_NAMES = ("vision_ddp", "vision_fsdp", "vision_deepspeed_stage_2", "vision_deepspeed_stage_3")
_DEFAULT_TIMEOUT = timedelta(minutes=30)


def _held_model(model: nn.Module) -> nn.Module:
    """The model a LightningModule holds as ``.model`` (Lightning hands the strategy the whole module)."""
    return model.model if isinstance(model, LightningModule) and isinstance(model.model, nn.Module) else model


def batch_has_images(batch: Any) -> bool:
    """Whether a collated batch carries image tensors (``pixel_values``)."""
    pv = batch.get("pixel_values") if isinstance(batch, dict) else None
    return isinstance(pv, torch.Tensor) and pv.numel() > 0


# ------------------------------------------------------------------------------------ FSDP wrap policy
class LayerWrapPolicy:
    """FSDP auto-wrap policy (the ``(module, recurse, nonwrapped_numel) -> bool`` callable form) that
    makes one FSDP unit of every module whose class name is in ``class_names``.

    Built before the model exists, so ``class_names=None`` means "resolve from the model when the strategy
    wraps it" (``VisionFSDPStrategy`` does that with ``layer_class_names``). Called directly on a module
    before resolution, it falls back to the ``*DecoderLayer`` name pattern.

    Example:
        >>> FSDPStrategy(auto_wrap_policy=LayerWrapPolicy({"Qwen2VLDecoderLayer"}))
    """

    def __init__(self, class_names: Iterable[str] | None = None, wrap_vision_blocks: bool = False):
        self.class_names = set(class_names) if class_names is not None else None
        self.wrap_vision_blocks = wrap_vision_blocks
        pattern = DEFAULT_TEXT_LAYER_PATTERN + (f"|{DEFAULT_VISION_LAYER_PATTERN}" if wrap_vision_blocks else "")
        self._fallback = re.compile(pattern)

    def resolve(self, model: nn.Module) -> LayerWrapPolicy:
        if self.class_names is None:
            self.class_names = layer_class_names(_held_model(model), vision=self.wrap_vision_blocks)
        return self

    def matches(self, module: nn.Module) -> bool:
        name = type(module).__name__
        return name in self.class_names if self.class_names is not None else bool(self._fallback.fullmatch(name))

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **_: Any) -> bool:
        return True if recurse else self.matches(module)

    def __repr__(self) -> str:
        return f"LayerWrapPolicy({sorted(self.class_names) if self.class_names is not None else 'auto'})"


# ------------------------------------------------------------------------------------------ strategies
def _registers(name: str, description: str) -> classmethod:
    """A ``register_strategies`` hook that names the class in Lightning's ``StrategyRegistry``."""
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(name, cls, description=f"{description} (vlm_lightning)")
    return classmethod(register_strategies)


class VisionDDPStrategy(DDPStrategy):
    """``DDPStrategy`` switching ``find_unused_parameters`` on only when some trainable parameter can sit out
    a step. Decoder LoRA runs on every token, so with a frozen vision tower (the default) it stays off (no
    per-step graph walk). When the vision tower or the projector trains, a rank whose batch holds no image
    never runs it; without ``find_unused_parameters`` DDP then waits for gradients that never come (a hang,
    then "Expected to have finished reduction", LlamaFactory#2681). With it, the unused parameters are
    reduced as zeros and every rank ends up with the same, averaged gradient. ``static_graph`` stays off:
    which parameters run changes from step to step (images or not, GRPO's several backwards per step).

    Args:
        find_unused_parameters: "auto" (on exactly when the vision tower or projector trains), True or False.
        static_graph: kept False by default; True is only safe when every step runs the same parameters.
        process_group_backend: "nccl" on GPUs, "gloo" on CPUs (None: Lightning picks).
        **kwargs: everything ``DDPStrategy`` / ``DistributedDataParallel`` take.

    Example:
        >>> L.Trainer(devices=8, num_nodes=2, strategy=VisionDDPStrategy())   # or strategy="vision_ddp"
    """

    strategy_name = "vision_ddp"

    def __init__(self, find_unused_parameters: bool | Literal["auto"] = "auto", static_graph: bool = False,
                 process_group_backend: str | None = None, timeout: timedelta | None = _DEFAULT_TIMEOUT,
                 **kwargs: Any):
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, static_graph=static_graph,
                         **kwargs)
        self.find_unused_parameters_setting = find_unused_parameters

    register_strategies = _registers("vision_ddp", "DDP deciding find_unused_parameters from the model")

    def _setup_model(self, model: nn.Module):
        setting = self.find_unused_parameters_setting
        find_unused = vision_parameters_trainable(_held_model(model)) if setting == "auto" else bool(setting)
        self._ddp_kwargs["find_unused_parameters"] = find_unused
        log.info("VisionDDPStrategy: find_unused_parameters=%s (%s)", find_unused,
                 "vision tower/projector trains: text-only batches leave it unused" if find_unused and
                 setting == "auto" else "set" if setting != "auto" else "only always-used parameters train")
        return super()._setup_model(model)


class VisionFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` (torch FSDP1) wrapping each text decoder layer (and optionally each vision block) as an
    FSDP unit (``LayerWrapPolicy``; the classes come from the family table through ``models/layers.py``).

    ``use_orig_params=True`` so frozen base and trainable LoRA weights can share a unit. Gradient clipping
    by norm (``Trainer(gradient_clip_val=...)``, GRPO's ``max_grad_norm``) goes through the root's
    ``clip_grad_norm_``, which Lightning's own FSDP precision plugin refuses. Vision blocks are wrapped only
    with ``wrap_vision_blocks=True``: a wrapped block all-gathers when it runs, so a step where one rank has
    images and another has none would pair different collectives and hang; the strategy checks this every
    step when it can happen (wrapped vision blocks, or a trainable vision tower) and raises a clear error
    instead. Left in the root unit and frozen, the vision tower needs no collective of its own, and mixed
    text-only / image batches work. Manual optimisation (GRPO) backpropagates inside ``training_step``,
    i.e. inside the root's forward; ``backward`` then finishes FSDP's end-of-backward work for every inner
    unit (``fsdp.finish_backward_inside_root_forward``). Works on the CPU too (gloo: the tests).

    Args:
        wrap_vision_blocks: also shard the vision tower block by block (saves its memory; then every rank
            must have an image in every step, which the strategy checks).
        layer_class_names: the classes to wrap (default: from the family table).
        sharding_strategy: "FULL_SHARD" (ZeRO-3-like), "SHARD_GRAD_OP" (ZeRO-2-like), "HYBRID_SHARD",
            "NO_SHARD".
        cpu_offload: keep parameters (and gradients) on the CPU between uses.
        state_dict_type: "full" (one file, gathered on rank 0) or "sharded" (a folder, one file per rank).
        **kwargs: everything ``FSDPStrategy`` / ``FullyShardedDataParallel`` take (e.g. ``limit_all_gathers``).

    Example:
        >>> L.Trainer(devices=4, strategy=VisionFSDPStrategy(sharding_strategy="SHARD_GRAD_OP"), precision="bf16-true")
    """

    strategy_name = "vision_fsdp"

    def __init__(self, wrap_vision_blocks: bool = False, layer_class_names: list[str] | None = None,
                 sharding_strategy: str = "FULL_SHARD", cpu_offload: bool = False,
                 state_dict_type: Literal["full", "sharded"] = "full", process_group_backend: str | None = None,
                 timeout: timedelta | None = _DEFAULT_TIMEOUT, **kwargs: Any):
        kwargs.setdefault("auto_wrap_policy", LayerWrapPolicy(layer_class_names, wrap_vision_blocks))
        kwargs.setdefault("use_orig_params", True)  # frozen base + trainable LoRA in one unit
        super().__init__(sharding_strategy=sharding_strategy, cpu_offload=cpu_offload,
                         state_dict_type=state_dict_type, process_group_backend=process_group_backend,
                         timeout=timeout, **kwargs)
        self.wrap_vision_blocks = wrap_vision_blocks
        self._needs_image_check = wrap_vision_blocks

    # not added to FSDPStrategy._registered_strategies: Lightning would then demand a GPU accelerator
    register_strategies = _registers("vision_fsdp", "FSDP with one unit per decoder layer, CPU capable")

    def _setup_model(self, model: nn.Module):
        policy = self.kwargs.get("auto_wrap_policy")
        if isinstance(policy, LayerWrapPolicy) and not already_fsdp(model):
            policy.resolve(model)
            log.info("VisionFSDPStrategy: one FSDP unit per %s", sorted(policy.class_names))
            if not policy.class_names:
                raise ValueError("VisionFSDPStrategy: found no decoder layer class to wrap in "
                                 f"{type(unwrap_model(_held_model(model))).__name__}; pass layer_class_names=[...]")
        # a trainable vision tower in the root unit only desynchronises the ranks when nothing else in the
        # root always gets a gradient (full fine-tuning trains embeddings / lm_head: the root reduces anyway)
        held = _held_model(model)
        self._needs_image_check = self.wrap_vision_blocks or (
            vision_parameters_trainable(held) and not always_used_root_weights_train(held))
        if self.root_device.type == "cpu" and not already_fsdp(model):
            return wrap_on_cpu(self, model)
        return super()._setup_model(model)

    # --- the mixed image / text-only step check (a clear error instead of a collective hang)
    def _check_images(self, batch: Any) -> None:
        if not self._needs_image_check or self.world_size <= 1 or not isinstance(batch, dict):
            return
        flag = torch.tensor([1.0 if batch_has_images(batch) else 0.0], device=self.root_device)
        flags = self.all_gather(flag).flatten()
        if bool((flags > 0).any()) and not bool((flags > 0).all()):
            without = [i for i, f in enumerate(flags.tolist()) if f == 0]
            raise RuntimeError(
                f"VisionFSDPStrategy: ranks {without} have a batch without images while other ranks have images. "
                "With sharded vision blocks (wrap_vision_blocks=True) or a trainable vision tower, FSDP would "
                "pair different collectives across ranks and hang. Use wrap_vision_blocks=False with a frozen "
                "vision tower (finetune_vision_layers=False, finetune_projector=False), VisionDDPStrategy, "
                "or data where every batch has an image.")

    def training_step(self, *args: Any, **kwargs: Any):
        self._check_images(args[0] if args else kwargs.get("batch"))
        return super().training_step(*args, **kwargs)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        module = self.lightning_module
        if module is not None and not module.automatic_optimization and root_has_trainable(self.model):
            raise ValueError(
                "VisionFSDPStrategy with manual optimisation (VisionGRPOModule): trainable weights sit in FSDP's root "
                "unit (vision tower / projector / embeddings / lm_head). Backward inside training_step would reshard "
                "them in the middle of the step. Freeze them (finetune_vision_layers=False, finetune_projector=False, "
                "no modules_to_save) or use VisionDDPStrategy.")

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            finish_backward_inside_root_forward(self.model)
        return out

    def validation_step(self, *args: Any, **kwargs: Any):
        self._check_images(args[0] if args else kwargs.get("batch"))
        return super().validation_step(*args, **kwargs)

    @property
    def precision_plugin(self):
        plugin = FSDPStrategy.precision_plugin.fget(self)
        if type(plugin).__name__ == "FSDPPrecision":  # swap in the norm-clipping one, once
            plugin = norm_clipping_precision(plugin, self)
            self._precision_plugin = plugin
        return plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Our modules checkpoint only trainable weights (their ``state_dict`` override). Under FSDP that
        override would read sharded views with wrapper names, so gather them unsharded, with clean names,
        in the keys the module's own ``state_dict`` uses (``model.<peft name>``)."""
        module = self.lightning_module
        if self._state_dict_type == "full" and _overrides_state_dict(module):
            full = gather_full_state_dict(self, module, trainable_only=True)
            return {f"model.{k}": v for k, v in full.items()}
        return super().lightning_module_state_dict()


def _overrides_state_dict(module: nn.Module) -> bool:
    return type(module).state_dict is not nn.Module.state_dict and isinstance(getattr(module, "model", None),
                                                                             nn.Module)


class VisionDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (ZeRO stage 2 or 3) for modules that load a Hugging Face model in
    ``configure_model``. Needs the ``deepspeed`` package.

    Lightning runs ``configure_model`` under ``deepspeed.zero.Init`` for stage 3, which partitions every
    parameter as soon as its module is built; ``from_pretrained`` then initialises and loads weights into
    empty partitions (``IndexError: index ... is out of bounds for dimension 0 with size 0``). Here the model
    is built whole and ``deepspeed.initialize`` partitions it (ZeRO-3 converts parameters made outside
    ``zero.Init``): each rank holds the full 16-bit model while it loads, as with ``VisionFSDPStrategy``.
    Stage 2 is unchanged (it never used ``zero.Init``).

    Example:
        >>> L.Trainer(devices=4, strategy="vision_deepspeed_stage_3", precision="bf16-true")
    """

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for stage in (2, 3):
            strategy_registry.register(f"vision_deepspeed_stage_{stage}", cls, stage=stage,
                                       description=f"DeepSpeed ZeRO stage {stage}, HF model built whole "
                                       "(vlm_lightning)")

    def model_sharded_context(self):
        self._init_config_if_needed()
        return contextlib.nullcontext()


for _cls in (VisionDDPStrategy, VisionFSDPStrategy, VisionDeepSpeedStrategy):
    _cls.register_strategies(StrategyRegistry)
