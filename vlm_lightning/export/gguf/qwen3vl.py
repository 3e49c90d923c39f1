"""Qwen3-VL (dense) for llama.cpp: text arch ``qwen3vl`` and mmproj projector ``qwen3vl_merger``.

Mirrors llama.cpp's converter (conversion/qwen3vl.py: ``Qwen3VLTextModel`` on top of ``Qwen3Model``, and
``Qwen3VLVisionModel``, at the commit vendored in llama-cpp-python 0.3.36):

* text: the Qwen3 keys plus ``qwen3vl.n_deepstack_layers`` (how many decoder layers get a deepstack feature added)
  and ``rope.dimension_sections`` = ``mrope_section`` padded to 4; llama.cpp's ``qwen3vl`` arch ropes with the
  interleaved layout (``LLAMA_ROPE_TYPE_IMROPE``), as transformers does. Tensors: Qwen3's, with q/k norms.
* mmproj: fused ``attn_qkv`` (clip.cpp's qwen3vl graph splits it), the patch-embedding Conv3d as two Conv2d halves
  plus its bias, the learned position grid ``v.position_embd`` (``image_size`` = sqrt(grid) x patch), the merger as
  ``v.post_ln`` / ``mm.0`` / ``mm.2``, each deepstack merger as ``v.deepstack.<vision block>.{norm,fc1,fc2}`` and
  ``clip.vision.is_deepstack_layers`` flagging those blocks.

The MoE variant (``qwen3_vl_moe``, llama.cpp ``qwen3vlmoe``) is not covered.
"""
from __future__ import annotations

import functools
import re
from typing import Iterator

import gguf
import numpy as np

from .text_kv import text_common

__all__ = ["qwen3vl_text_kv", "qwen3vl_vision_kv", "qwen3vl_vision_tensors"]


def _head_dim(t: dict) -> int:
    return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]


def qwen3vl_text_kv(w: gguf.GGUFWriter, cfg: dict) -> None:
    t = cfg["_text"]
    text_common(w, t)
    w.add_key_length(_head_dim(t))
    w.add_value_length(_head_dim(t))
    rp = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if (rp.get("rope_type") or rp.get("type")) not in (None, "default"):
        raise ValueError(f"qwen3vl: rope_type {rp.get('rope_type')!r} has no GGUF mapping here")
    sections = list(rp.get("mrope_section") or [24, 20, 20])
    if sum(sections) != _head_dim(t) // 2:
        raise ValueError(f"mrope_section {sections} sums to {sum(sections)}, but llama.cpp needs "
                         f"head_dim/2 = {_head_dim(t) // 2}")
    if rp.get("mrope_interleaved") is False:
        raise ValueError("qwen3vl: llama.cpp ropes Qwen3-VL with the interleaved M-RoPE layout only")
    w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    w.add_rope_freq_base(rp.get("rope_theta", t.get("rope_theta", 5000000.0)))
    n_deepstack = len(cfg["vision_config"].get("deepstack_visual_indexes") or [])
    if n_deepstack >= t["num_hidden_layers"]:  # llama.cpp's graph keeps only the output rows before the last add
        raise ValueError(f"qwen3vl: {n_deepstack} deepstack layers for {t['num_hidden_layers']} decoder layers: "
                         "llama.cpp cannot add a deepstack feature to the last decoder layer")
    w.add_num_deepstack_layers(n_deepstack)


def qwen3vl_vision_kv(w: gguf.GGUFWriter, cfg: dict, pre: dict) -> None:
    v = cfg["vision_config"]
    patch = v.get("patch_size", 16)
    grid = int(round(v.get("num_position_embeddings", 2304) ** 0.5))
    if grid * grid != v.get("num_position_embeddings", 2304):
        raise ValueError(f"num_position_embeddings {v.get('num_position_embeddings')} is not a square grid")
    if "image_mean" not in pre or "image_std" not in pre:
        raise ValueError("the processor config has no image_mean/image_std: the mmproj needs them to normalise pixels")
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.QWEN3VL)
    w.add_vision_projection_dim(cfg["_text"]["hidden_size"])
    w.add_vision_image_size(grid * patch)
    w.add_vision_patch_size(patch)
    w.add_vision_embedding_length(v["hidden_size"])
    w.add_vision_feed_forward_length(v["intermediate_size"])
    w.add_vision_block_count(v["depth"])
    w.add_vision_head_count(v["num_heads"])
    w.add_vision_image_mean(list(pre["image_mean"]))
    w.add_vision_image_std(list(pre["image_std"]))
    w.add_vision_use_gelu(True)
    w.add_vision_spatial_merge_size(v.get("spatial_merge_size", 2))
    size = pre.get("size") or {}
    for value, add in ((pre.get("min_pixels") or size.get("shortest_edge"), w.add_vision_min_pixels),
                       (pre.get("max_pixels") or size.get("longest_edge"), w.add_vision_max_pixels)):
        if value:
            add(int(value))
    w.add_vision_attention_layernorm_eps(cfg["_text"].get("rms_norm_eps", 1e-6))  # as the converter
    deepstack = set(v.get("deepstack_visual_indexes") or [])
    w.add_vision_is_deepstack_layers([i in deepstack for i in range(v["depth"])])


@functools.lru_cache(maxsize=8)
def _block_names(n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks)


_MERGER = {"norm": "v.post_ln", "linear_fc1": "mm.0", "linear_fc2": "mm.2"}
_DEEPSTACK = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}


def qwen3vl_vision_tensors(rest: str, a: np.ndarray, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(gguf name, array) for one vision/projector weight (``rest``: its name under ``visual.``); KeyError if none."""
    v = cfg["vision_config"]
    if rest == "patch_embed.proj.weight":  # Conv3d [C, 3, 2, p, p] -> two Conv2d halves
        if a.shape[2] != 2:
            raise KeyError(f"{rest}: temporal_patch_size {a.shape[2]}, llama.cpp supports 2 only")
        yield "v.patch_embd.weight", a[:, :, 0]
        yield "v.patch_embd.weight.1", a[:, :, 1]
        return
    if rest == "patch_embed.proj.bias":
        yield "v.patch_embd.bias", a
        return
    m = re.fullmatch(r"merger\.(norm|linear_fc1|linear_fc2)\.(weight|bias)", rest)
    if m:
        yield f"{_MERGER[m.group(1)]}.{m.group(2)}", a
        return
    m = re.fullmatch(r"deepstack_merger_list\.(\d+)\.(norm|linear_fc1|linear_fc2)\.(weight|bias)", rest)
    if m:
        block = v["deepstack_visual_indexes"][int(m.group(1))]  # named by the vision block it reads
        yield f"v.deepstack.{block}.{_DEEPSTACK[m.group(2)]}.{m.group(3)}", a
        return
    name = _block_names(v["depth"]).get_name(f"visual.{rest}", try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(rest)
    yield name, a
