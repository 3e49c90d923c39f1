"""THE family table: where each VLM family keeps its parts, its vision tokens, and its llama.cpp layout.

One `FamilySpec` per family; every room asks here instead of keeping its own list. The second half of the
file answers the family questions the data pipeline asks of a *processor* (the one object a collator has):
its image token, every vision special token, the smallest usable image side, whether the forward needs
``mm_token_type_ids``, and how many image features the vision tower yields. What is left out: facts a loaded
model answers itself (``models.hf``), and the GGUF converters (``export.gguf.arch``, keyed by the llama.cpp
names recorded here). Attribute paths are dotted paths from the `*ForConditionalGeneration`
model (what `AutoModelForImageTextToText` returns); `model.get_submodule(spec.vision_tower)` finds
the module. Checked against transformers 5.17 and 5.24 modeling code (same layout in both:
`model.language_model`, `model.visual` / `model.vision_tower`, `model.multi_modal_projector`,
top-level `lm_head`).

Example:
    >>> spec = get_family_spec("qwen2_5_vl")
    >>> spec.decoder_layers
    'model.language_model.layers'
    >>> get_family_spec(model).name  # from a model, a config (object or config.json dict), or a model_type
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SWIGLU_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """Static facts about one VLM family.

    Attributes:
        name: family key ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "pixtral", "gemma3", "mistral3",
            "mistral3_small").
        model_types: HF `config.model_type` values of the top-level config.
        text_model_types: `config.text_config.model_type` values that select this family (empty: any).
        vision_model_types: `config.vision_config.model_type` values that select it (empty: any).
        language_model: dotted path to the text decoder (embeddings + layers + final norm).
        vision_tower: dotted path to the vision encoder.
        projector: dotted path to the vision->text projector (for Qwen it sits inside the tower).
        extra_projectors: further projector modules beside ``projector`` (Qwen3-VL's deepstack mergers, an
            ``nn.ModuleList`` inside the tower): never vision-LoRA targets, trained with ``finetune_projector``.
        lm_head: dotted path to the output projection.
        decoder_layers: dotted path to the text decoder's `nn.ModuleList` of layers.
        vision_layers: dotted path to the vision encoder's `nn.ModuleList` of blocks.
        embed_tokens: dotted path to the text token embedding.
        attention_modules: Linear names inside a text decoder layer's attention.
        mlp_modules: Linear names inside a text decoder layer's MLP.
        vision_attention_modules / vision_mlp_modules: the same inside a vision block.
        image_special_tokens: every image-related token that must never carry a label (placeholder,
            begin/end/break markers); the collator masks each one the tokenizer has.
        gguf_text_arch: llama.cpp's architecture for the language model ("qwen2vl", "qwen3vl", "gemma3",
            "llama", "mistral3"), or None when there is no GGUF export.
        gguf_projector: llama.cpp's projector type of the mmproj file ("qwen2vl_merger", "pixtral", ...).
        gguf_refusal: why a family has no GGUF export (said in the error), or "".
        cross_attention: name of the cross-attention module inside a text decoder layer (Llama 3.2 Vision's
            ``cross_attn``), or "" when images enter as tokens; its linears are LoRA'd by ``finetune_cross_attention``.
    """

    name: str
    model_types: tuple[str, ...]
    language_model: str
    vision_tower: str
    projector: str
    lm_head: str
    decoder_layers: str
    vision_layers: str
    embed_tokens: str
    attention_modules: tuple[str, ...]
    mlp_modules: tuple[str, ...]
    vision_attention_modules: tuple[str, ...]
    vision_mlp_modules: tuple[str, ...]
    image_special_tokens: tuple[str, ...]
    text_model_types: tuple[str, ...] = ()
    vision_model_types: tuple[str, ...] = ()
    extra_projectors: tuple[str, ...] = ()
    gguf_text_arch: str | None = None
    gguf_projector: str | None = None
    gguf_refusal: str = ""
    cross_attention: str = ""


# every family's language model sits under model.language_model (transformers 5 layout)
_DECODER = dict(
    language_model="model.language_model",
    lm_head="lm_head",
    decoder_layers="model.language_model.layers",
    embed_tokens="model.language_model.embed_tokens",
    attention_modules=ATTENTION,
    mlp_modules=SWIGLU_MLP,
)

_QWEN_COMMON = dict(
    _DECODER,
    vision_tower="model.visual",
    projector="model.visual.merger",
    vision_layers="model.visual.blocks",
    image_special_tokens=("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|vision_pad|>"),
    gguf_text_arch="qwen2vl",
)

# LLaVA-style (vision_tower + multi_modal_projector + language_model under `model`).
_LLAVA_PATHS = dict(_DECODER, vision_tower="model.vision_tower", projector="model.multi_modal_projector")
_PIXTRAL_VISION = dict(
    vision_layers="model.vision_tower.transformer.layers",
    vision_attention_modules=ATTENTION,  # PixtralAttention: q/k/v/o_proj
    vision_mlp_modules=SWIGLU_MLP,  # PixtralMLP: gate/up/down_proj
)
_MISTRAL = dict(image_special_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"), gguf_projector="pixtral")

FAMILIES: dict[str, FamilySpec] = {
    "qwen2_vl": FamilySpec(
        name="qwen2_vl", model_types=("qwen2_vl",),
        # VisionAttention has a fused `qkv` and `proj`; VisionMlp has fc1/fc2 (quick_gelu).
        vision_attention_modules=("qkv", "proj"), vision_mlp_modules=("fc1", "fc2"), gguf_projector="qwen2vl_merger",
        **_QWEN_COMMON,
    ),
    "qwen2_5_vl": FamilySpec(
        name="qwen2_5_vl", model_types=("qwen2_5_vl",),
        # Qwen2.5-VL vision blocks use a gated (SwiGLU) MLP.
        vision_attention_modules=("qkv", "proj"), vision_mlp_modules=SWIGLU_MLP, gguf_projector="qwen2.5vl_merger",
        **_QWEN_COMMON,
    ),
    "qwen3_vl": FamilySpec(
        name="qwen3_vl", model_types=("qwen3_vl",),
        # dense Qwen3 text (q_norm/k_norm, interleaved M-RoPE); vision blocks: fused `qkv` + `proj`, MLP
        # linear_fc1/linear_fc2 (tanh-GELU); projector = `merger` + one deepstack merger per
        # deepstack_visual_indexes entry, whose outputs are added to the first decoder layers' hidden states.
        vision_attention_modules=("qkv", "proj"), vision_mlp_modules=("linear_fc1", "linear_fc2"),
        extra_projectors=("model.visual.deepstack_merger_list",),
        **dict(_QWEN_COMMON, gguf_text_arch="qwen3vl"), gguf_projector="qwen3vl_merger",
    ),
    "llava_next": FamilySpec(
        name="llava_next", model_types=("llava_next",),
        vision_layers="model.vision_tower.encoder.layers",  # CLIPVisionModel (flat in transformers 5)
        vision_attention_modules=("q_proj", "k_proj", "v_proj", "out_proj"), vision_mlp_modules=("fc1", "fc2"),
        image_special_tokens=("<image>",),
        # llama.cpp's legacy llava-1.6 layout (export.gguf.llava_next): a llama text GGUF + an "mlp" mmproj, whose
        # image path in libmtmd is approximate (no unpadding, no image_newline)
        gguf_text_arch="llama", gguf_projector="mlp",
        **_LLAVA_PATHS,
    ),
    "pixtral": FamilySpec(
        name="pixtral", model_types=("llava",), vision_model_types=("pixtral",), gguf_text_arch="llama",
        **_LLAVA_PATHS, **_PIXTRAL_VISION, **_MISTRAL,
    ),
    "gemma3": FamilySpec(
        name="gemma3", model_types=("gemma3",),
        vision_layers="model.vision_tower.encoder.layers",  # SiglipVisionModel (flat in transformers 5)
        vision_attention_modules=("q_proj", "k_proj", "v_proj", "out_proj"), vision_mlp_modules=("fc1", "fc2"),
        image_special_tokens=("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
        gguf_text_arch="gemma3", gguf_projector="gemma3",
        **_LLAVA_PATHS,
    ),
    "mistral3": FamilySpec(
        name="mistral3", model_types=("mistral3",), text_model_types=("ministral3",), gguf_text_arch="mistral3",
        # patch 14 x spatial merge 2 (the processor's min side, 28). Known transformers bug (5.17 and 5.24): a
        # batch whose images give ONE feature in total (a single image <= 28x28) crashes in get_image_features.
        **_LLAVA_PATHS, **_PIXTRAL_VISION, **_MISTRAL,
    ),
    "mistral3_small": FamilySpec(
        name="mistral3_small", model_types=("mistral3",), text_model_types=("mistral",), gguf_text_arch="mistral3",
        **_LLAVA_PATHS, **_PIXTRAL_VISION, **_MISTRAL,
    ),
    "mllama": FamilySpec(
        name="mllama", model_types=("mllama",),
        # Llama 3.2 Vision: one <|image|> token per image; the tiles' features enter through the gated
        # cross-attention decoder layers (text_config.cross_attention_layers), whose `cross_attn` has q/k/v/o_proj.
        # Vision: a local (`transformer`) and a gated global (`global_transformer`) encoder, both CLIP-like.
        vision_tower="model.vision_model", projector="model.multi_modal_projector",
        vision_layers="model.vision_model.transformer.layers",
        vision_attention_modules=ATTENTION, vision_mlp_modules=("fc1", "fc2"),
        image_special_tokens=("<|image|>",), cross_attention="cross_attn",
        gguf_refusal="llama.cpp has no mllama support (no text architecture for its cross-attention decoder "
                     "layers and no mmproj projector type for its tiled vision encoder)",
        **_DECODER,
    ),
}


def _config_of(obj: Any) -> Any:
    # PeftModel forwards .config to the base model; a bare config has model_type itself.
    if hasattr(obj, "model_type") and not hasattr(obj, "config"):
        return obj
    return getattr(obj, "config", obj)


def _model_type(config: Any, sub: str | None = None) -> str | None:
    """``model_type`` of a config (object or config.json dict), or of its ``text_config``/``vision_config``."""
    if sub is not None:
        config = config.get(sub) if isinstance(config, dict) else getattr(config, sub, None)
    if isinstance(config, dict):
        return config.get("model_type")
    return getattr(config, "model_type", None)


def get_family_spec(model_or_config_or_model_type: Any) -> FamilySpec:
    """Return the `FamilySpec` for a model, a `PretrainedConfig` (or its config.json dict), a family key or a
    model_type string.

    A top-level model_type shared by several families (`llava`, `mistral3`) is resolved through the
    vision or text sub-config. A bare "mistral3" string means the Ministral-3 shape ("mistral3").

    Example:
        >>> get_family_spec("pixtral").projector
        'model.multi_modal_projector'
    """
    x = model_or_config_or_model_type
    if isinstance(x, str):
        if x in FAMILIES:
            return FAMILIES[x]
        matches = [s for s in FAMILIES.values() if x in s.model_types]
        if not matches:
            raise ValueError(f"unknown VLM family or model_type {x!r}; known: {', '.join(FAMILIES)}")
        return matches[0]
    config = x if isinstance(x, dict) else _config_of(x)
    model_type = _model_type(config)
    text_type, vision_type = _model_type(config, "text_config"), _model_type(config, "vision_config")
    for spec in FAMILIES.values():
        if model_type not in spec.model_types:
            continue
        if spec.text_model_types and text_type not in spec.text_model_types:
            continue
        if spec.vision_model_types and vision_type not in spec.vision_model_types:
            continue
        return spec
    raise ValueError(
        f"unsupported VLM: model_type={model_type!r}, text_config.model_type={text_type!r}, "
        f"vision_config.model_type={vision_type!r}; supported families: {', '.join(FAMILIES)}"
    )



# ----------------------------------------------------------------------------------------------------
# what a processor tells about its family (the collator holds a processor, not a model)

#: Smallest image side when the processor names no patch size: Qwen-VL's patch 14 x merge 2.
DEFAULT_MIN_SIDE = 28
#: Vision special tokens of every family (plus LLaVA-NeXT-Video's ``<video>``); a processor's tokenizer has
#: those of its own family.
VISION_TOKEN_STRINGS = (*dict.fromkeys(t for spec in FAMILIES.values() for t in spec.image_special_tokens), "<video>")
# processor attributes that name vision special tokens (their spellings vary with the checkpoint)
_VISION_TOKEN_ATTRS = (
    "image_token", "video_token", "boi_token", "eoi_token", "image_break_token", "image_end_token",
    "vision_start_token", "vision_end_token",
)


def image_token_id(processor) -> int | None:
    """Id of the token that stands for one vision feature (Gemma 3's processor names its <start_of_image>
    marker ``image_token``; the feature token is the tokenizer's ``<image_soft_token>``)."""
    tok = getattr(processor, "tokenizer", None)
    tid = getattr(tok, "image_token_id", None) if tok is not None else None
    if not isinstance(tid, int):
        tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None) is not None:
        tok = getattr(processor, "tokenizer", processor)
        tid = tok.convert_tokens_to_ids(processor.image_token)
    return None if tid is None else int(tid)


