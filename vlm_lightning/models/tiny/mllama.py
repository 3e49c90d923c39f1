"""The tiny Llama 3.2 Vision (``MllamaForConditionalGeneration``): Llama 3's special tokens, the
Llama-3.2-Vision-Instruct chat template (tool branches dropped), gated cross-attention decoder layers and a tiled
vision encoder with aspect-ratio embeddings.

Shape, against meta-llama/Llama-3.2-11B-Vision-Instruct: text hidden 64 (4096), 3 layers (40) of which layer 1 is a
cross-attention layer (8: [3, 8, ..., 38]), 4 heads / 2 KV heads of 16 (32 / 8 of 128), llama3 RoPE; vision hidden 32
(1280), 2 local + 1 global layers (32 + 8), patch 14, tiles of 28 px (560), at most 2 tiles (4), aspect ratios
[1, 1], [1, 2], [2, 1], one intermediate layer ([3, 7, 15, 23, 30]) so the projector takes 2 x 32 = 64 features
(7680). One ``<|image|>`` per image whatever its size; a 112x56 (WxH) image becomes 2 tiles of 28x28.

As in the real vocabulary, ``<|image|>`` is the id right after the last special token and equals the text
``vocab_size`` (128256): the embedding has ``vocab_size + 8`` rows, the lm_head ``vocab_size`` outputs, so the image
token can be read but never generated. The cross-attention gates start at 0 in a fresh init (no image influence at
all); ``open_gates`` gives them trained-looking values so the images matter.

Deliberately left out: tool calling and the date line's ``strftime_now``; the base (non-Instruct) template.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, MllamaImageProcessor, MllamaProcessor

from .common import _TEXT, _Built, _resolve
from .tokenizer import build_tokenizer

# Llama 3's special tokens in their real order (ids 128000..128010 and 128256 in the real vocabulary)
MLLAMA_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]

# meta-llama/Llama-3.2-11B-Vision-Instruct, without the tool branches: a system turn (with the knowledge-cutoff and
# date lines) only when there is no image; a system message together with an image raises, as in the real one.
MLLAMA_INSTRUCT = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == \"\" %}"
    "{{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def build_mllama(family: str, overrides: dict, processor_kwargs: dict) -> _Built:
    """Config and processor of the tiny Llama 3.2 Vision (``make_tiny_vlm("mllama", path)`` writes it)."""
    tok = build_tokenizer(leading=[], trailing=MLLAMA_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                          pad="<|finetune_right_pad_id|>", add_bos=True, chat_template=MLLAMA_INSTRUCT)
    ids = {t: tok.convert_tokens_to_ids(t) for t in MLLAMA_SPECIALS}
    text = {k: v for k, v in _TEXT.items() if k != "head_dim"}  # mllama's head_dim is hidden / heads
    text.update(
        model_type="mllama_text_model", num_hidden_layers=3, max_position_embeddings=131072, cross_attention_layers=[1],
        vocab_size=ids["<|image|>"], rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=ids["<|begin_of_text|>"], pad_token_id=ids["<|finetune_right_pad_id|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
    )
    vision = dict(model_type="mllama_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_global_layers=1, attention_heads=2, image_size=28, patch_size=14, max_num_tiles=2,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers_indices=[0],
                  vision_output_dim=64)
    cfg = dict(model_type="mllama", text_config=text, vision_config=vision, image_token_index=ids["<|image|>"])
    config = AutoConfig.for_model(**_resolve(cfg, overrides))
    v = config.vision_config
    image_processor = MllamaImageProcessor(size={"height": v.image_size, "width": v.image_size},
                                           max_image_tiles=v.max_num_tiles, image_mean=[0.5, 0.5, 0.5],
                                           image_std=[0.5, 0.5, 0.5])
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=MLLAMA_INSTRUCT)
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    return _Built(config, processor, eos_token_ids=eos, pad_token_id=ids["<|finetune_right_pad_id|>"],
                  bos_token_id=ids["<|begin_of_text|>"])


@torch.no_grad()
def open_gates(model: torch.nn.Module) -> None:
    """Give the zero-initialised one-element gates (the cross-attention layers' ``cross_attn_attn_gate`` /
    ``cross_attn_mlp_gate``, the vision tower's positional-embedding gates) values like a trained checkpoint's:
    at 0 the images (or the tile positions) would not reach the text at all."""
    for name, param in model.named_parameters():
        if param.numel() == 1 and float(param) == 0.0:
            param.fill_(-0.4 if name.endswith("mlp_gate") else 0.5)
