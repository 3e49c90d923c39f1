"""Where each VLM family keeps its parts, and what its forward needs.

One `FamilySpec` per family. Attribute paths are dotted paths from the `*ForConditionalGeneration`
model (what `AutoModelForImageTextToText` returns); `model.get_submodule(spec.vision_tower)` finds
the module. Checked against transformers 5.17 and 5.24 modeling code (same layout in both:
`model.language_model`, `model.visual` / `model.vision_tower`, `model.multi_modal_projector`,
top-level `lm_head`).

Example:
    >>> spec = get_family_spec("qwen2_5_vl")
    >>> spec.decoder_layers
    'model.language_model.layers'
    >>> get_family_spec(model).name  # from a model, a config, or a model_type string
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SWIGLU_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """Static facts about one VLM family.

    Attributes:
        name: family key ("qwen2_vl", "qwen2_5_vl", "llava_next", "pixtral", "gemma3", "mistral3",
            "mistral3_small").
        model_types: HF `config.model_type` values of the top-level config.
        text_model_types: `config.text_config.model_type` values that select this family (empty: any).
        vision_model_types: `config.vision_config.model_type` values that select it (empty: any).
        language_model: dotted path to the text decoder (embeddings + layers + final norm).
        vision_tower: dotted path to the vision encoder.
        projector: dotted path to the vision->text projector (for Qwen it sits inside the tower).
        lm_head: dotted path to the output projection.
        decoder_layers: dotted path to the text decoder's `nn.ModuleList` of layers.
        vision_layers: dotted path to the vision encoder's `nn.ModuleList` of blocks.
        embed_tokens: dotted path to the text token embedding.
        attention_modules: Linear names inside a text decoder layer's attention.
        mlp_modules: Linear names inside a text decoder layer's MLP.
        vision_attention_modules / vision_mlp_modules: the same inside a vision block.
        norm: "rms" (x * w) or "gemma_rms" (x * (1 + w)).
        mlp_act: "swiglu" (silu(gate) * up) or "geglu_tanh" (gelu_tanh(gate) * up).
        rope: "mrope" (3-D multimodal RoPE, position_ids (3, B, T)) or "rope".
        image_token: the placeholder token that the processor repeats once per image feature.
        image_special_tokens: every image-related token that must never carry a label (placeholder,
            begin/end/break markers).
        needs_mm_token_type_ids: the forward needs `mm_token_type_ids` (transformers 5 Qwen-VL M-RoPE).
        processor_outputs: the keys, besides input_ids/attention_mask, that the processor returns
            for an image batch and the forward consumes.
        min_image_side: images with a side below this (px) are degenerate for the family.
        tie_word_embeddings_typical: whether the reference checkpoints tie lm_head to the embeddings.
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
    norm: str
    mlp_act: str
    rope: str
    image_token: str
    image_special_tokens: tuple[str, ...]
    needs_mm_token_type_ids: bool
    processor_outputs: tuple[str, ...]
    min_image_side: int
    text_model_types: tuple[str, ...] = ()
    vision_model_types: tuple[str, ...] = ()


