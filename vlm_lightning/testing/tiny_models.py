"""Tiny random-weight VLMs for every supported family, built locally (no downloads).

`make_tiny_vlm(family, path)` writes a Hugging Face directory (config, fp32 safetensors, tokenizer,
processor, chat template, generation config) that `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` load with no missing or unexpected keys. Sizes: text hidden 64,
2 layers, 4 heads (2 KV heads), vocab ~600; vision hidden 32, 2 layers; a 56x56 image becomes a
handful of image tokens. Each family keeps its real special tokens and chat-template structure.

Deliberately left out: video inputs (the Qwen video processor is saved but not exercised) and the
tool-calling branches of the real templates.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, PretrainedConfig

from . import chat_templates
from .tokenizer import build_tokenizer

# Text decoder shared by all families (the vision side is per family).
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)


@dataclass
class _Built:
    """What a family builder returns: the model config and the processor (tokenizer inside)."""

    config: PretrainedConfig
    processor: Any
    eos_token_ids: list[int]
    pad_token_id: int
    bos_token_id: int | None
    notes: dict = field(default_factory=dict)


def _padded_vocab(n: int, multiple: int = 64) -> int:
    # The real Qwen / LLaVA / Gemma checkpoints pad the embedding matrix past len(tokenizer); we keep
    # that quirk so code that assumes vocab_size == len(tokenizer) fails here too.
    return int(math.ceil(n / multiple) * multiple)


def _merge(base: dict, overrides: dict) -> dict:
    """Recursive dict merge: nested dicts (text_config, vision_config) merge key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------- Qwen-VL
_QWEN_SPECIALS = [  # the real order (ids 151643..151656 in the real vocabulary)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


def _build_qwen(family: str, overrides: dict, processor_kwargs: dict) -> _Built:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = build_tokenizer(
        leading=[], trailing=_QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>",
        chat_template=chat_templates.QWEN2_VL,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    text = dict(
        _TEXT, vocab_size=_padded_vocab(len(tok)), rms_norm_eps=1e-6, max_window_layers=2,
        # mrope_section splits head_dim/2 = 8 rotary pairs over (t, h, w) like the real [16, 24, 24].
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    text.pop("head_dim")  # Qwen2-VL derives head_dim = hidden / heads = 16
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        tie = True  # as Qwen2-VL-2B
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        tie = False  # as Qwen2.5-VL-7B
    cfg = dict(
        model_type=family, text_config=text, vision_config=vision, tie_word_embeddings=tie,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    cfg = _merge(cfg, overrides)
    config = AutoConfig.for_model(**cfg)
    # 56x56 -> 4x4 patches of 14 -> 2x2 = 4 tokens after the 2x2 merge; 112x56 -> 8; at most 64 tokens.
    pix = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    pix.update({k: processor_kwargs.pop(k) for k in list(processor_kwargs) if k in ("min_pixels", "max_pixels")})
    v = config.vision_config
    common = dict(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
    image_processor = Qwen2VLImageProcessor(**pix, **common)
    video_processor = Qwen2VLVideoProcessor(**pix, **common)
    proc_cls = _processor_class(family)
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=chat_templates.QWEN2_VL, **processor_kwargs)
    return _Built(config, processor, eos_token_ids=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                  pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])


def _processor_class(family: str):
    import transformers

    name = {
        "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "llava_next": "LlavaNextProcessor",
        "pixtral": "PixtralProcessor", "gemma3": "Gemma3Processor", "mistral3": "PixtralProcessor",
        "mistral3_small": "PixtralProcessor",
    }[family]
    return getattr(transformers, name)


_BUILDERS: dict[str, Callable[[str, dict, dict], _Built]] = {
    "qwen2_vl": _build_qwen,
    "qwen2_5_vl": _build_qwen,
}

TINY_FAMILIES: tuple[str, ...] = (
    "qwen2_vl", "qwen2_5_vl", "llava_next", "pixtral", "gemma3", "mistral3", "mistral3_small",
)


def make_tiny_vlm(
    family: str,
    path: str | Path,
    *,
    seed: int = 0,
    processor_kwargs: dict | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random-weight VLM of `family` to `path` and return the path.

    Args:
        family: one of `TINY_FAMILIES`.
        path: output directory (created).
        seed: torch seed for the random weights; same seed, same weights.
        processor_kwargs: processor/image-processor settings, e.g. `{"max_pixels": 112 * 112}` (Qwen),
            forwarded to the family's processor where it takes them.
        **config_overrides: merged into the model config dict before it is built; nested
            `text_config=` / `vision_config=` dicts merge key by key, e.g.
            `make_tiny_vlm("qwen2_vl", d, text_config={"hidden_size": 128, "num_hidden_layers": 4})`.

    Example:
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> d = make_tiny_vlm("qwen2_vl", "/tmp/tiny-qwen2-vl")
        >>> model = AutoModelForImageTextToText.from_pretrained(d)
        >>> processor = AutoProcessor.from_pretrained(d)
    """
    if family not in _BUILDERS:
        known = ", ".join(TINY_FAMILIES)
        if family in TINY_FAMILIES:
            raise NotImplementedError(f"tiny fixture for family {family!r} is not built yet")
        raise ValueError(f"unknown family {family!r}; known families: {known}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    built = _BUILDERS[family](family, dict(config_overrides), dict(processor_kwargs or {}))

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(built.config, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=built.bos_token_id, eos_token_id=built.eos_token_ids, pad_token_id=built.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    built.processor.save_pretrained(path)
    return path
