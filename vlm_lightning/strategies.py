"""Several GPUs and nodes: Lightning strategies set up for our VLM modules.

``make_strategy("ddp" | "fsdp" | "deepspeed_stage_2" | "deepspeed_stage_3")`` returns a Lightning strategy
for ``L.Trainer(strategy=...)``; recipes name the classes directly (``recipes/strategies/*.yaml``).

Why our own subclasses: the HF model is built in ``configure_model`` (after the strategy exists), so the
decisions that depend on the model are taken when the strategy wraps it:

* ``VisionDDPStrategy``: ``find_unused_parameters`` is switched on only when some trainable parameter can
  sit out a step. Decoder LoRA runs on every token, so with a frozen vision tower (the default) it stays
  off (no per-step graph walk). When the vision tower or the projector trains, a rank whose batch holds no
  image never runs it; without ``find_unused_parameters`` DDP then waits for gradients that never come
  (a hang, then "Expected to have finished reduction", LlamaFactory#2681). With it, the unused parameters
  are reduced as zeros and every rank ends up with the same, averaged gradient. ``static_graph`` stays off:
  which parameters run changes from step to step (images or not, GRPO's several backwards per step).
* ``VisionFSDPStrategy``: FSDP (1, what Lightning's ``FSDPStrategy`` wraps) with every text decoder layer
  as its own unit (``LayerWrapPolicy``; the classes come from the family table,
  ``vlm_lightning.models.families``, falling back to class names ending in ``DecoderLayer``).
  ``use_orig_params=True`` so frozen base and trainable LoRA weights can share a unit. Gradient clipping
  by norm (``Trainer(gradient_clip_val=...)``, GRPO's ``max_grad_norm``) goes through the root's
  ``clip_grad_norm_``, which Lightning's own FSDP precision plugin refuses.
  Vision blocks are wrapped only with ``wrap_vision_blocks=True``: a wrapped block all-gathers when it
  runs, so a step where one rank has images and another has none would pair different collectives and
  hang. The strategy checks this every step when it can happen (wrapped vision blocks, or a trainable
  vision tower, whose gradients are reduce-scattered) and raises a clear error instead of hanging.
  Left in the root unit and frozen, the vision tower needs no collective of its own, and mixed
  text-only / image batches work.
  Manual optimisation (GRPO) backpropagates inside ``training_step``, i.e. inside the root's forward,
  where FSDP's own end-of-backward callback never runs; ``backward`` finishes it for every inner unit
  (``_finish_backward_inside_root_forward``). Calls from outside a step (generation in a callback) go
  through ``run_unsharded``, which routes them through the root's forward as Lightning does for steps.

``validate_strategy_for_quantization`` refuses FSDP (and ZeRO-3) with 4-bit weights unless
``bnb_4bit_quant_storage`` equals the compute dtype: FSDP flattens a unit into one tensor of one dtype,
and packed 4-bit weights are uint8 by default ("Cannot flatten integer dtype tensors", peft#1432,
bitsandbytes PR#970). ``check_module_strategy(module)`` runs it from a module's ``setup``.

``gather_full_state_dict(trainer, module)`` collects the unsharded weights (FSDP, ZeRO-3) on rank zero,
with clean names; ``save_adapter_gathered`` writes a PEFT adapter folder from them, which
``vlm_lightning.export.merge_lora`` and the GGUF export read. Call both on every rank
(``exportable_source`` picks the module or the gathered adapter for an export).

Example:
    >>> trainer = L.Trainer(accelerator="gpu", devices=4, strategy=make_strategy("fsdp"), precision="bf16-true")
    >>> trainer.fit(VisionSFTModule("Qwen/Qwen2.5-VL-7B-Instruct"), datamodule=dm)
    >>> save_adapter_gathered(trainer, trainer.lightning_module, "runs/adapter")  # every rank
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn

log = logging.getLogger(__name__)

STRATEGY_NAMES = ("ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
#: class names treated as transformer layers when the family table cannot name them
DEFAULT_TEXT_LAYER_PATTERN = r".*DecoderLayer$"
DEFAULT_VISION_LAYER_PATTERN = r".*(VisionBlock|EncoderLayer|AttentionLayer|VisionLayer)$"
# wrapper prefixes that FSDP / activation checkpointing insert into parameter names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_DEFAULT_TIMEOUT = timedelta(minutes=30)


# ----------------------------------------------------------------------------------------- model facts
def _hf_model(model: nn.Module) -> nn.Module:
    """The ``*ForConditionalGeneration`` model under a LightningModule / PeftModel."""
    import lightning as L

    inner = model.model if isinstance(model, L.LightningModule) and isinstance(model.model, nn.Module) else model
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def _family_spec(hf_model: nn.Module):
    from vlm_lightning.models.families import get_family_spec

    try:
        return get_family_spec(hf_model)
    except (ValueError, AttributeError):
        return None


def _submodule(model: nn.Module, path: str | None) -> nn.Module | None:
    if not path:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def layer_class_names(model: nn.Module, vision: bool = True) -> set[str]:
    """Class names of the text decoder layers (and, with ``vision``, the vision blocks) of ``model``.

    Read from the family table's ``decoder_layers`` / ``vision_layers`` ModuleLists; for an unknown
    family, every class whose name ends in ``DecoderLayer`` (and a vision block pattern).

    Example:
        >>> layer_class_names(model)
        {'Qwen2VLDecoderLayer', 'Qwen2VLVisionBlock'}
    """
    hf = _hf_model(model)
    spec = _family_spec(hf)
    names: set[str] = set()
    paths = [spec.decoder_layers] + ([spec.vision_layers] if vision else []) if spec is not None else []
    for path in paths:
        layers = _submodule(hf, path)
        if isinstance(layers, nn.ModuleList):
            names.update(type(m).__name__ for m in layers)
    if not names or spec is None:
        pattern = re.compile(DEFAULT_TEXT_LAYER_PATTERN + (f"|{DEFAULT_VISION_LAYER_PATTERN}" if vision else ""))
        names.update(type(m).__name__ for m in hf.modules() if pattern.fullmatch(type(m).__name__))
    return names


def vision_parameters_trainable(model: nn.Module) -> bool:
    """Whether any parameter of the vision tower or the projector trains (LoRA or full)."""
    hf = _hf_model(model)
    spec = _family_spec(hf)
    if spec is not None:
        parts = [_submodule(hf, spec.vision_tower), _submodule(hf, spec.projector)]
        return any(p.requires_grad for part in parts if part is not None for p in part.parameters())
    return any(p.requires_grad and re.search(r"(visual|vision_tower|multi_modal_projector)\.", n)
               for n, p in hf.named_parameters())


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
            self.class_names = layer_class_names(model, vision=self.wrap_vision_blocks)
        return self

    def matches(self, module: nn.Module) -> bool:
        name = type(module).__name__
        return name in self.class_names if self.class_names is not None else bool(self._fallback.fullmatch(name))

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **_: Any) -> bool:
        return True if recurse else self.matches(module)

    def __repr__(self) -> str:
        return f"LayerWrapPolicy({sorted(self.class_names) if self.class_names is not None else 'auto'})"


# ------------------------------------------------------------------------------------------ strategies
class VisionDDPStrategy(DDPStrategy):
    """``DDPStrategy`` deciding ``find_unused_parameters`` from the built model (see the module docstring).

    Args:
        find_unused_parameters: "auto" (on exactly when the vision tower or projector trains), True or False.
        static_graph: kept False by default; True is only safe when every step runs the same parameters.
        process_group_backend: "nccl" on GPUs, "gloo" on CPUs (None: Lightning picks).
        **kwargs: everything ``DDPStrategy`` / ``DistributedDataParallel`` take.

    Example:
        >>> L.Trainer(devices=8, num_nodes=2, strategy=VisionDDPStrategy())
    """

    strategy_name = "vision_ddp"

    def __init__(self, find_unused_parameters: bool | Literal["auto"] = "auto", static_graph: bool = False,
                 process_group_backend: str | None = None, timeout: timedelta | None = _DEFAULT_TIMEOUT,
                 **kwargs: Any):
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, static_graph=static_graph,
                         **kwargs)
        self.find_unused_parameters_setting = find_unused_parameters

    def _setup_model(self, model: nn.Module):
        setting = self.find_unused_parameters_setting
        find_unused = vision_parameters_trainable(model) if setting == "auto" else bool(setting)
        self._ddp_kwargs["find_unused_parameters"] = find_unused
        log.info("VisionDDPStrategy: find_unused_parameters=%s (%s)", find_unused,
                 "vision tower/projector trains: text-only batches leave it unused" if find_unused and
                 setting == "auto" else "set" if setting != "auto" else "only always-used parameters train")
        return super()._setup_model(model)


class VisionFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` wrapping each decoder layer (and optionally each vision block) as an FSDP unit.

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

    def _setup_model(self, model: nn.Module):
        policy = self.kwargs.get("auto_wrap_policy")
        if isinstance(policy, LayerWrapPolicy) and not _already_fsdp(model):
            policy.resolve(model)
            log.info("VisionFSDPStrategy: one FSDP unit per %s", sorted(policy.class_names))
            if not policy.class_names:
                raise ValueError("VisionFSDPStrategy: found no decoder layer class to wrap in "
                                 f"{type(_hf_model(model)).__name__}; pass layer_class_names=[...]")
        # a trainable vision tower in the root unit only desynchronises the ranks when nothing else in the
        # root always gets a gradient (full fine-tuning trains embeddings / lm_head: the root reduces anyway)
        self._needs_image_check = self.wrap_vision_blocks or (
            vision_parameters_trainable(model) and not _always_used_root_weights_train(model))
        if self.root_device.type == "cpu" and not _already_fsdp(model):
            return self._setup_model_on_cpu(model)
        return super()._setup_model(model)

    def _setup_model_on_cpu(self, model: nn.Module):
        """Lightning passes ``device_id=root_device.index`` (None on the CPU), and FSDP then looks for an
        accelerator and refuses ("FSDP needs a non-CPU accelerator device"); an explicit CPU device works
        with gloo. Used by the CPU tests; otherwise the same as ``FSDPStrategy._setup_model``."""
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

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
        backend = getattr(getattr(module, "hparams", None), "get", lambda *_: None)("rollout_backend")
        if backend == "fast":
            raise ValueError("VisionGRPOModule(rollout_backend='fast') reads (and merges LoRA into) the weights outside "
                             "FSDP's forward, where they are sharded: use rollout_backend='hf' (or 'auto') with FSDP.")
        if backend == "auto":  # "where supported": the fast path is not, with sharded weights
            module.hparams.rollout_backend = "hf"
            log.info("VisionFSDPStrategy: GRPO rollouts use HF generate (the fast path needs unsharded weights)")
        if module is not None and not module.automatic_optimization and _root_has_trainable(self.model):
            raise ValueError(
                "VisionFSDPStrategy with manual optimisation (VisionGRPOModule): trainable weights sit in FSDP's root "
                "unit (vision tower / projector / embeddings / lm_head). Backward inside training_step would reshard "
                "them in the middle of the step. Freeze them (finetune_vision_layers=False, finetune_projector=False, "
                "no modules_to_save) or use VisionDDPStrategy.")

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            _finish_backward_inside_root_forward(self.model)
        return out

    def validation_step(self, *args: Any, **kwargs: Any):
        self._check_images(args[0] if args else kwargs.get("batch"))
        return super().validation_step(*args, **kwargs)

    @property
    def precision_plugin(self):
        plugin = FSDPStrategy.precision_plugin.fget(self)
        if type(plugin).__name__ == "FSDPPrecision":  # swap in the norm-clipping one, once
            plugin = _norm_clipping_fsdp_precision(plugin, self)
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


class VisionDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (ZeRO stage 2 or 3) for modules that load a Hugging Face model in
    ``configure_model``. Needs the ``deepspeed`` package.

    Lightning runs ``configure_model`` under ``deepspeed.zero.Init`` for stage 3, which partitions every
    parameter as soon as its module is built; ``from_pretrained`` then initialises and loads weights into
    empty partitions (``IndexError: index ... is out of bounds for dimension 0 with size 0``). Here the model
    is built whole and ``deepspeed.initialize`` partitions it (ZeRO-3 converts parameters made outside
    ``zero.Init``): each rank holds the full 16-bit model while it loads, as with ``VisionFSDPStrategy``.
    Stage 2 is unchanged (it never used ``zero.Init``).
    """

    def model_sharded_context(self):
        self._init_config_if_needed()
        return contextlib.nullcontext()


