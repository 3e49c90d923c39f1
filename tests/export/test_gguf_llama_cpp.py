"""The real proof of the GGUF export: llama.cpp (through llama-cpp-python) loads the exported tiny models
and gives the HF model's logits, for text prompts (`Llama.eval`) and for an image + text prompt through
llama.cpp's multimodal library (libmtmd: mtmd_tokenize + mtmd_helper_eval_chunks, which runs the mmproj
vision tower and projector and decodes the image embeddings with the right (M-)RoPE positions).

Needs llama-cpp-python (built from its sdist: about 10 minutes on 2 cores with -j1; pip caches the wheel,
so build it in CI's set-up step, not here). Skipped when it is not installed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lightning.demo.llama_cpp import (
    IMAGE_SIZE,
    LLAMA_CPP_FAMILIES,
    hf_image_layout,
    image_text_last_logits,
    mtmd_prompt,
    open_llama,
    rel_err,
    text_logits,
)
from vlm_lightning.export.gguf import to_gguf

llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")

pytestmark = pytest.mark.slow

FAMILIES = list(LLAMA_CPP_FAMILIES)


@pytest.fixture(scope="module")
def hf(tiny_vlm_dir):
    """family -> (dir, model, processor), loaded once."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache = {}

    def get(family):
        if family not in cache:
            try:
                d = tiny_vlm_dir(family)
            except NotImplementedError as err:
                pytest.skip(str(err))
            model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
            cache[family] = (d, model, AutoProcessor.from_pretrained(d))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def gguf_files(hf, tmp_path_factory):
    cache = {}

    def get(family, quant="f32", mmproj_quant="f32"):
        key = (family, quant, mmproj_quant)
        if key not in cache:
            d = hf(family)[0]
            cache[key] = to_gguf(d, tmp_path_factory.mktemp(f"{family}_{quant}"), quant=quant, name=family,
                                 mmproj_quant=mmproj_quant)
        return cache[key]

    return get






def _text_prompt(processor) -> str:
    text = "Read the receipt: total 1,234.56 dollars, 2024-05-17."
    msgs = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)




@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_match_hf(hf, gguf_files, family):
    _, model, processor = hf(family)
    text = _text_prompt(processor)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, V)
    llm = open_llama(gguf_files(family)["model"], logits_all=True)
    try:
        # llama.cpp's tokenizer reproduces the HF one on this prompt (special tokens included)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        got = text_logits(llm, ids)
    finally:
        llm.close()
    assert got.shape == want.shape
    assert rel_err(got, want) < 5e-3, rel_err(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("quant,max_rel,min_agree", [("f16", 5e-3, 1.0), ("bf16", 2e-2, 0.9), ("q8_0", 5e-2, 0.9)])
def test_text_quantised_qwen2_vl(hf, gguf_files, quant, max_rel, min_agree):
    _, model, processor = hf("qwen2_vl")
    ids = processor.tokenizer(_text_prompt(processor), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(gguf_files("qwen2_vl", quant)["model"], logits_all=True)
    try:
        got = text_logits(llm, ids)
    finally:
        llm.close()
    assert rel_err(got, want) < max_rel
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= min_agree


def test_kquant_through_llama_cpp(hf, tmp_path):
    """q4_k_m goes through llama.cpp's own quantiser (in process) and the result loads and runs."""
    import gguf

    d, model, processor = hf("qwen2_vl")
    paths = to_gguf(d, tmp_path, quant="q4_k_m", name="tiny", mmproj=False)
    assert paths["model"].name == "tiny-q4_k_m.gguf" and not (tmp_path / "tiny-f16.gguf").exists()
    reader = gguf.GGUFReader(paths["model"])
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert reader.fields["tokenizer.chat_template"].contents() == processor.tokenizer.chat_template
    ids = processor.tokenizer(_text_prompt(processor), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(paths["model"], logits_all=True)
    try:
        got = text_logits(llm, ids)
    finally:
        llm.close()
    assert np.isfinite(got).all()
    assert rel_err(got, want) < 0.3  # 64-wide rows fall back to Q5_0/Q8_0 blocks: coarse but close


def _image(family) -> Image.Image:
    w, h = IMAGE_SIZE[family]
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))




@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_logits_match_hf(hf, gguf_files, family):
    _, model, processor = hf(family)
    img = _image(family)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written here?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[img], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = model(**inputs).logits[0, -1].numpy()

    paths = gguf_files(family)
    layout, got = image_text_last_logits(paths["model"], paths["mmproj"], mtmd_prompt(family, text), img)
    assert got.shape == want.shape
    # same prompt on both sides: every text token equal, image spans of the same length
    assert layout == hf_image_layout(family, model, processor, inputs["input_ids"][0].tolist())
    assert rel_err(got, want) < 5e-3, rel_err(got, want)
    assert got.argmax() == want.argmax()


def test_chat_completion_with_image_runs_end_to_end(hf, gguf_files, tmp_path):
    """llama-cpp-python's generic multimodal chat handler: chat template from the GGUF, image as a data URI."""
    import base64
    import io

    from llama_cpp.llama_chat_format import MTMDChatHandler

    paths = gguf_files("qwen2_vl")
    buf = io.BytesIO()
    _image("qwen2_vl").save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = MTMDChatHandler(clip_model_path=str(paths["mmproj"]), verbose=False, use_gpu=False)
    llm = llama_cpp.Llama(model_path=str(paths["model"]), chat_handler=handler, n_ctx=512, verbose=False, n_threads=2)
    try:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is written here?"}]}],
            max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] > 8  # the image tokens were counted in


