"""LLaVA-NeXT (LLaVA-1.6, ``LlavaNextForConditionalGeneration``) as llama.cpp's llava-1.6 mmproj: a CLIP vision
tower with the ``mlp`` projector (``clip.projector_type = "mlp"``: ``mm.0`` -> GELU -> ``mm.2``), the anyres
resolutions (``clip.vision.image_grid_pinpoints``), ``spatial_unpad`` and the learned row separator.

llama.cpp has no converter class for this model (``conversion/`` maps neither text nor mmproj); its legacy route is
``llava_surgery_v2.py`` + ``legacy-models/convert_image_encoder_to_gguf.py``. This writes the same layout from the
merged transformers folder with gguf-py, with three differences, each because clip.cpp reads it so:
``image_newline`` is written as ``v.image_newline`` (the name ``clip.cpp`` loads; the legacy script's
``model.image_newline`` is never read), the pinpoints are written as (width, height) pairs (clip.cpp reads pairs
as width, height; transformers' ``image_grid_pinpoints`` are (height, width), which the legacy script copies
unswapped), and only the blocks up to the feature layer are written, with ``clip.vision.feature_layer`` set, so
that clip.cpp stops where transformers takes ``hidden_states[vision_feature_layer]`` (no post-layernorm:
LLaVA never applies it). The language model is a plain ``llama`` GGUF (Llama / Mistral / Vicuna text),
written by ``writer.py``.

**The mmproj is not an exact image path** (``MMPROJ_CAVEAT``; ``to_gguf`` refuses it unless asked for with
``approximate_mmproj=True``): libmtmd (llama.cpp 0.3.36's ``mtmd.cpp`` / ``mtmd-image.cpp``) feeds the
overview tile and then every anyres tile's full ``(image_size/patch)^2`` feature grid, tile after tile; it never
unpads the grid and never inserts ``image_newline`` (clip.cpp loads the tensor as optional and no llava graph
uses it), after the tiles it feeds the overview (``ov_img_first = false``), and it tiles only images larger than
``image_size`` on a side. Transformers' ``pack_image_features`` puts the overview first, merges the tiles into one
feature map, crops the padding (``unpad_image``) and appends ``image_newline`` to every row. And llama.cpp's llava
graph (``tools/mtmd/models/llava.cpp``) concatenates CLIP's CLS embedding after the patches while its positions and
kept rows assume it first (each tile loses its first patch; a llama.cpp bug). The tensors written here are
transformers' own (tests/export/test_gguf_llava_next.py: libmtmd equals a torch model of that graph per tile).

Example:
    >>> to_gguf("merged_llava_next", "gguf", mmproj=False)            # the exact text GGUF  # doctest: +SKIP
"""
from __future__ import annotations

import functools
from typing import Iterator

import gguf
import numpy as np

__all__ = ["LLAVA_NEXT_MMPROJ", "MMPROJ_CAVEAT", "feature_layers", "llava_next_vision_kv", "llava_next_vision_tensors"]

MMPROJ_CAVEAT = (
    "llama.cpp's libmtmd cannot reproduce LLaVA-NeXT's image tokens: it feeds the overview and each anyres tile's "
    "full feature grid one tile after another, without transformers' unpadding (unpad_image) and without the "
    "image_newline row separator (clip.cpp loads v.image_newline but no llava graph uses it), and it tiles only "
    "images larger than image_size and puts the overview after the tiles; its llava graph also appends CLIP's CLS "
    "token after the patches (tools/mtmd/models/llava.cpp), so each tile drops its first patch")


def feature_layers(cfg: dict) -> list[int]:
    """``vision_feature_layer`` as non-negative ``hidden_states`` indices (0 = the embeddings after
    ``pre_layrnorm``, k = the output of block k-1), as clip.cpp's ``clip.vision.feature_layer`` wants them."""
    n = cfg["vision_config"]["num_hidden_layers"]
    raw = cfg.get("vision_feature_layer", -2)
    layers = [raw] if isinstance(raw, int) else list(raw)
    out = [k if k >= 0 else n + 1 + k for k in layers]
    if any(not 0 < k <= n for k in out):
        raise ValueError(f"vision_feature_layer {raw}: outside the {n} vision blocks (llama.cpp needs >= 1)")
    if out != sorted(set(out)):
        # clip.cpp concatenates the stacked layers in block order; transformers in the configured order
        raise ValueError(f"vision_feature_layer {raw}: llama.cpp concatenates feature layers in increasing order")
    return out


