"""Tiny random-weight VLMs for every supported family, built locally (no downloads).

`make_tiny_vlm(family, path)` writes a Hugging Face directory (config, fp32 safetensors, tokenizer,
processor, chat template, generation config) that `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` load with no missing or unexpected keys. Each family keeps its real
special tokens (at their real ids where those are small: Mistral's control tokens, Llama's <s>/</s>,
Gemma's <pad>/<eos>/<bos>), its chat-template structure and its real processor class.

Sizes (about 0.2M parameters, under 1 MB): text hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim
16, vocab ~520-580; vision hidden 32, 2 layers. Image tokens for a 56x56 / 112x56 (WxH) image:

    family          image token          56x56  112x56  image handling
    qwen2_vl        <|image_pad|>            4       8  patch 14, merge 2, pixels in [56*56, 28*28*64]
    qwen2_5_vl      <|image_pad|>            4       8  same
    llava_next      <image>                 24      14  CLIP 28 px tiles, anyres pinpoints of 28 px
    pixtral         [IMG] (+BREAK/END)      16       8  patch 16, longest edge 64, no merge
    gemma3          <image_soft_token>       4       4  resized to 56x56, 4x4 patches pooled to 2x2
    mistral3(_small)[IMG] (+BREAK/END)       4       8  patch 14, merge 2, longest edge 112
    qwen3_vl        <|image_pad|>            4       8  patch 16, merge 2 (56 px -> 64 px), in qwen3_vl.py
    mllama          <|image|>                1       1  cross-attention; 28 px tiles, at most 2, in mllama.py

Every constant tensor of the fresh init (norm weights, biases, Gemma's zero projector) gets a small
deterministic perturbation, as in a trained checkpoint.

Deliberately left out: video inputs (the Qwen video processor is saved but not exercised) and the
tool-calling branches of the real templates.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GenerationConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PixtralImageProcessor,
    PixtralProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from . import chat_templates
from .common import _QWEN_SPECIALS, _TEXT, _Built, _padded_vocab, _resolve
from .mllama import build_mllama, open_gates
from .qwen3_vl import build_qwen3_vl
from .tokenizer import build_tokenizer


@torch.no_grad()
def _perturb_constant_tensors(model: torch.nn.Module, std: float = 0.05) -> None:
    """Add small noise to every constant tensor (norm weights, biases, zero-initialised projections).

    Trained checkpoints have no constant tensors. Fresh inits do (RMSNorm weights of 1, Gemma's zero
    `mm_input_projection_weight`, which would cut every image off from the loss and its gradient), and
    they hide bugs: a kernel that ignores the norm weight still matches the reference when it is all ones.
    """
    for param in model.parameters():
        if param.numel() > 1 and bool((param == param.reshape(-1)[0]).all()):
            param.add_(torch.randn_like(param) * std)


# ----------------------------------------------------------------------------------------- Qwen-VL
def _build_qwen(family: str, overrides: dict, processor_kwargs: dict) -> _Built:
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
    cfg = _resolve(cfg, overrides)
    config = AutoConfig.for_model(**cfg)
    # 56x56 -> 4x4 patches of 14 -> 2x2 = 4 tokens after the 2x2 merge; 112x56 -> 8; at most 64 tokens.
    pix = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    pix.update({k: processor_kwargs.pop(k) for k in ("min_pixels", "max_pixels") if k in processor_kwargs})
    v = config.vision_config
    common = dict(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
    image_processor = Qwen2VLImageProcessor(**pix, **common)
    video_processor = Qwen2VLVideoProcessor(**pix, **common)
    proc_cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=chat_templates.QWEN2_VL)
    return _Built(config, processor, eos_token_ids=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                  pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])


# ------------------------------------------------------------------------------------- LLaVA-NeXT
def _build_llava_next(family: str, overrides: dict, processor_kwargs: dict) -> _Built:
    # llava-hf/llava-v1.6-vicuna-7b-hf: Llama/Vicuna tokenizer (<unk>=0, <s>=1, </s>=2, adds <s>),
    # <image> and <pad> appended after the text vocabulary.
    tok = build_tokenizer(
        leading=["<unk>", "<s>", "</s>"], trailing=["<image>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>",
        unk="<unk>", add_bos=True, extra_special_tokens={"image_token": "<image>"},
        chat_template=chat_templates.LLAVA_NEXT_VICUNA,
    )
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    side = 28  # CLIP input: 2x2 patches of 14 per tile (real: 336 px, 24x24 patches)
    cfg = dict(
        model_type="llava_next",
        text_config=dict(_TEXT, model_type="llama", vocab_size=_padded_vocab(len(tok)), rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=1, eos_token_id=2, pad_token_id=pad_id),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=side, patch_size=14,
                           projection_dim=32, hidden_act="quick_gelu"),
        image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side],
                              [side, 3 * side]],
        image_seq_length=(side // 14) ** 2, projector_hidden_act="gelu", tie_word_embeddings=False,
        pad_token_id=pad_id,
    )
    config = AutoConfig.for_model(**_resolve(cfg, overrides))
    v = config.vision_config
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=v.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=chat_templates.LLAVA_NEXT_VICUNA,
    )
    return _Built(config, processor, eos_token_ids=[2], pad_token_id=pad_id, bos_token_id=1)


# ---------------------------------------------------------------- Pixtral and Mistral3 (Mistral tokens)
# The first 20 control tokens of Mistral's tekken vocabulary, at their real ids ([IMG]=10, <pad>=11).
_MISTRAL_CONTROL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]


def _mistral_tokenizer(template: str):
    return build_tokenizer(
        leading=_MISTRAL_CONTROL, trailing=[], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True,
        chat_template=template,
    )


def _build_mistral_family(family: str, overrides: dict, processor_kwargs: dict) -> _Built:
    template = chat_templates.PIXTRAL if family == "pixtral" else chat_templates.MISTRAL3
    tok = _mistral_tokenizer(template)
    text = dict(_TEXT, vocab_size=len(tok), rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=11)
    if family == "mistral3":
        # Ministral-3 (2512) text: yarn RoPE plus the llama-4 query scaling (Ministral3Config's default
        # rope_parameters) over a 256k context.
        text.update(model_type="ministral3", max_position_embeddings=262144)
    else:
        text.update(model_type="mistral", sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0})
    if family == "pixtral":
        # mistral-community/pixtral-12b: LLaVA with a Pixtral tower, patch 16, no spatial merge.
        patch, merge, side = 16, 1, 64
        vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, head_dim=16, image_size=side, patch_size=patch,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg = dict(model_type="llava", text_config=text, vision_config=vision, image_token_index=10,
                   vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                   multimodal_projector_bias=True, image_seq_length=1, tie_word_embeddings=False)
    else:
        # Mistral-Small-3.1 / Ministral-3: Mistral3 with a Pixtral tower, patch 14, 2x2 spatial merge.
        patch, merge, side = 14, 2, 112
        vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, head_dim=16, image_size=side, patch_size=patch,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg = dict(model_type="mistral3", text_config=text, vision_config=vision, image_token_index=10,
                   vision_feature_layer=-1, spatial_merge_size=merge, projector_hidden_act="gelu",
                   multimodal_projector_bias=False, tie_word_embeddings=False)
    config = AutoConfig.for_model(**_resolve(cfg, overrides))
    v = config.vision_config
    image_processor = PixtralImageProcessor(
        size={"longest_edge": v.image_size},  # the tower's rotary table covers image_size / patch_size
        patch_size={"height": v.patch_size, "width": v.patch_size},
    )
    processor = PixtralProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=v.patch_size,
        spatial_merge_size=getattr(config, "spatial_merge_size", 1), chat_template=template,
    )
    return _Built(config, processor, eos_token_ids=[2], pad_token_id=11, bos_token_id=1)


# ---------------------------------------------------------------------------------------- Gemma 3
def _build_gemma3(family: str, overrides: dict, processor_kwargs: dict) -> _Built:
    # google/gemma-3-4b-it: <pad>=0, <eos>=1, <bos>=2, <unk>=3 (adds <bos>); turn and image markers.
    tok = build_tokenizer(
        leading=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
        trailing=["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        chat_template=chat_templates.GEMMA3,
    )
    ids = {t: tok.convert_tokens_to_ids(t)
           for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_turn>")}
    side, mm_tokens = 56, 4  # SigLIP 56 px = 4x4 patches of 14, pooled to 2x2 = 4 tokens (real: 896 px -> 256)
    cfg = dict(
        model_type="gemma3",
        text_config=dict(_TEXT, model_type="gemma3_text", vocab_size=_padded_vocab(len(tok)), rms_norm_eps=1e-6,
                         query_pre_attn_scalar=_TEXT["head_dim"], sliding_window=512,
                         layer_types=["sliding_attention", "full_attention"],
                         hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=side, patch_size=14,
                           vision_use_head=False),
        mm_tokens_per_image=mm_tokens, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, ids["<end_of_turn>"]], pad_token_id=0,
    )
    config = AutoConfig.for_model(**_resolve(cfg, overrides))
    v = config.vision_config
    image_processor = Gemma3ImageProcessor(size={"height": v.image_size, "width": v.image_size}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                image_seq_length=config.mm_tokens_per_image,
                                chat_template=chat_templates.GEMMA3)
    # the real generation config stops on <eos> and <end_of_turn>
    return _Built(config, processor, eos_token_ids=[1, ids["<end_of_turn>"]], pad_token_id=0, bos_token_id=2)


_BUILDERS: dict[str, Callable[[str, dict, dict], _Built]] = {
    "qwen2_vl": _build_qwen,
    "qwen2_5_vl": _build_qwen,
    "llava_next": _build_llava_next,
    "pixtral": _build_mistral_family,
    "gemma3": _build_gemma3,
    "mistral3": _build_mistral_family,
    "mistral3_small": _build_mistral_family,
    "qwen3_vl": build_qwen3_vl,
    "mllama": build_mllama,
}

TINY_FAMILIES: tuple[str, ...] = (
    "qwen2_vl", "qwen2_5_vl", "llava_next", "pixtral", "gemma3", "mistral3", "mistral3_small", "qwen3_vl", "mllama",
)


def make_tiny_vlm(
    family: str,
    path: str | Path,
    *,
    seed: int = 0,
    processor_kwargs: dict | None = None,
    chat_template: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random-weight VLM of `family` to `path` and return the path.

    Args:
        family: one of `TINY_FAMILIES`.
        path: output directory (created).
        seed: torch seed for the random weights; same seed, same weights.
        processor_kwargs: Qwen only: `min_pixels` / `max_pixels` of the image processor. The other
            families size images from `vision_config={"image_size": N}` (LLaVA-NeXT tile side, Gemma 3
            input side, Pixtral / Mistral3 longest edge). Unused keys raise.
        chat_template: replaces the family's template in the processor and tokenizer (the CPU demo uses
            `chat_templates.QWEN2_VL_NO_DEFAULT_SYSTEM`); None keeps the family's own.
        **config_overrides: merged into the model config dict before it is built; nested
            `text_config=` / `vision_config=` dicts merge key by key, e.g.
            `make_tiny_vlm("qwen2_vl", d, text_config={"hidden_size": 128, "num_hidden_layers": 4})`.
            Dependent fields follow unless overridden too: head_dim = hidden / heads, Qwen's vision
            output width and mrope_section, Gemma's query_pre_attn_scalar and layer_types.

    Example:
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> d = make_tiny_vlm("qwen2_vl", "/tmp/tiny-qwen2-vl")
        >>> model = AutoModelForImageTextToText.from_pretrained(d)
        >>> processor = AutoProcessor.from_pretrained(d)
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; known families: {', '.join(TINY_FAMILIES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor_kwargs = dict(processor_kwargs or {})
    built = _BUILDERS[family](family, dict(config_overrides), processor_kwargs)
    if processor_kwargs:  # each builder pops the keys it uses
        raise ValueError(f"processor_kwargs {sorted(processor_kwargs)} are not used by family {family!r}")
    if chat_template is not None:
        built.processor.chat_template = chat_template
        built.processor.tokenizer.chat_template = chat_template

    # Family-dependent stream: two families of the same shape (mistral3 / mistral3_small) get different weights.
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(family.encode()) % 1_000_003)
    model = AutoModelForImageTextToText.from_config(built.config, dtype=torch.float32)
    _perturb_constant_tensors(model)
    if family == "mllama":
        open_gates(model)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=built.bos_token_id, eos_token_id=built.eos_token_ids, pad_token_id=built.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    built.processor.save_pretrained(path)
    return path
