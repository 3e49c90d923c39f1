"""Read an exported GGUF back with llama.cpp (through llama-cpp-python), the way a consumer does: text
logits with ``Llama.eval``, image + text logits through llama.cpp's multimodal library (libmtmd:
``mtmd_tokenize`` + ``mtmd_helper_eval_chunks`` runs the mmproj vision tower and projector and decodes the
image embeddings with the right (M-)RoPE positions).

Shared by the GGUF tests and the end-to-end tests; needs ``llama_cpp`` (the ``test`` extra). Left out: the
demo's own question-and-answer step (``ask_gguf.py``). ``python -m vlm_lightning.demo.llama_cpp MODEL MMPROJ
IDS_JSON TEXT_FILE IMAGE OUT`` runs ``read_back`` in a process of its own.

Example:
    >>> llm = open_llama("out/model-f32.gguf", logits_all=True)
    >>> logits = text_logits(llm, ids)                  # (T, V) numpy
    >>> layout, last = image_text_last_logits("out/model-f32.gguf", "out/mmproj-model-f32.gguf", text, image)
"""
from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

#: (width, height) per family: a multiple of the patch (x merge) size that HF's processor does not resize
#: either, because llama.cpp's clip.cpp resizes with its own rules (token limits, bicubic) where HF would.
IMAGE_SIZE = {"qwen2_vl": (112, 56), "qwen2_5_vl": (112, 56), "gemma3": (56, 56), "pixtral": (64, 32),
              "mistral3": (112, 56), "mistral3_small": (112, 56), "qwen3_vl": (128, 64)}
#: where each family's chat template puts the image, and what libmtmd expects there instead (it adds the
#: begin/end tokens itself); ``{m}`` is libmtmd's marker.
PLACEHOLDER = {"qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "{m}"),
               "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "{m}"),
               "qwen3_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "{m}"),
               "gemma3": ("<start_of_image>", "\n\n{m}\n\n"),  # as Gemma3Processor expands it
               "pixtral": ("[IMG]", "{m}"), "mistral3": ("[IMG]", "{m}"), "mistral3_small": ("[IMG]", "{m}")}
#: families whose export llama.cpp reads exactly (LLaVA-NeXT: text only; its approximate mmproj is tested in
#: tests/export/test_gguf_llava_next.py)
LLAMA_CPP_FAMILIES = tuple(IMAGE_SIZE)


def open_llama(path: str | Path, logits_all: bool = False, n_ctx: int = 512):
    """A ``llama_cpp.Llama`` on the CPU with an F32 KV cache (comparisons are about the weights)."""
    import llama_cpp  # optional dependency (the test extra)

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False,
                           type_k=0, type_v=0, n_threads=2, seed=0)


def text_logits(llm, ids: list[int]) -> np.ndarray:
    """(T, V) logits of every position of ``ids``."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def mtmd_prompt(family: str, text: str) -> str:
    """``text`` (rendered by the HF chat template) with the family's image placeholder swapped for libmtmd's."""
    from llama_cpp import mtmd_cpp as mtmd  # optional dependency (the test extra)

    placeholder, replacement = PLACEHOLDER[family]
    if placeholder not in text:
        raise ValueError(f"{family}: the prompt has no image placeholder {placeholder!r}")
    return text.replace(placeholder, replacement.format(m=mtmd.mtmd_default_marker().decode()))


def image_text_last_logits(model_path: str | Path, mmproj_path: str | Path, text: str, img: Image.Image,
                           n_ctx: int = 512) -> tuple[list[int], np.ndarray]:
    """Run text (with libmtmd's marker where the image goes) + image through libmtmd.

    Returns the token layout (-1 at image positions) and the last position's logits (V,).
    """
    import llama_cpp  # optional dependency (the test extra)
    from llama_cpp import mtmd_cpp as mtmd  # optional dependency

    llm = open_llama(model_path, n_ctx=n_ctx)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 1  # one thread: a NaN once came out of a 2-thread Pixtral image encode on a loaded machine
    params.print_timings = False
    params.warmup = False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    if not ctx:
        llm.close()
        raise RuntimeError(f"libmtmd could not load {mmproj_path}")
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(img.width, img.height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        inp = mtmd.mtmd_input_text()
        raw = text.encode()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed (marker count != image count?)")
        layout: list[int] = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                layout += [ptr[j] for j in range(n.value)]
            else:
                layout += [-1] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        new_n_past = llama_cpp.llama_pos(0)
        if mtmd.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, n_ctx, True, ctypes.byref(new_n_past)) != 0:
            raise RuntimeError("mtmd_helper_eval_chunks failed")
        n_vocab = llm.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()
    return layout, logits


def hf_image_layout(family: str, model, processor, input_ids) -> list[int]:
    """HF's token ids with -1 at image positions (image pad tokens; Pixtral-style [IMG_BREAK] too), to
    compare with ``image_text_last_logits``'s layout."""
    cfg = model.config
    image_ids = {getattr(cfg, "image_token_id", None), getattr(cfg, "image_token_index", None)}
    if family in ("pixtral", "mistral3", "mistral3_small"):
        image_ids.add(processor.tokenizer.convert_tokens_to_ids("[IMG_BREAK]"))
    return [-1 if t in image_ids else t for t in input_ids]


def read_back(model_path: str | Path, mmproj_path: str | Path, ids: list[int], text: str, image_path: str | Path,
              out_path: str | Path) -> None:
    """Text logits of ``ids`` and image+text last logits of ``text`` + the image, saved to ``out_path`` (.npz):
    what ``python -m vlm_lightning.demo.llama_cpp`` runs, so a test can read an export in a process of its
    own, as a consumer does (llama.cpp then starts from a clean heap)."""
    llm = open_llama(model_path, logits_all=True)
    try:
        text_out = text_logits(llm, ids)
    finally:
        llm.close()
    layout, last = image_text_last_logits(model_path, mmproj_path, text, Image.open(image_path))
    np.savez(out_path, text_logits=text_out, layout=np.array(layout), last_logits=last)


if __name__ == "__main__":  # python -m vlm_lightning.demo.llama_cpp MODEL MMPROJ IDS_JSON TEXT_FILE IMAGE OUT
    model, mmproj, ids_json, text_file, image, out = sys.argv[1:7]
    read_back(model, mmproj, json.loads(Path(ids_json).read_text()), Path(text_file).read_text(), image, out)
