"""LLaVA-NeXT -> GGUF (export/gguf/llava_next.py): a llama text GGUF + llama.cpp's llava-1.6 ("mlp") mmproj.

Fast checks: the mmproj is refused unless asked for (its image path in llama.cpp is not the model's), the text GGUF
alone is written, and the mmproj's keys and tensors are those clip.cpp reads. Slow checks (llama-cpp-python): the
text logits equal transformers'; for a non-square image that takes three anyres tiles, libmtmd's image embeddings
equal a torch reference of what llama.cpp 0.3.36 computes (its llava graph puts CLS after the patches; overview
after the tiles; no unpadding, no image_newline), and the image+text logits equal transformers' language model run
on that layout, while the transformers model itself (overview first, unpadded grid, image_newline) differs.
"""
from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lightning.export.gguf import UnsupportedGGUFFamily, to_gguf


@pytest.fixture(scope="module")
def exported(tiny_vlm_dir, tmp_path_factory):
    src = tiny_vlm_dir("llava_next")
    out = tmp_path_factory.mktemp("llava_next_gguf")
    return src, to_gguf(src, out, quant="f32", mmproj_quant="f32", name="ln", approximate_mmproj=True)


def test_mmproj_refused_unless_asked_for_and_text_alone_is_written(tiny_vlm_dir, tmp_path):
    src = tiny_vlm_dir("llava_next")
    with pytest.raises(UnsupportedGGUFFamily, match=r"not exact.*unpad.*image_newline.*mmproj=False"):
        to_gguf(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    paths = to_gguf(src, tmp_path / "text", quant="q8_0", mmproj=False)
    assert set(paths) == {"model"}
    assert gguf.GGUFReader(paths["model"]).fields["general.architecture"].contents() == "llama"


def test_mmproj_keys_and_tensors(exported):
    from safetensors.torch import load_file

    src, paths = exported
    r = gguf.GGUFReader(paths["mmproj"])
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["clip.projector_type"] == "mlp" and f["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    # transformers' pinpoints are (height, width); clip.cpp reads (width, height) pairs
    assert f["clip.vision.image_grid_pinpoints"] == [56, 28, 28, 56, 56, 56, 28, 84, 84, 28]
    # vision_feature_layer -2 of 2 blocks = hidden_states[1]: one block written, the second never runs
    assert f["clip.vision.feature_layer"] == [1] and f["clip.vision.block_count"] == 1
    assert f["clip.vision.projection_dim"] == 64 and "clip.use_gelu" not in f  # CLIP's quick_gelu is the default
    tensors = {t.name: t for t in r.tensors}
    assert not any(n.startswith(("v.blk.1.", "v.post_ln")) for n in tensors)
    sd = load_file(src / "model.safetensors")
    for name, key in [("v.image_newline", "image_newline"), ("mm.0.weight", "multi_modal_projector.linear_1.weight"),
                      ("mm.2.bias", "multi_modal_projector.linear_2.bias"),
                      ("v.class_embd", "vision_tower.embeddings.class_embedding"),
                      ("v.blk.0.ffn_up.weight", "vision_tower.encoder.layers.0.mlp.fc1.weight")]:
        np.testing.assert_array_equal(np.asarray(tensors[name].data).reshape(sd[key].shape), sd[key].numpy())


def _mtmd_image_embeddings(model_path, mmproj_path, text, img) -> list[np.ndarray]:
    """libmtmd's embeddings of each image chunk, in prompt order: [(n_tokens, n_embd), ...]."""
    from llama_cpp import mtmd_cpp as mtmd

    from vlm_lightning.demo.llama_cpp import open_llama

    llm = open_llama(model_path)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    rgb = np.asarray(img, dtype=np.uint8).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(img.width, img.height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
    chunks = mtmd.mtmd_input_chunks_init()
    out = []
    try:
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text.encode(), len(text.encode()), False, True
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                e = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * llm.n_embd(),))
                out.append(e.reshape(n, llm.n_embd()).copy())
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()
    return out


def _cls_last_tile_features(model, pixels: torch.Tensor) -> np.ndarray:
    """What llama.cpp 0.3.36's llava graph computes for one tile (tools/mtmd/models/llava.cpp): CLS concatenated
    AFTER the patches, position embeddings added in that order, rows 1..n kept (so patch 0 is dropped and the CLS
    output is the last token), the feature layer (hidden_states[1] here), then the projector. (n, D)."""
    vt = model.model.vision_tower
    patches = vt.embeddings.patch_embedding(pixels[None]).flatten(2).transpose(1, 2)  # (1, n, C)
    seq = torch.cat([patches, vt.embeddings.class_embedding[None, None]], 1) + vt.embeddings.position_embedding.weight
    h = vt.encoder.layers[0](vt.pre_layrnorm(seq), None)
    h = h[0] if isinstance(h, tuple) else h
    return model.model.multi_modal_projector(h[:, 1:])[0].numpy()


@pytest.mark.slow
def test_llama_cpp_reads_text_exactly_and_the_image_path_differs_where_documented(exported):
    pytest.importorskip("llama_cpp")
    from llama_cpp import mtmd_cpp as mtmd
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lightning.demo.llama_cpp import image_text_last_logits, open_llama, rel_err, text_logits

    src, paths = exported
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(src)

    # text: the llama GGUF gives transformers' logits
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Read the receipt: total 1,234.56 dollars."}]}]
    ids = processor.tokenizer(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(paths["model"], logits_all=True)
    try:
        got = text_logits(llm, ids)
    finally:
        llm.close()
    assert rel_err(got, want) < 1e-4  # measured 2.9e-7

    # image: 84x28 (width x height) is the pinpoint (28, 84): three 28x28 tiles, no resize of the tiles
    arr = (np.random.default_rng(0).random((28, 84, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = processor(images=[img], text=[text], return_tensors="pt")
    mtext = text.replace("<image>", mtmd.mtmd_default_marker().decode())
    chunks = _mtmd_image_embeddings(paths["model"], paths["mmproj"], mtext, img)
    assert [c.shape for c in chunks] == [(4, 64)] * 4  # three tiles, then the overview (ov_img_first = false)
    pv = batch["pixel_values"][0]  # (overview + 3 tiles, 3, 28, 28): transformers puts the overview first
    with torch.no_grad():
        for k in range(3):  # the tiles need no resizing: llama.cpp's == the reference of its graph
            assert rel_err(chunks[k], _cls_last_tile_features(model, pv[1 + k])) < 1e-3  # measured 1.6e-4
        standard = model.model.multi_modal_projector(
            model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]).numpy()
    assert rel_err(chunks[0], standard[1]) > 0.05  # transformers' own tile features: CLS first (measured 0.32)

    layout, cpp_last = image_text_last_logits(paths["model"], paths["mmproj"], mtext, img)
    n_hf = int((batch["input_ids"][0] == model.config.image_token_index).sum())
    assert (layout.count(-1), n_hf) == (16, 18)  # 4 x 4 vs overview 4 + grid 2 rows x (6 + newline)
    with torch.no_grad():
        hf_last = model(**batch).logits[0, -1].numpy()
        # transformers' language model on libmtmd's embeddings in libmtmd's layout: the text GGUF is exact there
        image_rows = iter(torch.from_numpy(np.concatenate(chunks)))
        embed = model.model.language_model.embed_tokens.weight
        x = torch.stack([next(image_rows) if t == -1 else embed[t] for t in layout])[None]
        same_layout = model.lm_head(model.model.language_model(inputs_embeds=x).last_hidden_state)[0, -1].numpy()
    assert rel_err(cpp_last, same_layout) < 1e-4  # measured 3.8e-7
    print(f"llava_next image+text last logits vs transformers: rel {rel_err(cpp_last, hf_last):.3g}")
    assert rel_err(cpp_last, hf_last) > 1e-3  # the documented difference (measured 0.12 on this tiny model)