def vision_token_ids(processor) -> torch.Tensor:
    """(K,) sorted ids of every vision special token the processor's tokenizer has: never labels."""
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    strings = set(VISION_TOKEN_STRINGS)
    strings.update(s for a in _VISION_TOKEN_ATTRS if isinstance(s := getattr(processor, a, None), str))
    ids = {vocab[s] for s in strings if s in vocab}
    tid = image_token_id(processor)
    if tid is not None:
        ids.add(tid)
    return torch.tensor(sorted(ids), dtype=torch.long)


def min_image_side(processor) -> int:
    """Smallest image side the family's vision tower can use: one (merged) patch."""
    ip = getattr(processor, "image_processor", None)
    if getattr(ip, "merge_size", None) and getattr(ip, "patch_size", None):  # Qwen-VL: patch 14 x merge 2
        return int(ip.patch_size) * int(ip.merge_size)
    if getattr(processor, "patch_size", None):  # LLaVA-NeXT, Pixtral, Mistral 3
        return int(processor.patch_size) * int(getattr(processor, "spatial_merge_size", None) or 1)
    if hasattr(processor, "image_seq_length"):  # Gemma 3: one SigLIP patch
        return 14
    return DEFAULT_MIN_SIDE


def needs_mm_token_type_ids(processor) -> bool:
    """The forward needs ``mm_token_type_ids`` (transformers 5 Qwen-VL M-RoPE), even where the processor
    does not return them."""
    if "mm_token_type_ids" in (getattr(processor, "model_input_names", None) or []):
        return True
    return type(processor).__name__.startswith("Qwen")


