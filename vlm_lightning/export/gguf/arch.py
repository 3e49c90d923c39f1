"""GGUF layouts: llama.cpp metadata keys and tensor names of each text architecture and mmproj projector.

Which family gets which layout is a fact of the family table (``models.families``: ``gguf_text_arch``,
``gguf_projector``, ``gguf_refusal``); ``layout_for_config`` reads it and picks the converters here, which are keyed by
llama.cpp's own names. They mirror llama.cpp's `convert_hf_to_gguf.py` (conversion/qwenvl.py, gemma.py, llava.py,
mistral3.py at the commit vendored in llama-cpp-python 0.3.36); the vision block names come from gguf-py's own MMPROJ
tensor map, as in that converter. Converters take a weight's name inside its part (``writer.split_name``).
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import gguf
import numpy as np

from vlm_lightning.models.families import FAMILIES, get_family_spec

from .llava_next import LLAVA_NEXT_MMPROJ
from .qwen3vl import qwen3vl_text_kv, qwen3vl_vision_kv, qwen3vl_vision_tensors
from .text_kv import text_common

__all__ = ["GGUFLayout", "SUPPORTED_GGUF_FAMILIES", "UnsupportedGGUFFamily", "layout_for_config", "permute_rope"]


class UnsupportedGGUFFamily(ValueError):
    """The model family has no GGUF layout that llama.cpp loads (text + mmproj); nothing is written."""


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved rope order (llama.cpp `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=8)
def _mmproj_names(n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks)


def _mmproj_block_name(hf_name: str, n_blocks: int) -> str | None:
    """gguf-py's own mmproj name of a vision block weight (``v.blk.3.attn_q.weight``), None if it has none.
    The same map llama.cpp's converter uses, so the block names cannot drift from what clip.cpp loads."""
    return _mmproj_names(n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))


@dataclass(frozen=True)
class GGUFLayout:
    """How one family maps onto llama.cpp. `vision_tensors(rest, array, cfg)` yields (gguf name, array) for a
    vision/projector weight; `text_transform` adjusts a text weight."""

    name: str  # the family
    text_arch: str
    projector_type: str
    text_kv: Callable
    vision_kv: Callable
    vision_tensors: Callable
    text_transform: Callable | None = None
    extra_vision_tensors: Callable | None = None  # (text weights getter, cfg) -> [(name, array)]


# ----------------------------------------------------------------------------------------------------
# shared metadata


def _rope(t: dict) -> dict:
    rp = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if "rope_theta" not in rp and "full_attention" not in rp and t.get("rope_theta") is not None:
        rp = {**rp, "rope_theta": t["rope_theta"]}
    return rp


def _rope_scaling(w: gguf.GGUFWriter, rp: dict) -> None:
    rtype, factor = rp.get("rope_type") or rp.get("type"), rp.get("factor")
    if rtype == "linear" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rtype == "yarn" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rp.get(key) is not None:
                add(rp[key])
        attn = rp.get("attention_factor", rp.get("attn_factor"))
        if attn is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
    elif rtype not in (None, "default"):
        raise UnsupportedGGUFFamily(f"rope_type {rtype!r} has no GGUF mapping here")


def _head_dim(t: dict) -> int:
    return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]


def _vision_common(w: gguf.GGUFWriter, cfg: dict, pre: dict, *, width: int, ff: int, blocks: int, heads: int,
                   image_size: int, patch: int) -> None:
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(cfg["_text"]["hidden_size"])
    w.add_vision_image_size(image_size)
    w.add_vision_patch_size(patch)
    w.add_vision_embedding_length(width)
    w.add_vision_feed_forward_length(ff)
    w.add_vision_block_count(blocks)
    w.add_vision_head_count(heads)
    if "image_mean" not in pre or "image_std" not in pre:
        raise ValueError("the processor config has no image_mean/image_std: the mmproj needs them to normalise pixels")
    w.add_vision_image_mean(list(pre["image_mean"]))
    w.add_vision_image_std(list(pre["image_std"]))