def _norm_clipping_fsdp_precision(plugin: Any, strategy: VisionFSDPStrategy) -> Any:
    """An ``FSDPPrecision`` that clips by norm through the root FSDP module (``clip_grad_norm_``: the norm
    over every rank's shard). Lightning's own refuses ("`gradient_clip_algorithm='norm'` is currently not
    supported for `FSDPPrecision`") because the plugin has no reference to the root; the strategy has."""
    from lightning.pytorch.plugins.precision import FSDPPrecision

    class NormClippingFSDPPrecision(FSDPPrecision):
        def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp._common_utils import TrainingState

            root = strategy.model
            if not isinstance(root, FSDP):
                raise RuntimeError("gradient clipping by norm under FSDP before the model was wrapped")
            if root.training_state == TrainingState.IDLE:  # automatic optimisation: after the step's backward
                root.clip_grad_norm_(clip_val)
                return
            # manual optimisation (GRPO) clips inside training_step, i.e. inside the root's forward, where
            # FSDP's clip_grad_norm_ refuses to run: the same computation over this rank's gradient shards
            params = [p for g in getattr(optimizer, "_optimizer", optimizer).param_groups for p in g["params"]]
            clip_sharded_grad_norm_(params, clip_val, strategy.sharding_strategy)

    clipping = NormClippingFSDPPrecision(plugin.precision, getattr(plugin, "scaler", None))
    return clipping


