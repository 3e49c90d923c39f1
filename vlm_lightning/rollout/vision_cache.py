"""Image features computed once per prompt batch and reused by every forward of a GRPO step (frozen towers).

A GRPO step runs the same B prompts' images through the model many times: the rollout's prefill (G times on
the HF path), the old and reference log-probs, and ``num_iterations`` policy passes, each on whole tiles of the
prompt batch (``batch.tile_batch``). When the vision tower and the projector have no trainable weight their
output is the same every time, so ``cached_image_features`` computes it once and hands the cached features,
repeated per tile, to every later call.

How: for the duration of the block the inner multimodal model's ``get_image_features`` (what every family's
forward calls with ``pixel_values``) is shadowed by an instance attribute. A call whose ``pixel_values`` are
``k`` exact copies of the prompt batch's (checked with ``torch.equal``) gets the features of the first copy,
computed once under ``torch.no_grad`` from the first 1/k of every tensor argument, tiled ``k`` times (tensors
concatenated along dim 0, per-image tuples repeated), which is what the tower returns for the tiled input.
Any other call runs the real tower. Everything else the forward does (embedding, placing the features at the
image tokens, Qwen-VL's M-RoPE positions from ``input_ids`` and ``image_grid_thw``) is untouched, so the
result is exact: ``tests/rollout/test_vision_cache.py`` compares log-probs and generations per family,
``tests/modules/test_grpo_step.py`` a whole GRPO step's loss and LoRA gradients.

Valid only when the tower is frozen: with a trainable vision tower or projector (vision LoRA,
``finetune_projector``, a full fine-tune) the features must carry gradients, ``vision_is_frozen`` is False and
the block changes nothing (the uncached path). Left out: video features, and caching across steps.

Example:
    >>> with cached_image_features(peft_model, model_inputs(prompt_batch)) as cache:   # None: not frozen
    ...     out = generate(peft_model, prompt_batch, 8, tok, max_new_tokens=256)
    ...     logp = completion_logprobs(peft_model, model_inputs(tile_batch(prompt_batch, 8)), ids, mask)
    >>> cache.stats   # {'computed': 1, 'reused': 2, 'passed_through': 0}
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..models.families import get_family_spec
from ..models.hf import unwrap_model

__all__ = ["ImageFeatureCache", "cached_image_features", "tile_features", "vision_is_frozen"]

_NOT_TILED = ("hidden_states", "attentions")  # per-layer tuples of the tower, which no forward reads


def vision_is_frozen(model: nn.Module) -> bool:
    """True when neither the vision tower nor the projector has a trainable weight or a LoRA layer."""
    hf = unwrap_model(model)
    try:
        spec = get_family_spec(hf)
        parts = [hf.get_submodule(spec.vision_tower), hf.get_submodule(spec.projector)]
    except (AttributeError, KeyError, ValueError):
        return False
    for part in parts:
        if any(p.requires_grad for p in part.parameters()):
            return False
        if any(hasattr(m, "lora_A") for m in part.modules()):
            return False
    return True


def _tile(value: Any, k: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value if k == 1 else torch.cat([value] * k, dim=0)
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(list(value) * k)
    return value


def tile_features(output: Any, k: int) -> Any:
    """The tower's output for the prompt batch tiled ``k`` times, from its output for one copy.

    Tensors (flat Qwen features (n_tokens, H), per-image (n_images, T, H)) are concatenated ``k`` times along
    dim 0, tuples of per-image tensors repeated ``k`` times, Qwen3-VL's per-layer ``deepstack_features``
    concatenated layer by layer; the tower's per-layer ``hidden_states`` / ``attentions`` are dropped.
    """
    if isinstance(output, Mapping):  # ModelOutput (a dict subclass): a shallow copy with every field tiled
        fields = {}
        for name, v in output.items():
            if name in _NOT_TILED:
                continue
            if name == "deepstack_features" and isinstance(v, (list, tuple)):
                fields[name] = type(v)(_tile(layer, k) for layer in v)
            else:
                fields[name] = _tile(v, k)
        return type(output)(**fields)
    if isinstance(output, tuple) and not all(isinstance(v, torch.Tensor) for v in output):
        return tuple(tile_features(v, k) for v in output)
    return _tile(output, k)


def _copies(pixel_values: Any, base: torch.Tensor) -> int | None:
    """k when ``pixel_values`` is exactly ``k`` copies of ``base`` along dim 0, else None."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.shape[1:] != base.shape[1:]:
        return None
    n, m = pixel_values.shape[0], base.shape[0]
    if m == 0 or n % m or pixel_values.device != base.device or pixel_values.dtype != base.dtype:
        return None
    k = n // m
    if not torch.equal(pixel_values.reshape(k, *base.shape), base.unsqueeze(0).expand(k, *base.shape)):
        return None
    return k


def _first_copy(value: Any, k: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] % k == 0:
        return value[: value.shape[0] // k]
    return value


@dataclasses.dataclass
class ImageFeatureCache:
    """The prompt batch's pixel values and, once computed, the tower's output for them."""

    pixel_values: torch.Tensor
    output: Any = None
    stats: dict = dataclasses.field(default_factory=lambda: {"computed": 0, "reused": 0, "passed_through": 0})

    def hook(self, real):
        @functools.wraps(real)  # the real signature: generate reads it to pre-encode the images
        def get_image_features(*args, **kwargs):
            pv = args[0] if args else kwargs.get("pixel_values")
            k = _copies(pv, self.pixel_values)
            if k is None:
                self.stats["passed_through"] += 1
                return real(*args, **kwargs)
            if self.output is None:
                with torch.no_grad():  # frozen tower and projector: no gradient is lost
                    self.output = real(*(_first_copy(a, k) for a in args),
                                       **{n: _first_copy(v, k) for n, v in kwargs.items()})
                self.stats["computed"] += 1
            else:
                self.stats["reused"] += 1
            return tile_features(self.output, k)
        return get_image_features


@contextlib.contextmanager
def cached_image_features(model: nn.Module, prompt_inputs: Mapping[str, Any],
                          enabled: bool = True) -> Iterator[ImageFeatureCache | None]:
    """Reuse the prompt batch's image features for every forward in the block (see the module docstring).

    Args:
        model: the HF VLM or its PeftModel.
        prompt_inputs: the untiled prompt batch's model inputs (B rows; ``pixel_values`` on the model's device).
        enabled: False (or a trainable tower / projector, or no ``pixel_values``): nothing is patched.

    Yields:
        the ``ImageFeatureCache`` (its ``stats`` count computed / reused / passed-through calls), or None
        when the uncached path runs.
    """
    pv = prompt_inputs.get("pixel_values")
    inner = getattr(unwrap_model(model), "model", None)
    real = getattr(inner, "get_image_features", None)
    if not enabled or not isinstance(pv, torch.Tensor) or real is None or not vision_is_frozen(model):
        yield None
        return
    cache = ImageFeatureCache(pv)
    inner.get_image_features = cache.hook(real)  # an instance attribute shadows the method; removed below
    try:
        yield cache
    finally:
        del inner.get_image_features
