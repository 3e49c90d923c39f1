"""The tiny per-family VLM fixtures load, process, run, and look like the real families."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_lightning.models import families
from vlm_lightning.models.families import get_family_spec
from vlm_lightning.models.tiny import TINY_FAMILIES, image_feature_counts, make_tiny_vlm

# Per family: the strings a rendered two-turn conversation (system + user with image + assistant,
# then a second user turn and the generation prompt) must contain, as in the real template.
MARKERS = {
    "qwen2_vl": dict(
        system="<|im_start|>system\nBe brief.<|im_end|>\n",
        user="<|im_start|>user\n", assistant="<|im_start|>assistant\nIt says 42.<|im_end|>\n",
        image="<|vision_start|><|image_pad|><|vision_end|>", gen_prompt="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
    ),
    "llava_next": dict(
        system="Be brief. ", user="USER: <image>\nWhat does it say? ", assistant="ASSISTANT: It says 42.</s>",
        image="<image>\n", gen_prompt="ASSISTANT:", end_of_turn="</s>",
    ),
    "pixtral": dict(
        # the real Pixtral template folds the system prompt into the last user turn
        system="[INST]Be brief.\n\nAnd now?[/INST]", user="<s>[INST][IMG]What does it say?[/INST]",
        assistant="It says 42.</s>", image="[IMG]", gen_prompt="[/INST]", end_of_turn="</s>",
    ),
    "gemma3": dict(
        system="<start_of_turn>user\nBe brief.\n\n", user="<start_of_turn>user\n",
        assistant="<start_of_turn>model\nIt says 42.<end_of_turn>\n", image="<start_of_image>",
        gen_prompt="<start_of_turn>model\n", end_of_turn="<end_of_turn>",
    ),
    "mistral3": dict(
        system="<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT]", user="[INST][IMG]What does it say?[/INST]",
        assistant="It says 42.</s>", image="[IMG]", gen_prompt="[/INST]", end_of_turn="</s>",
    ),
}
MARKERS["qwen2_5_vl"] = MARKERS["qwen2_vl"]
MARKERS["qwen3_vl"] = MARKERS["qwen2_vl"]  # same ChatML markers; no default system turn (test below)
MARKERS["mistral3_small"] = MARKERS["mistral3"]
MARKERS["mllama"] = dict(
    # the real Llama 3.2 Vision template refuses a system turn with images (test below) and writes none then
    system="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What does it say?<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\nIt says 42.<|eot_id|>", image="<|image|>",
    gen_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n", end_of_turn="<|eot_id|>",
)

# Per family: the keys, besides input_ids/attention_mask, that the real processor returns for an image batch
# and the forward consumes.
_QWEN_OUT, _SIZES_OUT = ("pixel_values", "image_grid_thw", "mm_token_type_ids"), ("pixel_values", "image_sizes")
PROCESSOR_OUTPUTS = {
    "qwen2_vl": _QWEN_OUT, "qwen2_5_vl": _QWEN_OUT, "llava_next": _SIZES_OUT, "pixtral": _SIZES_OUT,
    "gemma3": ("pixel_values", "token_type_ids"), "mistral3": _SIZES_OUT, "mistral3_small": _SIZES_OUT,
    "qwen3_vl": _QWEN_OUT, "mllama": ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
}

CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does it say?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It says 42."}]},
    {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
]


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_vlm_loads_with_consistent_ids(family, tiny_vlm_dir):
    path = tiny_vlm_dir(family)
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert get_family_spec(model).name == family
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 3_000_000 and all(p.dtype == torch.float32 for p in model.parameters())
    for name, param in model.named_parameters():  # trained checkpoints have no constant tensors
        assert param.numel() == 1 or not bool((param == param.reshape(-1)[0]).all()), name

    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    spec = get_family_spec(family)
    assert getattr(model.config, "image_token_id", None) == families.image_token_id(processor)
    assert all(tok.convert_tokens_to_ids(t) != tok.unk_token_id for t in spec.image_special_tokens)
    if family == "mllama":  # as the real one: <|image|> is the id past the last output (vocab_size 128256)
        assert model.config.text_config.vocab_size == len(tok) - 1 == families.image_token_id(processor)
    else:
        assert model.config.text_config.vocab_size >= len(tok)
    generation = json.loads((path / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert generation["pad_token_id"] == tok.pad_token_id is not None
    for name in spec.decoder_layers, spec.vision_tower, spec.projector, spec.lm_head, spec.vision_layers:
        model.get_submodule(name)  # raises if the family table is wrong
    layer = model.get_submodule(spec.decoder_layers)[0]
    names = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == set(spec.attention_modules) | set(spec.mlp_modules)
    block = model.get_submodule(spec.vision_layers)[0]
    names = {n.rsplit(".", 1)[-1] for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == set(spec.vision_attention_modules) | set(spec.vision_mlp_modules)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chat_template_has_real_structure(family, tiny_vlm_dir):
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir(family))
    conversation = CONVERSATION
    if family == "mllama":
        with pytest.raises(Exception, match="Prompting with images is incompatible with system messages"):
            processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        conversation = CONVERSATION[1:]
        text = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    m = MARKERS[family]
    for key in ("system", "user", "assistant", "image"):
        assert m[key] in text, (key, text)
    assert text.endswith(m["gen_prompt"]), text
    assert text.count(m["end_of_turn"]) >= 1
    assert processor.tokenizer.convert_tokens_to_ids(m["end_of_turn"]) != processor.tokenizer.unk_token_id
    # the end-of-turn token is a single special token, as in the real tokenizer
    assert len(processor.tokenizer(m["end_of_turn"], add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_forward_loss_and_image_token_count(family, tiny_vlm_dir):
    path = tiny_vlm_dir(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    spec = get_family_spec(family)
    images = [_image(56, 56, 0), _image(112, 56, 1)]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
             {"role": "assistant", "content": [{"type": "text", "text": a}]}],
            tokenize=False,
        )
        for q, a in (("Read it.", "12"), ("What is written here?", "Hello, World!"))
    ]
    # Templates that write <bos> themselves (Gemma, Mistral) must not get a second one from the tokenizer.
    bos = processor.tokenizer.bos_token
    add_special = not (bos is not None and texts[0].startswith(bos))
    batch = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True,
                      add_special_tokens=add_special)
    if bos is not None:
        assert (batch["input_ids"] == processor.tokenizer.bos_token_id).sum(-1).le(1).all()
    for key in PROCESSOR_OUTPUTS[family]:
        assert key in batch, (key, list(batch))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    # vision tokens are never targets (Llama 3.2 Vision's <|image|> id is even past the lm_head's outputs)
    labels = labels.masked_fill(torch.isin(batch["input_ids"], families.vision_token_ids(processor)), -100)
    model.train()
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and out.loss > 0
    # No dead paths: the projector and the vision tower get gradients from the text loss. (Gemma 3
    # zero-initialises its projector; left so, images would not reach the loss at all.)
    out.loss.backward()
    for prefix in (spec.projector, spec.vision_layers + ".0."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix

    per_row = (batch["input_ids"] == families.image_token_id(processor)).sum(-1).tolist()
    counts = image_feature_counts(model, batch)
    assert per_row == counts, (per_row, counts)
    assert all(0 < c <= 64 for c in counts)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tokenizer_round_trips_ascii(family, tiny_vlm_dir):
    tok = AutoProcessor.from_pretrained(tiny_vlm_dir(family)).tokenizer
    for text in ("Hello, World! 0123 <x>", "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./ \t\nZz", "ünïcödé 日本"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_make_tiny_vlm_is_deterministic_and_takes_overrides(tmp_path):
    a = make_tiny_vlm("qwen2_vl", tmp_path / "a")
    b = make_tiny_vlm("qwen2_vl", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = make_tiny_vlm("qwen2_vl", tmp_path / "c", text_config={"num_hidden_layers": 3},
                      processor_kwargs={"max_pixels": 56 * 56})
    config = json.loads((c / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["text_config"]["hidden_size"] == 64  # untouched keys keep their tiny defaults
    processor = AutoProcessor.from_pretrained(c)
    batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[_image(224, 224, 0)],
                      return_tensors="pt")
    assert batch["image_grid_thw"].prod(-1).item() // 4 == 4  # capped at max_pixels = 56x56 -> 4 tokens
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_vlm("llama", tmp_path / "d")



def test_qwen3_vl_has_its_own_layout(tiny_vlm_dir):
    """Qwen3-VL: no default system turn, interleaved M-RoPE, q/k norms, deepstack mergers that train from the
    text loss (their features are added to the first decoder layers)."""
    path = tiny_vlm_dir("qwen3_vl")
    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and "system" not in text
    model = AutoModelForImageTextToText.from_pretrained(path)
    rope = model.config.text_config.rope_parameters
    assert rope["mrope_interleaved"] and sum(rope["mrope_section"]) == model.config.text_config.head_dim // 2
    attn = model.get_submodule(get_family_spec("qwen3_vl").decoder_layers)[0].self_attn
    assert {"q_norm", "k_norm"} <= {n for n, _ in attn.named_children()}
    mergers = model.get_submodule("model.visual.deepstack_merger_list")
    assert len(mergers) == len(model.config.vision_config.deepstack_visual_indexes) == 1
    batch = processor(text=[text + "42<|im_end|>"], images=[_image(112, 56, 0)], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8]]  # 56 px -> 64 px: patch 16, 8 tokens after the merge
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mergers.parameters())