def test_sentencepiece_style_tokenizer_matches_hf(hf, tmp_path):
    """Gemma 3's real tokenizer is BPE with byte fallback over '▁' text: llama.cpp's SPM tokenizer, fed our
    merge-rank scores, must split text exactly as transformers does (bytes, unicode, specials included)."""
    from tests.export.test_gguf import gemma3_with_spm_tokenizer

    src, tok = gemma3_with_spm_tokenizer(hf("gemma3")[0], tmp_path / "gemma3_spm")
    paths = to_gguf(src, tmp_path / "out", quant="f32", mmproj=False)
    llm = llama_cpp.Llama(model_path=str(paths["model"]), n_ctx=128, verbose=False, vocab_only=True)
    try:
        for text in ["Hello, World! The total is 1,234.56 dollars.", " leading space and  two",
                     "wörld ünïcode 🙂 日本", "line\nbreak\ttab", "<start_of_turn>user\nHi<end_of_turn>\n"]:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        llm.close()


@pytest.mark.parametrize("pre", ["qwen2", "tekken", "llama-bpe"])
def test_real_pretokenizer_regexes_match_hf(hf, tmp_path, pre):
    """The real Qwen2 / Mistral Tekken / Llama 3 tokenizers split text with a regex before byte-level BPE;
    llama.cpp re-implements each by name. With that regex in the tokenizer.json, the export names the
    pre-tokenizer and llama.cpp's split equals transformers' on tricky text (digits, case, newlines)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from vlm_lightning.export.gguf.vocab import PRE_TOKENIZER_REGEXES

    src = tmp_path / "model"
    shutil.copytree(hf("qwen2_vl")[0], src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": PRE_TOKENIZER_REGEXES[pre]}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    tok = AutoTokenizer.from_pretrained(src)
    paths = to_gguf(src, tmp_path / "out", quant="f32", mmproj=False)
    import gguf

    assert gguf.GGUFReader(paths["model"]).fields["tokenizer.ggml.pre"].contents() == pre
    llm = llama_cpp.Llama(model_path=str(paths["model"]), n_ctx=128, verbose=False, vocab_only=True)
    try:
        for text in ["The total is 1234567.89 USD", "HelloWorld CamelCase iPhone X", "line one\n\n  indented\r\nwin",
                     "don't You'LL we've", "<|im_start|>user\nhi<|im_end|>\n", "ünïcode 日本語 🙂"]:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        llm.close()