def llava_next_vision_kv(w: gguf.GGUFWriter, cfg: dict, pre: dict) -> None:
    """The clip keys of a LLaVA-NeXT mmproj (``clip.projector_type = "mlp"``)."""
    v = cfg["vision_config"]
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"LLaVA-NeXT with a {v.get('model_type')!r} vision tower: only CLIP is written here")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError(f"vision_feature_select_strategy {cfg['vision_feature_select_strategy']!r}: llama.cpp's "
                         "llava graph always drops the CLS position ('default')")
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise ValueError("llama.cpp's mlp projector is linear (with bias) -> gelu -> linear (with bias)")
    if v["intermediate_size"] == v["hidden_size"]:
        # clip.cpp swaps ffn_up/ffn_down of "mlp" mmprojs whose ffn_down has n_embd rows (old legacy files)
        raise ValueError("vision intermediate_size == hidden_size: clip.cpp would mistake fc1/fc2 for a legacy swap")
    layers = feature_layers(cfg)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")
    w.add_vision_projection_dim(cfg["_text"]["hidden_size"])
    w.add_vision_image_size(v["image_size"])
    w.add_vision_patch_size(v["patch_size"])
    w.add_vision_embedding_length(v["hidden_size"])
    w.add_vision_feed_forward_length(v["intermediate_size"])
    w.add_vision_block_count(max(layers))  # the blocks past the deepest feature layer never run
    w.add_vision_head_count(v["num_attention_heads"])
    w.add_vision_attention_layernorm_eps(v.get("layer_norm_eps", 1e-5))
    act = v.get("hidden_act", "quick_gelu")
    if act == "gelu":
        w.add_vision_use_gelu(True)
    elif act != "quick_gelu":  # clip.cpp's default without use_gelu / use_silu is quick GELU
        raise ValueError(f"CLIP hidden_act {act!r}: llama.cpp supports quick_gelu and gelu")
    w.add_array("clip.vision.feature_layer", layers)
    pinpoints = cfg.get("image_grid_pinpoints") or pre.get("image_grid_pinpoints")
    if not pinpoints:
        raise ValueError("LLaVA-NeXT config has no image_grid_pinpoints")
    w.add_array("clip.vision.image_grid_pinpoints", [x for h, wd in pinpoints for x in (wd, h)])  # (w, h) pairs
    w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
    if "image_mean" not in pre or "image_std" not in pre:
        raise ValueError("the processor config has no image_mean/image_std: the mmproj needs them to normalise pixels")
    w.add_vision_image_mean(list(pre["image_mean"]))
    w.add_vision_image_std(list(pre["image_std"]))


@functools.lru_cache(maxsize=4)
def _names(n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks)


def llava_next_vision_tensors(rest: str, a: np.ndarray, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(gguf name, array) of one vision-tower / projector weight (``rest``: its name inside the part, as
    ``writer.split_name`` gives it); blocks past the feature layer and ``post_layernorm`` yield nothing."""
    fixed = {"linear_1.weight": "mm.0.weight", "linear_1.bias": "mm.0.bias",
             "linear_2.weight": "mm.2.weight", "linear_2.bias": "mm.2.bias", "image_newline": "v.image_newline"}
    if rest in fixed:
        yield fixed[rest], a
        return
    if rest.startswith("post_layernorm."):
        return  # LLaVA takes hidden states, never the pooled, post-normed output
    n_used = max(feature_layers(cfg))
    if rest.startswith("encoder.layers.") and int(rest.split(".")[2]) >= n_used:
        return
    name = _names(cfg["vision_config"]["num_hidden_layers"]).get_name(f"vision_tower.vision_model.{rest}",
                                                                      try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(rest)
    yield name, a


#: arch.py's (vision_kv, vision_tensors, extra tensors) of the "mlp" projector
LLAVA_NEXT_MMPROJ = (llava_next_vision_kv, llava_next_vision_tensors, None)
