"""Cheap speed levers for LoRA SFT, each one switch, each exact (same loss and gradients as without it).

  * ``freeze_vision_autograd``: a vision tower with no trainable weight runs under ``torch.no_grad``.
    Without it, gradient checkpointing's input-gradient hook on the patch embedding (``lora.py``) makes
    autograd record the whole frozen tower: every vision block is recomputed and backpropagated (dX only)
    for nothing. A trainable projector (Qwen's ``merger`` sits *inside* the tower) still runs with grad.
  * ``fuse_lora_forward`` (a LoRA concern, in ``lora.py``): PEFT's LoRA forward with the update added into
    the base GEMM output in place; exact where it runs, PEFT's own forward elsewhere.
  * ``set_checkpointing_mode``: "full" (every decoder layer), "none", "mlp" / "attention" (only that
    sub-block of each decoder layer is recomputed), "every_N" (layers 0, N, 2N, ... checkpointed).
  * ``compile_decoder_layers``: ``torch.compile`` of each decoder layer (``nn.Module.compile``, in place).

Each lever swaps a module's forward through ``patch.swap_forward``, the same mechanism as the kernels, so they
stack on kernel-patched modules. ``apply_speed_levers(model, ...)`` applies the chosen ones to a (PEFT-wrapped)
VLM; ``models.build.build_model`` calls it. Correctness: ``tests/models/test_levers.py``; speed:
``benchmarks/bench_sft_step.py``.

Example:
    >>> model = apply_lora(load_vlm("Qwen/Qwen2.5-VL-7B-Instruct")[0], r=16)
    >>> apply_speed_levers(model, frozen_vision_no_grad=True, fused_lora=True, gradient_checkpointing="every_2")
    {'vision_no_grad': True, 'fused_lora': 196, 'checkpointing': 'every_2', 'compiled_layers': 0}
"""
from __future__ import annotations

import logging
import re
import threading

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .checkpointing import checkpoint_layers
from .families import get_family_spec
from .hf import unwrap_model
from .lora import fuse_lora_forward, projector_paths
from .patch import swap_forward

log = logging.getLogger(__name__)

CHECKPOINTING_MODES = ("none", "full", "lean", "offload", "mlp", "attention", "every_N")
_SUBBLOCK_ATTRS = {"mlp": ("mlp", "feed_forward", "ffn"), "attention": ("self_attn", "attn", "attention")}


def _spec(model: nn.Module, family_spec=None):
    return family_spec if family_spec is not None else get_family_spec(unwrap_model(model))


# ------------------------------------------------------------------------ 1. frozen vision, no autograd
_OUTER_GRAD = threading.local()  # grad mode of the caller of each running no-grad tower (a stack)


def _make_no_grad_forward(original):
    def forward(self, *args, **kwargs):
        outer = torch.is_grad_enabled()
        stack = _OUTER_GRAD.__dict__.setdefault("modes", [])
        stack.append(outer)
        torch.set_grad_enabled(False)
        try:
            return original(self, *args, **kwargs)
        finally:  # also on an exception (e.g. OOM caught by a batch-size finder)
            stack.pop()
            torch.set_grad_enabled(outer)
    return forward


def _make_grad_restoring_forward(original):
    def forward(self, *args, **kwargs):
        # not a context manager: what the tower does after its projector (Qwen: reorder the merged tokens)
        # must stay differentiable; the tower's forward restores the caller's mode when it returns
        stack = _OUTER_GRAD.__dict__.get("modes")
        if stack:
            torch.set_grad_enabled(stack[-1])
        return original(self, *args, **kwargs)
    return forward


def _trainable_outside(root: nn.Module, excluded: list[nn.Module]) -> list[str]:
    skip = {id(p) for m in excluded for p in m.parameters()}
    return [n for n, p in root.named_parameters() if p.requires_grad and id(p) not in skip]


def freeze_vision_autograd(model: nn.Module, family_spec=None) -> bool:
    """Run the vision encoder under ``torch.no_grad`` when none of its weights trains (the projector may).

    Returns False (and changes nothing) when any vision-tower weight outside the projector requires grad
    (vision LoRA, full fine-tune): then the tower must be differentiated. The projector, when it sits inside
    the tower (Qwen's ``visual.merger``), runs with the caller's grad mode, so a trainable projector still
    gets its gradients; one outside the tower (LLaVA's ``multi_modal_projector``) is untouched.

    Example:
        >>> freeze_vision_autograd(apply_lora(model, finetune_vision_layers=False))
        True
    """
    hf = unwrap_model(model)
    spec = _spec(model, family_spec)
    try:
        tower = hf.get_submodule(spec.vision_tower)
    except AttributeError:
        return False
    # the projector parts inside the tower: Qwen's merger, and Qwen3-VL's deepstack mergers (a ModuleList)
    inside = [hf.get_submodule(p) for p in projector_paths(spec) if p.startswith(spec.vision_tower + ".")]
    projectors = [m for part in inside for m in (part if isinstance(part, nn.ModuleList) else [part])]
    trainable = _trainable_outside(tower, projectors)
    if trainable:
        log.info("frozen_vision_no_grad: vision tower has trainable weights (%s, ...): lever off", trainable[0])
        return False
    for projector in projectors:
        if any(p.requires_grad for p in projector.parameters()):
            swap_forward(projector, "grad_restore", _make_grad_restoring_forward)
    swap_forward(tower, "no_grad", _make_no_grad_forward)
    return True


