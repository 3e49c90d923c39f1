"""The FSDP1 internals ``VisionFSDPStrategy`` depends on, quarantined in one file.

Each function names the private API it touches (torch 2.11-2.14, Lightning 2.4-2.7). They exist because
Lightning's ``FSDPStrategy`` wraps torch FSDP1 and leaves three gaps our modules hit:

* ``wrap_on_cpu``: FSDP on the CPU (gloo), which Lightning's wrapping refuses (CPU tests only);
* ``finish_backward_inside_root_forward``: manual optimisation (GRPO) backpropagates inside the root's
  forward, where FSDP's own end-of-backward callback never runs;
* ``norm_clipping_precision`` / ``clip_sharded_grad_norm_``: gradient clipping by norm, which Lightning's
  ``FSDPPrecision`` refuses, also inside a step.

Left out: FSDP2 (``fully_shard`` / Lightning's ``ModelParallelStrategy``), which would make most of this
unnecessary; it has to be measured on GPUs before this file can go.

Example:
    >>> plugin = norm_clipping_precision(FSDPPrecision("bf16-true"), strategy)   # what VisionFSDPStrategy does
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision

# private Lightning helpers that FSDPStrategy._setup_model uses after wrapping
from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

# private FSDP1 runtime state: the training-state enums and the post-backward steps of one unit
from torch.distributed.fsdp._common_utils import TrainingState
from torch.distributed.fsdp._flat_param import HandleTrainingState
from torch.distributed.fsdp._runtime_utils import _catch_all_reshard, _finalize_params

__all__ = ["already_fsdp", "clip_sharded_grad_norm_", "finish_backward_inside_root_forward",
           "norm_clipping_precision", "root_has_trainable", "wrap_on_cpu"]


def already_fsdp(model: nn.Module) -> bool:
    """Whether some submodule of ``model`` is already an FSDP unit."""
    return any(isinstance(m, FSDP) for m in model.modules())


def wrap_on_cpu(strategy: Any, model: nn.Module) -> FSDP:
    """``FSDPStrategy._setup_model`` for the CPU. Lightning passes ``device_id=root_device.index`` (None on
    the CPU), and FSDP then looks for an accelerator and refuses ("FSDP needs a non-CPU accelerator
    device"); an explicit CPU device works with gloo. Uses Lightning's private
    ``_move_torchmetrics_to_device`` and ``_setup_activation_checkpointing``, as its own method does."""
    model = FSDP(module=model, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
                 sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"), **strategy.kwargs)
    _move_torchmetrics_to_device(model, strategy.root_device)
    _setup_activation_checkpointing(model, strategy._activation_checkpointing_kwargs)
    return model


def root_has_trainable(root: nn.Module) -> bool:
    """Whether the root unit's own flat parameter trains (reads FSDP1's private ``_handle``)."""
    handle = getattr(root, "_handle", None)
    return bool(handle is not None and handle.flat_param.requires_grad)


def finish_backward_inside_root_forward(root: nn.Module) -> None:
    """What FSDP1's post-backward final callback does, for a backward run *inside* the root's forward
    (manual optimisation: ``manual_backward`` in ``training_step``, which Lightning runs through the root's
    forward). FSDP queues that callback from the root's pre-backward hook, which only fires for outputs of
    a finished root forward, so here it never runs: the gradients would not be waited for (GPU streams),
    not moved into ``.grad`` (``prepare_gradient_for_optim``), and the units would stay in their backward
    state (later ``summon_full_params`` / ``state_dict`` refuse). Done for every unit except the root,
    which is still inside its forward (its parameters must stay gathered; the strategy's ``setup`` refuses
    trainable weights in it).

    Private FSDP1 API: ``_runtime_utils._catch_all_reshard`` / ``_finalize_params``, ``TrainingState``,
    ``_flat_param.HandleTrainingState``, and the state attributes ``_post_backward_callback_queued``,
    ``_sync_gradients``, ``_device_handle``, ``_post_backward_stream``, ``_all_reduce_stream``,
    ``_all_fsdp_states``, ``_handle``."""
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


class NormClippingFSDPPrecision(FSDPPrecision):
    """An ``FSDPPrecision`` that clips by norm through the root FSDP module (``clip_grad_norm_``: the norm
    over every rank's shard). Lightning's own refuses ("`gradient_clip_algorithm='norm'` is currently not
    supported for `FSDPPrecision`") because the plugin has no reference to the root; the strategy has.
    Reads the root's ``training_state`` (private ``TrainingState``) to tell a step's inside from after it."""

    def __init__(self, precision: Any, scaler: Any, strategy: Any):
        super().__init__(precision, scaler)
        self.fsdp_strategy = strategy

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        root = self.fsdp_strategy.model
        if not isinstance(root, FSDP):
            raise RuntimeError("gradient clipping by norm under FSDP before the model was wrapped")
        if root.training_state == TrainingState.IDLE:  # automatic optimisation: after the step's backward
            root.clip_grad_norm_(clip_val)
            return
        # manual optimisation (GRPO) clips inside training_step, i.e. inside the root's forward, where
        # FSDP's clip_grad_norm_ refuses to run: the same computation over this rank's gradient shards
        params = [p for g in getattr(optimizer, "_optimizer", optimizer).param_groups for p in g["params"]]
        clip_sharded_grad_norm_(params, clip_val, self.fsdp_strategy.sharding_strategy)


def norm_clipping_precision(plugin: FSDPPrecision, strategy: Any) -> NormClippingFSDPPrecision:
    """``plugin`` (Lightning's ``FSDPPrecision``) as a ``NormClippingFSDPPrecision`` bound to ``strategy``."""
    return NormClippingFSDPPrecision(plugin.precision, getattr(plugin, "scaler", None), strategy)


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