def clip_sharded_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, sharding_strategy: Any = None,
                            eps: float = 1e-6) -> torch.Tensor:
    """Clip gradients whose elements are split over the ranks (FSDP ``use_orig_params``: each rank holds a
    disjoint shard, or nothing) to a total L2 norm of ``max_norm``; returns the total norm. The squared
    norms are summed over the ranks (FULL_SHARD, SHARD_GRAD_OP), not for NO_SHARD (every rank holds it all).

    Example:
        >>> clip_sharded_grad_norm_(model.parameters(), 1.0, ShardingStrategy.FULL_SHARD)
    """
    name = getattr(sharding_strategy, "name", str(sharding_strategy or "FULL_SHARD"))
    if "HYBRID" in name:
        raise NotImplementedError("clipping inside a step under HYBRID_SHARD: use FULL_SHARD, or clip with "
                                  "automatic optimisation (Trainer(gradient_clip_val=...))")
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for g in grads:
        sq += g.detach().float().pow(2).sum()
    if name != "NO_SHARD" and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq)  # every rank joins, also one holding no gradient
    total = sq.sqrt()
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def _always_used_root_weights_train(model: nn.Module) -> bool:
    """Whether the token embeddings or the lm_head train (they get a gradient in every step)."""
    hf = _hf_model(model)
    spec = _family_spec(hf)
    parts = [_submodule(hf, spec.embed_tokens), _submodule(hf, spec.lm_head)] if spec is not None else \
        [hf.get_input_embeddings(), hf.get_output_embeddings()]
    return any(p.requires_grad for part in parts if part is not None for p in part.parameters())