def _pixel_bounds_kv(w: gguf.GGUFWriter, pre: dict) -> None:
    """The training processor's pixel bounds (``min_pixels``/``max_pixels``), so the mmproj records the
    resolution the model was tuned at. clip.cpp (2025) reads these keys only for some projectors; for
    Qwen-VL it keeps its own token limits (``llama-mtmd-cli --image-max-tokens``)."""
    size = pre.get("size") or {}
    lo = pre.get("min_pixels") or size.get("shortest_edge")
    hi = pre.get("max_pixels") or size.get("longest_edge")
    if lo:
        w.add_vision_min_pixels(int(lo))
    if hi:
        w.add_vision_max_pixels(int(hi))


# ----------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL (conversion/qwenvl.py)


def _qwen_text_kv(w: gguf.GGUFWriter, cfg: dict) -> None:
    t = cfg["_text"]
    text_common(w, t)
    rp = _rope(t)
    sections = list(rp.get("mrope_section") or [16, 24, 24])
    if sum(sections) != _head_dim(t) // 2:
        raise ValueError(f"mrope_section {sections} sums to {sum(sections)}, but llama.cpp needs "
                         f"head_dim/2 = {_head_dim(t) // 2}")
    w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    w.add_rope_freq_base(rp.get("rope_theta", 1000000.0))


def _qwen_vision_kv(w: gguf.GGUFWriter, cfg: dict, pre: dict) -> None:
    v = cfg["vision_config"]
    is_25 = cfg["model_type"] == "qwen2_5_vl"
    width = v["hidden_size"] if is_25 else v["embed_dim"]
    ff = v["intermediate_size"] if is_25 else int(v["embed_dim"] * v.get("mlp_ratio", 4))
    _vision_common(w, cfg, pre, width=width, ff=ff, blocks=v["depth"], heads=v["num_heads"],
                   image_size=v.get("image_size", 560), patch=v.get("patch_size", 14))
    w.add_vision_spatial_merge_size(v.get("spatial_merge_size", 2))
    _pixel_bounds_kv(w, pre)
    if is_25:
        w.add_clip_projector_type(gguf.VisionProjectorType.QWEN25VL)
        w.add_vision_use_silu(True)
        full = v.get("fullatt_block_indexes") or []
        if not full:
            raise ValueError("qwen2_5_vl vision_config has no fullatt_block_indexes (llama.cpp needs n_wa_pattern)")
        n_wa = full[0] + 1
        if any(b - a != n_wa for a, b in zip(full, full[1:])):
            raise UnsupportedGGUFFamily(f"fullatt_block_indexes {full} is not a regular pattern llama.cpp can express")
        w.add_vision_n_wa_pattern(n_wa)
    else:
        w.add_clip_projector_type(gguf.VisionProjectorType.QWEN2VL)
    w.add_vision_attention_layernorm_eps(cfg["_text"].get("rms_norm_eps", 1e-6))