_QWEN_COMMON = dict(
    language_model="model.language_model",
    vision_tower="model.visual",
    projector="model.visual.merger",
    lm_head="lm_head",
    decoder_layers="model.language_model.layers",
    vision_layers="model.visual.blocks",
    embed_tokens="model.language_model.embed_tokens",
    attention_modules=ATTENTION,
    mlp_modules=SWIGLU_MLP,
    norm="rms",
    mlp_act="swiglu",
    rope="mrope",
    image_token="<|image_pad|>",
    image_special_tokens=("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
    needs_mm_token_type_ids=True,
    processor_outputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    min_image_side=28,  # smart_resize factor: patch 14 x merge 2
)

# LLaVA-style (vision_tower + multi_modal_projector + language_model under `model`).
_LLAVA_PATHS = dict(
    language_model="model.language_model",
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    lm_head="lm_head",
    decoder_layers="model.language_model.layers",
    embed_tokens="model.language_model.embed_tokens",
    attention_modules=ATTENTION,
    mlp_modules=SWIGLU_MLP,
)
_PIXTRAL_VISION = dict(
    vision_layers="model.vision_tower.transformer.layers",
    vision_attention_modules=ATTENTION,  # PixtralAttention: q/k/v/o_proj
    vision_mlp_modules=SWIGLU_MLP,  # PixtralMLP: gate/up/down_proj
)
_MISTRAL_IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")

FAMILIES: dict[str, FamilySpec] = {
    "qwen2_vl": FamilySpec(
        name="qwen2_vl", model_types=("qwen2_vl",),
        # VisionAttention has a fused `qkv` and `proj`; VisionMlp has fc1/fc2 (quick_gelu).
        vision_attention_modules=("qkv", "proj"), vision_mlp_modules=("fc1", "fc2"),
        **_QWEN_COMMON,
    ),
    "qwen2_5_vl": FamilySpec(
        name="qwen2_5_vl", model_types=("qwen2_5_vl",),
        # Qwen2.5-VL vision blocks use a gated (SwiGLU) MLP.
        vision_attention_modules=("qkv", "proj"), vision_mlp_modules=SWIGLU_MLP,
        **_QWEN_COMMON,
    ),
    "llava_next": FamilySpec(
        name="llava_next", model_types=("llava_next",),
        vision_layers="model.vision_tower.encoder.layers",  # CLIPVisionModel (flat in transformers 5)
        vision_attention_modules=("q_proj", "k_proj", "v_proj", "out_proj"), vision_mlp_modules=("fc1", "fc2"),
        norm="rms", mlp_act="swiglu", rope="rope",
        image_token="<image>", image_special_tokens=("<image>",),
        needs_mm_token_type_ids=False, processor_outputs=("pixel_values", "image_sizes"),
        min_image_side=14,  # one CLIP patch
        **_LLAVA_PATHS,
    ),
    "pixtral": FamilySpec(
        name="pixtral", model_types=("llava",), vision_model_types=("pixtral",),
        norm="rms", mlp_act="swiglu", rope="rope",
        image_token="[IMG]", image_special_tokens=_MISTRAL_IMAGE_TOKENS,
        needs_mm_token_type_ids=False, processor_outputs=("pixel_values", "image_sizes"),
        min_image_side=16,  # one Pixtral-12B patch
        **_LLAVA_PATHS, **_PIXTRAL_VISION,
    ),
    "gemma3": FamilySpec(
        name="gemma3", model_types=("gemma3",),
        vision_layers="model.vision_tower.encoder.layers",  # SiglipVisionModel (flat in transformers 5)
        vision_attention_modules=("q_proj", "k_proj", "v_proj", "out_proj"), vision_mlp_modules=("fc1", "fc2"),
        norm="gemma_rms", mlp_act="geglu_tanh", rope="rope",
        image_token="<image_soft_token>",
        image_special_tokens=("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
        # token_type_ids (1 on image tokens) turn on bidirectional attention inside an image in training.
        needs_mm_token_type_ids=False, processor_outputs=("pixel_values", "token_type_ids"),
        min_image_side=14,  # one SigLIP patch; every image is resized to the fixed square input
        **_LLAVA_PATHS,
    ),
    "mistral3": FamilySpec(
        name="mistral3", model_types=("mistral3",), text_model_types=("ministral3",),
        norm="rms", mlp_act="swiglu", rope="rope",
        image_token="[IMG]", image_special_tokens=_MISTRAL_IMAGE_TOKENS,
        needs_mm_token_type_ids=False, processor_outputs=("pixel_values", "image_sizes"),
        # patch 14 x spatial merge 2. Known transformers bug (5.17 and 5.24): a batch whose images give ONE
        # feature in total (a single image <= 28x28) crashes in get_image_features (`squeeze(0)`).
        min_image_side=28,
        **_LLAVA_PATHS, **_PIXTRAL_VISION,
    ),
    "mistral3_small": FamilySpec(
        name="mistral3_small", model_types=("mistral3",), text_model_types=("mistral",),
        norm="rms", mlp_act="swiglu", rope="rope",
        image_token="[IMG]", image_special_tokens=_MISTRAL_IMAGE_TOKENS,
        needs_mm_token_type_ids=False, processor_outputs=("pixel_values", "image_sizes"),
        min_image_side=28,  # patch 14 x spatial merge 2
        **_LLAVA_PATHS, **_PIXTRAL_VISION,
    ),
}


def _config_of(obj: Any) -> Any:
    # PeftModel forwards .config to the base model; a bare config has model_type itself.
    if hasattr(obj, "model_type") and not hasattr(obj, "config"):
        return obj
    return getattr(obj, "config", obj)


def get_family_spec(model_or_config_or_model_type: Any) -> FamilySpec:
    """Return the `FamilySpec` for a model, a `PretrainedConfig`, a family key or a model_type string.

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
    config = _config_of(x)
    model_type = getattr(config, "model_type", None)
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
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


__all__ = ["FAMILIES", "FamilySpec", "get_family_spec"]