def _root_has_trainable(root: nn.Module) -> bool:
    handle = getattr(root, "_handle", None)
    return bool(handle is not None and handle.flat_param.requires_grad)


def _finish_backward_inside_root_forward(root: nn.Module) -> None:
    """What FSDP1's post-backward final callback does, for a backward run *inside* the root's forward
    (manual optimisation: ``manual_backward`` in ``training_step``, which Lightning runs through the root's
    forward). FSDP queues that callback from the root's pre-backward hook, which only fires for outputs of
    a finished root forward, so here it never runs: the gradients would not be waited for (GPU streams),
    not moved into ``.grad`` (``prepare_gradient_for_optim``), and the units would stay in their backward
    state (later ``summon_full_params`` / ``state_dict`` refuse). Done for every unit except the root,
    which is still inside its forward (its parameters must stay gathered; ``setup`` refuses trainable
    weights in it). Uses FSDP1 internals (torch 2.11-2.14)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import TrainingState
    from torch.distributed.fsdp._flat_param import HandleTrainingState
    from torch.distributed.fsdp._runtime_utils import _catch_all_reshard, _finalize_params

    if not isinstance(root, FSDP) or getattr(root, "_post_backward_callback_queued", False):
        return  # a normal backward: FSDP's own callback runs
    if root._sync_gradients:
        current = root._device_handle.current_stream()
        current.wait_stream(root._post_backward_stream)
        if root._all_reduce_stream is not current:
            current.wait_stream(root._all_reduce_stream)
        if root.cpu_offload.offload_params:
            current.synchronize()
    for state in root._all_fsdp_states:
        if state is root:
            continue
        _catch_all_reshard(state)
        _finalize_params(state)
        state.training_state = TrainingState.IDLE
        handle = state._handle
        if handle:
            handle._ran_pre_backward_hook = False
            handle._needs_pre_backward_unshard = False
            handle._post_forward_index = None
            handle._training_state = HandleTrainingState.IDLE
            handle._prefetched = False


def _already_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _overrides_state_dict(module: nn.Module) -> bool:
    return type(module).state_dict is not nn.Module.state_dict and isinstance(getattr(module, "model", None),
                                                                             nn.Module)


def make_strategy(name: str = "ddp", **kwargs: Any) -> Strategy:
    """A Lightning strategy for ``VisionSFTModule`` / ``VisionGRPOModule``.

    Args:
        name: "ddp", "fsdp", "deepspeed_stage_2" or "deepspeed_stage_3".
        **kwargs: options of ``VisionDDPStrategy`` / ``VisionFSDPStrategy`` / Lightning's ``DeepSpeedStrategy``.

    Example:
        >>> L.Trainer(accelerator="gpu", devices=2, strategy=make_strategy("fsdp", wrap_vision_blocks=False))
    """
    if name == "ddp":
        return VisionDDPStrategy(**kwargs)
    if name == "fsdp":
        return VisionFSDPStrategy(**kwargs)
    if name in ("deepspeed_stage_2", "deepspeed_stage_3"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ImportError(f"strategy {name!r} needs the `deepspeed` package (pip install deepspeed, with a CUDA "
                              "toolkit matching torch); it is not installed. Use 'ddp' or 'fsdp' instead.") from err
        return VisionDeepSpeedStrategy(stage=int(name[-1]), **kwargs)
    raise ValueError(f"strategy name {name!r}: use one of {', '.join(STRATEGY_NAMES)}")


# ------------------------------------------------------------------------------------------ validation
def _strategy_kind(strategy: Any) -> str:
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
    kind = _strategy_kind(strategy)
    if kind not in ("fsdp", "deepspeed3") or quantization in (None, "", "none", "None"):
        return
    label = "fsdp" if kind == "fsdp" else "deepspeed_stage_3"
    if quantization == "8bit":
        raise ValueError(f"strategy={label} with quantization='8bit': bitsandbytes int8 weights cannot be sharded. "
                         "Use quantization='4bit' with bnb_4bit_quant_storage equal to dtype, or strategy=ddp.")
    if quantization == "4bit":
        from vlm_lightning.models.loading import resolve_dtype

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
    """Validate ``module.trainer.strategy`` against the module's quantisation settings; call from ``setup``.

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


