"""The tiny Qwen3-VL (``Qwen3VLForConditionalGeneration``, dense text): Qwen's special tokens, the Qwen3-VL
Instruct chat template (no default system turn), and a vision tower with deepstack mergers.

Shape, against Qwen/Qwen3-VL-2B-Instruct: text hidden 64 (2048), 2 layers (28), 4 heads / 2 KV heads of 16 (16 /
8 of 128) with q_norm/k_norm, interleaved M-RoPE sections [4, 2, 2] of 8 rotary pairs ([24, 20, 20] of 64), tied
embeddings (as 2B; 8B is untied); vision hidden 32 (1024), 2 blocks (24), patch 16, 2x2 merge, a learned 8x8
position grid (48x48), one deepstack merger after block 1 (three, after blocks [5, 11, 17]) feeding decoder layer 0.
A 56x56 image is resized to 64x64: 4x4 patches of 16, 2x2 = 4 tokens after the merge; 112x56 -> 8.

Deliberately left out: the MoE variant (``qwen3_vl_moe``) and videos (the video processor is saved, not exercised).
"""

from __future__ import annotations

from transformers import AutoConfig, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

from . import chat_templates
from .common import _QWEN_SPECIALS, _TEXT, _Built, _padded_vocab, _resolve
from .tokenizer import build_tokenizer


def build_qwen3_vl(family: str, overrides: dict, processor_kwargs: dict) -> _Built:
    """Config and processor of the tiny Qwen3-VL (``make_tiny_vlm("qwen3_vl", path)`` writes it)."""
    tok = build_tokenizer(leading=[], trailing=_QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>",
                          chat_template=chat_templates.QWEN3_VL)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    text = dict(
        _TEXT, model_type="qwen3_vl_text", vocab_size=_padded_vocab(len(tok)), rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    # One deepstack merger, after vision block 1, feeding decoder layer 0: fewer mergers than decoder layers, as
    # llama.cpp's qwen3vl graph cannot add a deepstack feature to the LAST layer (real models: 3 of 28+ layers).
    vision = dict(model_type="qwen3_vl_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64, deepstack_visual_indexes=[1], hidden_act="gelu_pytorch_tanh")
    cfg = dict(
        model_type="qwen3_vl", text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    config = AutoConfig.for_model(**_resolve(cfg, overrides))
    # 64x64 -> 4 tokens; at most 64 tokens (the real processor: 65536..16777216 pixels, factor 32)
    pix = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
    pix.update({k: processor_kwargs.pop(k) for k in ("min_pixels", "max_pixels") if k in processor_kwargs})
    v = config.vision_config
    common = dict(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pix, **common),
        video_processor=Qwen3VLVideoProcessor(**common, size={"shortest_edge": pix["min_pixels"],
                                                              "longest_edge": pix["max_pixels"]}),
        tokenizer=tok, chat_template=chat_templates.QWEN3_VL,
    )
    return _Built(config, processor, eos_token_ids=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                  pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
