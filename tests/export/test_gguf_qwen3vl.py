"""Qwen3-VL's GGUF layout (export/gguf/qwen3vl.py) read back with gguf.GGUFReader: the text keys llama.cpp's qwen3vl
arch needs (deepstack count, interleaved M-RoPE sections, head dim), q/k norms, and the mmproj's deepstack mergers
named by the vision block they read. llama.cpp itself loads the files in tests/export/test_gguf_llama_cpp.py."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from vlm_lightning.export.gguf import to_gguf
from vlm_lightning.export.gguf.writer import split_name


@pytest.fixture(scope="module")
def exported(tiny_vlm_dir, tmp_path_factory):
    src = tiny_vlm_dir("qwen3_vl")
    paths = to_gguf(src, tmp_path_factory.mktemp("gguf_qwen3vl"), quant="f32", mmproj_quant="f32", name="q3")
    return paths, src, json.loads((src / "config.json").read_text())


def _fields(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}
    return fields, tensors


def test_text_keys_and_qk_norms(exported):
    paths, _, cfg = exported
    f, tensors = _fields(paths["model"])
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert f["general.architecture"] == "qwen3vl"
    assert f["qwen3vl.n_deepstack_layers"] == len(vision["deepstack_visual_indexes"]) == 1
    assert f["qwen3vl.rope.dimension_sections"] == [*text["rope_parameters"]["mrope_section"], 0]
    assert f["qwen3vl.attention.key_length"] == f["qwen3vl.attention.value_length"] == text["head_dim"]
    for i in range(text["num_hidden_layers"]):
        assert tensors[f"blk.{i}.attn_q_norm.weight"].shape == tensors[f"blk.{i}.attn_k_norm.weight"].shape == (16,)
    assert "output.weight" not in tensors  # tied, as Qwen3-VL-2B


def test_mmproj_deepstack_mergers_and_position_grid(exported):
    paths, src, cfg = exported
    f, tensors = _fields(paths["mmproj"])
    vision = cfg["vision_config"]
    assert f["clip.projector_type"] == "qwen3vl_merger" and f["clip.use_gelu"] is True
    assert f["clip.vision.is_deepstack_layers"] == [i in vision["deepstack_visual_indexes"]
                                                   for i in range(vision["depth"])]
    assert f["clip.vision.image_size"] == int(vision["num_position_embeddings"] ** 0.5) * vision["patch_size"]
    sd = {}
    for path in src.glob("*.safetensors"):
        sd.update({split_name(k)[1]: v.numpy() for k, v in load_file(path).items() if split_name(k)[0] == "vision"})
    assert vision["deepstack_visual_indexes"] == [1]  # merger 0 reads vision block 1: named by the block
    for i, block in enumerate(vision["deepstack_visual_indexes"]):  # f32 export: exact copies
        for hf, gg in (("norm", "norm"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
            np.testing.assert_array_equal(tensors[f"v.deepstack.{block}.{gg}.weight"],
                                          sd[f"deepstack_merger_list.{i}.{hf}.weight"])
    np.testing.assert_array_equal(tensors["mm.0.weight"], sd["merger.linear_fc1.weight"])
    np.testing.assert_array_equal(tensors["v.post_ln.bias"], sd["merger.norm.bias"])
    np.testing.assert_array_equal(tensors["v.position_embd.weight"], sd["pos_embed.weight"])
    np.testing.assert_array_equal(tensors["v.blk.0.attn_qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    conv = sd["patch_embed.proj.weight"]
    np.testing.assert_array_equal(np.stack([tensors["v.patch_embd.weight"], tensors["v.patch_embd.weight.1"]], 2), conv)
    assert "v.patch_embd.bias" in tensors


def test_deepstack_into_the_last_decoder_layer_is_refused(tiny_vlm_dir, tmp_path):
    from vlm_lightning.models.tiny import make_tiny_vlm

    src = make_tiny_vlm("qwen3_vl", tmp_path / "src", vision_config={"deepstack_visual_indexes": [0, 1]})
    with pytest.raises(ValueError, match="2 deepstack layers for 2 decoder layers"):
        to_gguf(src, tmp_path / "out", quant="f32")
    assert not list((tmp_path / "out").glob("*.gguf"))


@pytest.mark.slow
@pytest.mark.parametrize("quant,max_rel", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_quantised_text_and_f16_mmproj_in_llama_cpp(tiny_vlm_dir, tmp_path, quant, max_rel):
    """The files a user ships (a quantised text model + the F16 mmproj) in llama.cpp: text logits and image+text
    last-token logits near transformers' (measured: F16 3.3e-4 / 2.2e-4, Q8_0 7e-3 / 8.6e-3), same argmax."""
    pytest.importorskip("llama_cpp")
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lightning.demo.llama_cpp import (
        IMAGE_SIZE,
        image_text_last_logits,
        mtmd_prompt,
        open_llama,
        rel_err,
        text_logits,
    )

    src = tiny_vlm_dir("qwen3_vl")
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(src)
    paths = to_gguf(src, tmp_path, quant=quant, name="q3")  # mmproj: F16 (the default)
    text = processor.apply_chat_template([{"role": "user", "content": "Total: 1,234.56 dollars."}],
                                         add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    w, h = IMAGE_SIZE["qwen3_vl"]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[img], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want_text = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        want_last = model(**inputs).logits[0, -1].numpy()
    llm = open_llama(paths["model"], logits_all=True)
    try:
        got_text = text_logits(llm, ids)
    finally:
        llm.close()
    _, got_last = image_text_last_logits(paths["model"], paths["mmproj"], mtmd_prompt("qwen3_vl", prompt), img)
    assert rel_err(got_text, want_text) < max_rel and (got_text.argmax(-1) == want_text.argmax(-1)).all()
    assert rel_err(got_last, want_last) < max_rel and got_last.argmax() == want_last.argmax()