# ----------------------------------------------------------------------------- 2. checkpointing modes
def parse_checkpointing(value: bool | str | None) -> str:
    """``True``/"full" -> "full"; ``False``/None/"none" -> "none"; "mlp", "attention", "every_N" (N >= 1).

    Raises ValueError naming the option for anything else."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    mode = str(value).strip().lower()
    if mode in ("true", "full"):
        return "full"
    if mode in ("false", "none", ""):
        return "none"
    if mode in ("mlp", "attention", "lean", "offload"):
        return mode
    m = re.fullmatch(r"every_(\d+)", mode)
    if m and int(m.group(1)) >= 1:
        return "full" if int(m.group(1)) == 1 else mode
    raise ValueError(f"gradient_checkpointing={value!r}: expected true/false or one of "
                     f"{', '.join(CHECKPOINTING_MODES)} (e.g. 'every_2')")


def _make_checkpointed_forward(original):
    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(original, self, *args, use_reentrant=False, **kwargs)
        return original(self, *args, **kwargs)
    return forward


def _subblock(layer: nn.Module, kind: str) -> nn.Module:
    for attr in _SUBBLOCK_ATTRS[kind]:
        if isinstance(getattr(layer, attr, None), nn.Module):
            return getattr(layer, attr)
    raise ValueError(f"gradient_checkpointing={kind!r}: decoder layer {type(layer).__name__} has no "
                     f"{'/'.join(_SUBBLOCK_ATTRS[kind])} sub-module")


def set_checkpointing_mode(model: nn.Module, mode: bool | str, family_spec=None) -> str:
    """Narrow full activation checkpointing (already enabled by ``apply_lora``/``enable_gradient_checkpointing``)
    to ``mode`` on the language decoder layers; the vision tower keeps its setting. Returns the mode.

    "mlp"/"attention": the layer itself is no longer checkpointed, only that sub-block is (its input is saved,
    its internals recomputed in backward). "lean"/"offload": every layer through ``checkpointing.LayerCheckpoint``
    (the recompute skips the frozen ``down_proj`` GEMM; "offload" keeps the layer inputs in host memory).
    "every_N": layers 0, N, 2N, ... stay checkpointed, the others
    keep their activations. "full"/"none": nothing to change.

    Example:
        >>> set_checkpointing_mode(peft_model, "every_2")   # half the recompute, half the layers' activations
    """
    mode = parse_checkpointing(mode)
    if mode in ("full", "none"):
        return mode
    layers = unwrap_model(model).get_submodule(_spec(model, family_spec).decoder_layers)
    if not any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError(f"gradient_checkpointing={mode!r}: checkpointing is not enabled on the decoder layers "
                         "(enable it first: apply_lora(..., gradient_checkpointing=True))")
    if mode in ("lean", "offload"):
        checkpoint_layers(layers, offload=mode == "offload")
        return mode
    if mode.startswith("every_"):
        n = int(mode.split("_")[1])
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % n == 0
        return mode
    for layer in layers:
        layer.gradient_checkpointing = False
        swap_forward(_subblock(layer, mode), "checkpointed", _make_checkpointed_forward)
    return mode


# ---------------------------------------------------------------------------------------- 3. compile
def compile_decoder_layers(model: nn.Module, backend: str = "inductor", family_spec=None, **compile_kwargs) -> int:
    """``torch.compile`` each language decoder layer in place (regional compilation: one graph per layer
    type, reused by all layers; checkpointing and LoRA stay inside). Returns the number of layers.

    Example:
        >>> compile_decoder_layers(peft_model)              # first step pays the compile time
    """
    layers = unwrap_model(model).get_submodule(_spec(model, family_spec).decoder_layers)
    for layer in layers:
        layer.compile(backend=backend, **compile_kwargs)
    return len(layers)


# ------------------------------------------------------------------------------------------- entry
def apply_speed_levers(model: nn.Module, frozen_vision_no_grad: bool = False, fused_lora: bool = False,
                       gradient_checkpointing: bool | str = "full", compile_layers: bool | str = False,
                       family_spec=None) -> dict:
    """Apply the chosen levers to a loaded (PEFT-wrapped or plain) VLM, after LoRA and kernels.

    Args:
        frozen_vision_no_grad: ``freeze_vision_autograd`` (a no-op when the tower trains).
        fused_lora: ``fuse_lora_forward``.
        gradient_checkpointing: mode for ``set_checkpointing_mode`` (full checkpointing must already be on
            unless the mode is "full"/"none").
        compile_layers: False, True (inductor) or a ``torch.compile`` backend name ("aot_eager" for tests).

    Returns:
        What was applied: {"vision_no_grad": bool, "fused_lora": n_layers, "checkpointing": mode,
        "compiled_layers": n_layers}.
    """
    spec = _spec(model, family_spec)
    out = {"vision_no_grad": False, "fused_lora": 0, "checkpointing": parse_checkpointing(gradient_checkpointing),
           "compiled_layers": 0}
    if frozen_vision_no_grad:
        out["vision_no_grad"] = freeze_vision_autograd(model, spec)
    if fused_lora:
        out["fused_lora"] = fuse_lora_forward(model)
    set_checkpointing_mode(model, out["checkpointing"], spec)
    if compile_layers:
        backend = compile_layers if isinstance(compile_layers, str) else "inductor"
        out["compiled_layers"] = compile_decoder_layers(model, backend=backend, family_spec=spec)
    log.info("speed levers: %s", out)
    return out
