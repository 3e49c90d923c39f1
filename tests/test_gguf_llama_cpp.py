"""The real proof of the GGUF export: llama.cpp (through llama-cpp-python) loads the exported tiny models
and gives the HF model's logits, for text prompts (`Llama.eval`) and for an image + text prompt through
llama.cpp's multimodal library (libmtmd: mtmd_tokenize + mtmd_helper_eval_chunks, which runs the mmproj
vision tower and projector and decodes the image embeddings with the right (M-)RoPE positions).

Needs llama-cpp-python (built from its sdist: about 10 minutes on 2 cores with -j1; pip caches the wheel,
so build it in CI's set-up step, not here). Skipped when it is not installed.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lightning.export.gguf import to_gguf

llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")

pytestmark = pytest.mark.slow

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "gemma3", "pixtral", "mistral3", "mistral3_small"]
# (width, height) per family: a multiple of the patch (x merge) size that HF's processor does not resize
# either, because llama.cpp's clip.cpp resizes with its own rules (token limits, bicubic) where HF would.
IMAGE_SIZE = {"qwen2_vl": (112, 56), "qwen2_5_vl": (112, 56), "gemma3": (56, 56), "pixtral": (64, 32),
              "mistral3": (112, 56), "mistral3_small": (112, 56)}
# where the chat template puts the image, and what mtmd expects there instead (it adds begin/end tokens itself)
PLACEHOLDER = {"qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "{m}"),
               "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "{m}"),
               "gemma3": ("<start_of_image>", "\n\n{m}\n\n"),  # as Gemma3Processor expands it
               "pixtral": ("[IMG]", "{m}"), "mistral3": ("[IMG]", "{m}"), "mistral3_small": ("[IMG]", "{m}")}


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


def _llama(path, logits_all=False):
    # F32 KV cache: the comparison is about the weights, not KV rounding
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=logits_all, verbose=False,
                           type_k=0, type_v=0, n_threads=2, seed=0)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _text_prompt(processor) -> str:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Read the receipt: total 1,234.56 dollars, 2024-05-17."}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _text_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])  # (T, V)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_match_hf(hf, gguf_files, family):
    _, model, processor = hf(family)
    text = _text_prompt(processor)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, V)
    llm = _llama(gguf_files(family)["model"], logits_all=True)
    try:
        # llama.cpp's tokenizer reproduces the HF one on this prompt (special tokens included)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        got = _text_logits(llm, ids)
    finally:
        llm.close()
    assert got.shape == want.shape
    assert _rel(got, want) < 5e-3, _rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("quant,max_rel,min_agree", [("f16", 5e-3, 1.0), ("bf16", 2e-2, 0.9), ("q8_0", 5e-2, 0.9)])
def test_text_quantised_qwen2_vl(hf, gguf_files, quant, max_rel, min_agree):
    _, model, processor = hf("qwen2_vl")
    ids = processor.tokenizer(_text_prompt(processor), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = _llama(gguf_files("qwen2_vl", quant)["model"], logits_all=True)
    try:
        got = _text_logits(llm, ids)
    finally:
        llm.close()
    assert _rel(got, want) < max_rel
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
    llm = _llama(paths["model"], logits_all=True)
    try:
        got = _text_logits(llm, ids)
    finally:
        llm.close()
    assert np.isfinite(got).all()
    assert _rel(got, want) < 0.3  # 64-wide rows fall back to Q5_0/Q8_0 blocks: coarse but close


def _image(family) -> Image.Image:
    w, h = IMAGE_SIZE[family]
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mtmd_last_logits(paths, text: str, img: Image.Image, n_vocab_check: int):
    """Run text + image through llama.cpp's libmtmd; return (token layout with -1 for image positions,
    last-token logits)."""
    llm = _llama(paths["model"])
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.print_timings = False
    params.warmup = False
    ctx = mtmd.mtmd_init_from_file(str(paths["mmproj"]).encode(), llm.model, params)
    assert ctx, f"libmtmd could not load {paths['mmproj']}"
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(img.width, img.height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        inp = mtmd.mtmd_input_text()
        raw = text.encode()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) == 0
        layout = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                layout += [ptr[j] for j in range(n.value)]
            else:
                layout += [-1] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        new_n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, 512, True, ctypes.byref(new_n_past)) == 0
        n_vocab = llm.n_vocab()
        assert n_vocab == n_vocab_check
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()
    return layout, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_image_text_logits_match_hf(hf, gguf_files, family):
    _, model, processor = hf(family)
    img = _image(family)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written here?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[img], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = model(**inputs).logits[0, -1].numpy()

    placeholder, replacement = PLACEHOLDER[family]
    assert placeholder in text
    mt_text = text.replace(placeholder, replacement.format(m=mtmd.mtmd_default_marker().decode()))
    layout, got = _mtmd_last_logits(gguf_files(family), mt_text, img, want.shape[0])

    # same prompt on both sides: every text token equal, image spans of the same length
    cfg = model.config
    image_ids = {getattr(cfg, "image_token_id", None), getattr(cfg, "image_token_index", None),
                 processor.tokenizer.convert_tokens_to_ids("[IMG_BREAK]") if family in ("pixtral", "mistral3", "mistral3_small") else None}
    hf_layout = [-1 if t in image_ids else t for t in inputs["input_ids"][0].tolist()]
    assert layout == hf_layout
    assert _rel(got, want) < 5e-3, _rel(got, want)
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
    from test_gguf_export import gemma3_with_spm_tokenizer

    src, tok = gemma3_with_spm_tokenizer(hf("gemma3")[0], tmp_path / "gemma3_spm")
    paths = to_gguf(src, tmp_path / "out", quant="f32", mmproj=False)
    llm = llama_cpp.Llama(model_path=str(paths["model"]), n_ctx=128, verbose=False, vocab_only=True)
    try:
        for text in ["Hello, World! The total is 1,234.56 dollars.", " leading space and  two",
                     "wörld ünïcode 🙂 日本", "line\nbreak\ttab", "<start_of_turn>user\nHi<end_of_turn>\n"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"], text
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

    from vlm_lightning.export.gguf_vocab import PRE_TOKENIZER_REGEXES

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
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()