# ------------------------------------------------------------------------------------ gathering state
def clean_parameter_name(name: str) -> str:
    """Drop the wrapper segments FSDP and activation checkpointing insert (``_fsdp_wrapped_module.``)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _strategy_of(trainer_or_strategy: Any) -> Strategy:
    return trainer_or_strategy.strategy if hasattr(trainer_or_strategy, "strategy") else trainer_or_strategy


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
    strategy = _strategy_of(trainer)
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

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(wrapped, FSDP):
        # rank0_only + offload_to_cpu: only rank 0 holds the full tensors, on the CPU; offload needs a GPU,
        # and torch refuses it for NO_SHARD (what FSDP uses on a single device)
        from torch.distributed.fsdp import ShardingStrategy

        offload = (wrapped.compute_device.type == "cuda"
                   and getattr(wrapped, "sharding_strategy", None) != ShardingStrategy.NO_SHARD)
        with FSDP.summon_full_params(wrapped, writeback=False, rank0_only=rank0_only and offload,
                                     offload_to_cpu=offload):
            return read() if (is_zero or not rank0_only) else {}
    if _strategy_kind(strategy) == "deepspeed3":
        import deepspeed

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
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    strategy = _strategy_of(trainer)
    # PEFT picks adapter keys by the model's module names, which carry FSDP's wrapper segments: keep them
    # for the selection, clean them after
    full = gather_full_state_dict(trainer, pl_module, trainable_only=True, clean_names=False)
    error: BaseException | None = None
    if getattr(strategy, "global_rank", 0) == 0:
        try:
            peft_model = pl_module.model
            sd = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name="default")
            sd = {clean_parameter_name(k): v for k, v in sd.items()}
            if not sd:
                raise RuntimeError(f"save_adapter_gathered: no adapter weight among {len(full)} trainable tensors")
            directory.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            peft_model.peft_config["default"].save_pretrained(str(directory))
            processor = getattr(pl_module, "processor", None)
            if processor is not None:
                processor.save_pretrained(str(directory))
        except BaseException as err:  # let the other ranks leave the barrier, then raise
            error = err
    if hasattr(strategy, "barrier"):
        strategy.barrier("vlm_lightning.save_adapter_gathered")
    if error is not None:
        raise error
    return directory


def run_unsharded(trainer: Any, pl_module: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``pl_module.<method>(*args, **kwargs)`` with FSDP's root unit gathered, as Lightning runs
    ``training_step``: through the wrapped model's ``forward``. Needed for model calls made outside a step,
    e.g. ``generate`` from a callback: there, FSDP's root unit (embeddings, vision tower, lm_head) is
    still sharded. A plain call for every other strategy. Under FSDP it is a collective: every rank must
    make the same calls (HF ``generate`` then keeps the ranks in step by itself, ``synced_gpus``).

    Example:
        >>> texts = run_unsharded(trainer, module, "generate", batch, max_new_tokens=32)
    """
    strategy = _strategy_of(trainer)
    wrapped = getattr(strategy, "model", None)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(wrapped, FSDP) and wrapped is not pl_module:
        return strategy._forward_redirection(wrapped, pl_module, method, *args, **kwargs)
    return getattr(pl_module, method)(*args, **kwargs)


def shards_parameters(trainer: Any) -> bool:
    """Whether the trainer's strategy shards parameters (FSDP, ZeRO-3): then no single rank holds the model."""
    return _strategy_kind(_strategy_of(trainer)) in ("fsdp", "deepspeed3")


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


__all__ = [
    "LayerWrapPolicy", "STRATEGY_NAMES", "VisionDDPStrategy", "VisionDeepSpeedStrategy", "VisionFSDPStrategy",
    "batch_has_images",
    "check_module_strategy", "clean_parameter_name", "clip_sharded_grad_norm_", "exportable_source",
    "gather_full_state_dict", "layer_class_names", "make_strategy", "run_unsharded", "save_adapter_gathered",
    "shards_parameters", "validate_strategy_for_quantization", "vision_parameters_trainable",
]