def _qwen_vision_tensors(rest: str, a: np.ndarray, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    if rest == "patch_embed.proj.weight":  # Conv3d [C, 3, 2, 14, 14] -> two Conv2d halves
        if a.shape[2] != 2:
            raise UnsupportedGGUFFamily(f"temporal_patch_size {a.shape[2]}: llama.cpp supports 2 only")
        yield "v.patch_embd.weight", a[:, :, 0]
        yield "v.patch_embd.weight.1", a[:, :, 1]
        return
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m:
        bid, mod, kind = m.groups()
        if mod == "attn.qkv":
            q, k, v = np.split(a, 3, axis=0)
            for n, part in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
                yield f"v.blk.{bid}.{n}.{kind}", part
            return
        name = _mmproj_block_name(f"visual.{rest}", cfg["vision_config"]["depth"])
        if name is not None:
            yield name, a
            return
    m = re.fullmatch(r"merger\.(ln_q|mlp\.0|mlp\.2)\.(weight|bias)", rest)
    if m:
        mod, kind = m.groups()
        yield {"ln_q": "v.post_ln", "mlp.0": "mm.0", "mlp.2": "mm.2"}[mod] + f".{kind}", a
        return
    raise KeyError(rest)


# ----------------------------------------------------------------------------------------------------
# Gemma 3 (conversion/gemma.py)


def _gemma3_text_transform(rest: str, a: np.ndarray, cfg: dict) -> np.ndarray:
    return a + 1.0 if rest.endswith("norm.weight") else a  # Gemma3RMSNorm: x * (1 + w)


def _gemma3_text_kv(w: gguf.GGUFWriter, cfg: dict) -> None:
    t = cfg["_text"]
    text_common(w, t)
    hd = _head_dim(t)
    w.add_key_length(hd)
    w.add_value_length(hd)
    qpas = t.get("query_pre_attn_scalar", hd)
    if qpas != hd and not (t["num_hidden_layers"] == 62 and qpas == 168):  # llama.cpp special-cases 27B only
        warnings.warn(
            f"gemma3 query_pre_attn_scalar={qpas} but llama.cpp scales attention by 1/sqrt(head_dim={hd}): "
            "the GGUF will not match the HF model", stacklevel=3)
    rp = _rope(t)
    full = rp.get("full_attention", rp)
    w.add_rope_freq_base(full.get("rope_theta", t.get("rope_theta", 1000000.0)))
    _rope_scaling(w, full)
    local = rp.get("sliding_attention", {}).get("rope_theta", t.get("rope_local_base_freq"))
    if local is not None:
        w.add_rope_freq_base_swa(local)
    if t.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(t["final_logit_softcapping"])
    if t.get("attn_logit_softcapping"):
        raise UnsupportedGGUFFamily("gemma3 with attn_logit_softcapping has no llama.cpp support")
    if t.get("sliding_window_pattern", 6) != 1 and t.get("sliding_window"):
        w.add_sliding_window(t["sliding_window"])
        layer_types = t.get("layer_types")
        if layer_types:
            # llama.cpp assumes every 6th layer is global unless told per layer; transformers 5 configs say it
            if len(layer_types) != t["num_hidden_layers"]:
                raise ValueError(f"gemma3 layer_types has {len(layer_types)} entries for "
                                 f"{t['num_hidden_layers']} layers")
            w.add_sliding_window_pattern([lt == "sliding_attention" for lt in layer_types])


def _gemma3_vision_kv(w: gguf.GGUFWriter, cfg: dict, pre: dict) -> None:
    v = cfg["vision_config"]
    _vision_common(w, cfg, pre, width=v["hidden_size"], ff=v["intermediate_size"], blocks=v["num_hidden_layers"],
                   heads=v["num_attention_heads"], image_size=v["image_size"], patch=v["patch_size"])
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_vision_attention_layernorm_eps(v.get("layer_norm_eps", 1e-6))
    w.add_vision_use_gelu(True)
    per_side = int(cfg.get("mm_tokens_per_image", pre.get("image_seq_length", 256)) ** 0.5)
    scale = (v["image_size"] // v["patch_size"]) // max(per_side, 1)
    if scale > 0 and scale != 4:
        w.add_vision_projector_scale_factor(scale)


def _gemma3_vision_tensors(rest: str, a: np.ndarray, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    fixed = {"embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.patch_embedding.bias": "v.patch_embd.bias",
             "embeddings.position_embedding.weight": "v.position_embd.weight",
             "post_layernorm.weight": "v.post_ln.weight", "post_layernorm.bias": "v.post_ln.bias",
             "mm_input_projection_weight": "mm.input_projection.weight",
             "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"}
    if rest in fixed:
        if rest == "mm_soft_emb_norm.weight":
            a = a + 1.0  # Gemma3RMSNorm
        yield fixed[rest], a
        return
    if rest.startswith("encoder.layers."):
        name = _mmproj_block_name(f"vision_tower.vision_model.{rest}", cfg["vision_config"]["num_hidden_layers"])
        if name is not None:
            yield name, a
            return
    raise KeyError(rest)


# ----------------------------------------------------------------------------------------------------
# Pixtral (LlavaForConditionalGeneration) and Mistral 3 (conversion/llava.py, llama.py, mistral3.py)


def _llama_text_kv(w: gguf.GGUFWriter, cfg: dict) -> None:
    t = cfg["_text"]
    text_common(w, t)
    hd = _head_dim(t)
    w.add_vocab_size(t["vocab_size"])
    w.add_rope_dimension_count(hd)
    if t.get("head_dim") is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    rp = _rope(t)
    w.add_rope_freq_base(rp.get("rope_theta", 10000.0))
    _rope_scaling(w, rp)
    if t.get("model_type") == "ministral3" and rp.get("rope_type") == "yarn":
        w.add_rope_scaling_yarn_log_mul(rp["mscale_all_dim"])
        w.add_attn_temperature_scale(rp["llama_4_scaling_beta"])
    if t.get("sliding_window"):
        raise UnsupportedGGUFFamily(f"{t.get('model_type')} text with sliding_window={t['sliding_window']}: "
                                    "llama.cpp's llama/mistral3 graphs attend to the full context; "
                                    "set sliding_window=None")


def _llama_text_transform(rest: str, a: np.ndarray, cfg: dict) -> np.ndarray:
    t = cfg["_text"]
    if rest.endswith("self_attn.q_proj.weight"):
        return permute_rope(a, t["num_attention_heads"])
    if rest.endswith("self_attn.k_proj.weight"):
        return permute_rope(a, t.get("num_key_value_heads", t["num_attention_heads"]))
    return a


def _pixtral_vision_kv(w: gguf.GGUFWriter, cfg: dict, pre: dict) -> None:
    v = cfg["vision_config"]
    size = v.get("image_size", 1024)
    _vision_common(w, cfg, pre, width=v["hidden_size"], ff=v["intermediate_size"], blocks=v["num_hidden_layers"],
                   heads=v["num_attention_heads"], image_size=size, patch=v["patch_size"])
    w.add_clip_projector_type(gguf.VisionProjectorType.PIXTRAL)
    w.add_vision_attention_layernorm_eps(v.get("layer_norm_eps", 1e-5))
    act = v.get("hidden_act", "gelu")
    if act == "silu":
        w.add_vision_use_silu(True)
    elif act == "gelu":
        w.add_vision_use_gelu(True)
    else:
        raise UnsupportedGGUFFamily(f"pixtral vision hidden_act {act!r}: llama.cpp supports silu / gelu")
    if "spatial_merge_size" in cfg:
        w.add_vision_spatial_merge_size(cfg["spatial_merge_size"])
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise UnsupportedGGUFFamily(f"projector_hidden_act {cfg['projector_hidden_act']!r}: llama.cpp's pixtral "
                                    "projector uses gelu")
    if cfg.get("vision_feature_layer", -1) != -1:
        raise UnsupportedGGUFFamily(f"vision_feature_layer {cfg['vision_feature_layer']}: llama.cpp's pixtral uses "
                                    "the last layer")


def _pixtral_vision_tensors(rest: str, a: np.ndarray, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    v = cfg["vision_config"]
    fixed = {"patch_conv.weight": "v.patch_embd.weight", "patch_conv.bias": "v.patch_embd.bias",
             "ln_pre.weight": "v.pre_ln.weight", "linear_1.weight": "mm.1.weight", "linear_1.bias": "mm.1.bias",
             "linear_2.weight": "mm.2.weight", "linear_2.bias": "mm.2.bias", "norm.weight": "mm.input_norm.weight",
             "patch_merger.merging_layer.weight": "mm.patch_merger.weight"}
    if rest in fixed:
        yield fixed[rest], a
        return
    name = _mmproj_block_name(f"vision_tower.{rest}", v["num_hidden_layers"])
    if rest.startswith("transformer.layers.") and name is not None:
        if rest.endswith(("attention.q_proj.weight", "attention.k_proj.weight", "attention.q_proj.bias",
                          "attention.k_proj.bias")):
            a = permute_rope(a, v["num_attention_heads"])
        yield name, a
        return
    raise KeyError(rest)


def _img_break(get_text: Callable[[str], np.ndarray], cfg: dict, tokenizer_ids: dict) -> list[tuple[str, np.ndarray]]:
    """Pixtral puts an [IMG_BREAK] embedding after every row of patches; clip.cpp needs its own copy."""
    tid = tokenizer_ids.get("[IMG_BREAK]")
    if tid is None:
        raise ValueError("pixtral/mistral3 tokenizer has no [IMG_BREAK] token")
    return [("v.token_embd.img_break", get_text("embed_tokens.weight")[tid])]


# ----------------------------------------------------------------------------------------------------

# converters by llama.cpp name: (text_kv, text_transform) per text arch, (vision_kv, vision_tensors, extra) per
# projector type
_TEXT = {"qwen2vl": (_qwen_text_kv, None), "gemma3": (_gemma3_text_kv, _gemma3_text_transform),
         "llama": (_llama_text_kv, _llama_text_transform), "mistral3": (_llama_text_kv, _llama_text_transform),
         "qwen3vl": (qwen3vl_text_kv, None)}
_QWEN_MMPROJ = (_qwen_vision_kv, _qwen_vision_tensors, None)
_MMPROJ = {"qwen2vl_merger": _QWEN_MMPROJ, "qwen2.5vl_merger": _QWEN_MMPROJ,
           "gemma3": (_gemma3_vision_kv, _gemma3_vision_tensors, None),
           "pixtral": (_pixtral_vision_kv, _pixtral_vision_tensors, _img_break), "mlp": LLAVA_NEXT_MMPROJ,
           "qwen3vl_merger": (qwen3vl_vision_kv, qwen3vl_vision_tensors, None)}
#: Families with a GGUF export (text model + mmproj that llama.cpp loads).
SUPPORTED_GGUF_FAMILIES = tuple(name for name, spec in FAMILIES.items() if spec.gguf_text_arch)
_SUPPORTED = "qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3, pixtral (LLaVA + pixtral vision tower), mistral3, llava_next"


def layout_for_config(cfg: dict) -> GGUFLayout:
    """The GGUF layout of a config.json dict; raises `UnsupportedGGUFFamily` with the supported list."""
    mt = cfg.get("model_type")
    try:
        spec = get_family_spec(cfg)
    except ValueError:
        spec = None
    if spec is not None and spec.gguf_refusal:
        raise UnsupportedGGUFFamily(f"GGUF export of {mt!r} is not supported: {spec.gguf_refusal}. "
                                    f"Supported: {_SUPPORTED}")
    if spec is None and mt == "llava":
        vision = (cfg.get("vision_config") or {}).get("model_type")
        raise UnsupportedGGUFFamily(f"GGUF export of LLaVA with a {vision!r} vision tower is not supported (only the "
                                    f"pixtral vision tower). Supported: {_SUPPORTED}")
    if spec is None or spec.gguf_text_arch is None:
        raise UnsupportedGGUFFamily(f"GGUF export of model_type {mt!r} is not supported. Supported: {_SUPPORTED}")
    text_kv, text_transform = _TEXT[spec.gguf_text_arch]
    vision_kv, vision_tensors, extra = _MMPROJ[spec.gguf_projector]
    return GGUFLayout(spec.name, spec.gguf_text_arch, spec.gguf_projector, text_kv, vision_kv, vision_tensors,
                      text_transform, extra)