#: Processor outputs of a cross-attention family (Llama 3.2 Vision) whose dim 1 is the token axis: padded, cut and
#: packed with ``input_ids``. Its other vision outputs have one entry per *row* (dim 0), not per image.
TOKEN_LEVEL_VISION_KEYS = ("cross_attention_mask",)


def uses_cross_attention(processor) -> bool:
    """Images enter through cross-attention (Llama 3.2 Vision): one ``<|image|>`` token per image, vision inputs
    per row (``pixel_values`` (B, images, tiles, C, H, W), ``aspect_ratio_ids`` / ``_mask``,
    ``cross_attention_mask`` (B, T, images, tiles)), and a chat template that refuses a system turn with images."""
    return "cross_attention_mask" in (getattr(processor, "model_input_names", None) or [])


def expected_image_tokens(processor, vision: Mapping[str, torch.Tensor], num_images: int) -> int | None:
    """Number of features the vision tower yields for one row's images, from the processor's outputs.

    Llama 3.2 Vision: one per image; Qwen-VL: ``prod(image_grid_thw) / merge_size**2``;
    Pixtral/Mistral 3: one per (merged) patch of each
    ``image_sizes`` entry; LLaVA-NeXT: the anyres feature count incl. newline tokens; Gemma 3: a fixed
    ``image_seq_length`` per image. ``None`` when the family is unknown.
    """
    if num_images == 0:
        return 0
    if "aspect_ratio_ids" in vision:  # Llama 3.2 Vision: one <|image|> per image, features via cross-attention
        return num_images
    ip = getattr(processor, "image_processor", None)
    if "image_grid_thw" in vision:
        merge = int(getattr(ip, "merge_size", 2))
        return int(vision["image_grid_thw"].prod(-1).sum()) // merge**2
    if hasattr(processor, "image_seq_length") and "image_sizes" not in vision:  # Gemma 3
        return int(processor.image_seq_length) * int(vision["pixel_values"].shape[0])
    if "image_sizes" in vision and hasattr(processor, "_get_number_of_features"):  # LLaVA-NeXT
        h, w = vision["pixel_values"].shape[-2:]
        total = 0
        for oh, ow in vision["image_sizes"].tolist():
            n = processor._get_number_of_features(int(oh), int(ow), int(h), int(w))
            if getattr(processor, "vision_feature_select_strategy", "default") == "default":
                n -= 1
            total += n
        return total
    if "image_sizes" in vision and getattr(processor, "patch_size", None):  # Pixtral / Mistral 3
        merge = int(getattr(processor, "spatial_merge_size", None) or 1)
        step = int(processor.patch_size) * merge
        return sum((int(h) // step) * (int(w) // step) for h, w in vision["image_sizes"].tolist())
    return None


__all__ = [
    "DEFAULT_MIN_SIDE", "FAMILIES", "FamilySpec", "TOKEN_LEVEL_VISION_KEYS", "VISION_TOKEN_STRINGS",
    "expected_image_tokens", "get_family_spec", "image_token_id", "min_image_side", "needs_mm_token_type_ids",
    "uses_cross_attention", "vision_token_ids",
]
