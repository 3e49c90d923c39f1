"""Which layers a loaded VLM has and which of its parts train: the facts a sharding strategy needs.

Read from the family table (``families.py``: the decoder-layer / vision-block ModuleLists, the vision tower,
projector, embeddings and lm_head paths); for a model no family matches, class-name patterns stand in
(``*DecoderLayer``, ``*VisionBlock`` ...). Nothing here changes a model or knows about strategies; the
distributed strategies (``vlm_lightning.distributed``) ask these questions when they wrap the model.

Example:
    >>> layer_class_names(model)                     # model: HF or PEFT-wrapped
    {'Qwen2VLDecoderLayer', 'Qwen2VLVisionBlock'}
    >>> vision_parameters_trainable(peft_model)      # LoRA on the vision tower or projector?
    False
"""
from __future__ import annotations

import re

from torch import nn

from .families import FamilySpec, get_family_spec
from .hf import unwrap_model

__all__ = ["DEFAULT_TEXT_LAYER_PATTERN", "DEFAULT_VISION_LAYER_PATTERN", "always_used_root_weights_train",
           "layer_class_names", "vision_parameters_trainable"]

#: class names treated as transformer layers when the family table cannot name them
DEFAULT_TEXT_LAYER_PATTERN = r".*DecoderLayer$"
DEFAULT_VISION_LAYER_PATTERN = r".*(VisionBlock|EncoderLayer|AttentionLayer|VisionLayer)$"


def _family_spec(hf_model: nn.Module) -> FamilySpec | None:
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
    hf = unwrap_model(model)
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
    hf = unwrap_model(model)
    spec = _family_spec(hf)
    if spec is not None:
        parts = [_submodule(hf, spec.vision_tower), _submodule(hf, spec.projector)]
        return any(p.requires_grad for part in parts if part is not None for p in part.parameters())
    return any(p.requires_grad and re.search(r"(visual|vision_tower|multi_modal_projector)\.", n)
               for n, p in hf.named_parameters())


def always_used_root_weights_train(model: nn.Module) -> bool:
    """Whether the token embeddings or the lm_head train (they get a gradient in every step)."""
    hf = unwrap_model(model)
    spec = _family_spec(hf)
    parts = [_submodule(hf, spec.embed_tokens), _submodule(hf, spec.lm_head)] if spec is not None else \
        [hf.get_input_embeddings(), hf.get_output_embeddings()]
    return any(p.requires_grad for part in parts if part is not None for p in part.parameters())
