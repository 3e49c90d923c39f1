"""Per-component learning rates: optimizer parameter groups for the vision tower, the projector and the
language model, built from the family table's component paths (``models.families.FamilySpec``).

A parameter belongs to the component whose path is the longest dotted prefix of its name (Qwen's projector,
``model.visual.merger``, sits inside its vision tower ``model.visual`` and still counts as projector). LoRA
weights (``...q_proj.lora_A.default.weight``) and ``modules_to_save`` copies belong to the component of the
module they wrap, because their names keep that module's path. Wrapper segments (PEFT's ``base_model.model.``,
FSDP's ``_fsdp_wrapped_module.``, activation checkpointing's and ``torch.compile``'s) are ignored. The
``lm_head`` counts as language model; LLaVA-NeXT's learned row separator ``model.image_newline`` counts as
projector (it is the vision-to-text glue). A trainable parameter that fits no component raises, naming it, so
no weight ever trains at a learning rate nobody chose.

Left out: weight decay per group, and anything model-loading (``modules.base.VisionModule.configure_optimizers``
calls this on the built model).

Example:
    >>> groups = component_param_groups(model, {"vision": 1e-5, "projector": 1e-4, "language": None})
    >>> torch.optim.AdamW(groups, lr=2e-4)   # the language group takes the optimizer's lr  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from vlm_lightning.models.families import FamilySpec, get_family_spec

__all__ = ["COMPONENTS", "component_of", "component_param_groups"]

COMPONENTS = ("vision", "projector", "language")

# name segments that wrappers insert and that are not part of the model's own module path
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# parameters that live outside the three component paths, by family
_EXTRA = {"llava_next": {"model.image_newline": "projector"}}


def _model_path(name: str) -> str:
    if name.startswith("base_model.model."):  # PeftModel -> LoraModel -> the *ForConditionalGeneration
        name = name[len("base_model.model."):]
    return ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)


def component_of(name: str, spec: FamilySpec) -> str | None:
    """``"vision"``, ``"projector"`` or ``"language"`` for a parameter name of the model (wrapped or not),
    None when it fits no component.

    Example:
        >>> component_of("base_model.model.model.visual.merger.mlp.0.weight", get_family_spec("qwen2_vl"))
        'projector'
    """
    path = _model_path(name)
    extra = _EXTRA.get(spec.name, {})
    if path in extra:
        return extra[path]
    prefixes = [(spec.vision_tower, "vision"), (spec.projector, "projector"),
                (spec.language_model, "language"), (spec.lm_head, "language")]
    prefixes += [(p, "projector") for p in getattr(spec, "extra_projectors", ())]  # e.g. Qwen3-VL's deepstack
    best, best_len = None, -1
    for prefix, component in prefixes:
        if (path == prefix or path.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = component, len(prefix)
    return best


def component_param_groups(model: torch.nn.Module, lrs: Mapping[str, float | None],
                           spec: FamilySpec | None = None) -> list[dict]:
    """Optimizer parameter groups, one per component that has trainable parameters, in ``COMPONENTS`` order.

    Args:
        model: the model (PeftModel, FSDP-wrapped or plain); only ``requires_grad`` parameters are grouped.
        lrs: learning rate per component (keys from ``COMPONENTS``); None or a missing key leaves the group
            without an ``lr`` key, so it takes the optimizer's own ``lr``.
        spec: the family (default: ``get_family_spec(model)``).

    Returns:
        ``[{"params": [...], "name": component, "lr": lr?}, ...]``: every trainable parameter in exactly one
        group. ``name`` is kept by torch optimizers in ``param_groups``.
    """
    unknown = set(lrs) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}: use {list(COMPONENTS)}")
    for component, lr in lrs.items():
        if lr is not None and lr < 0:
            raise ValueError(f"lr_{component}={lr}: a learning rate cannot be negative")
    spec = spec or get_family_spec(model)
    params: dict[str, list[torch.nn.Parameter]] = {c: [] for c in COMPONENTS}
    seen: set[int] = set()
    orphans = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights are listed once
            continue
        seen.add(id(p))
        component = component_of(name, spec)
        if component is None:
            orphans.append(name)
        else:
            params[component].append(p)
    if orphans:
        raise ValueError(f"per-component learning rates: trainable parameters {orphans[:5]} (of {len(orphans)}) "
                         f"are outside the {spec.name} family's vision tower ({spec.vision_tower}), projector "
                         f"({spec.projector}) and language model ({spec.language_model}, {spec.lm_head}); "
                         "record where they belong in modules/param_groups.py")
    groups = []
    for component in COMPONENTS:
        if params[component]:
            group = {"params": params[component], "name": component}
            if lrs.get(component) is not None:
                group["lr"] = float(lrs[component])
            groups.append(group)
    return groups
