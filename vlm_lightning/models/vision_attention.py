"""Qwen-VL vision attention: the windows of equal length in one SDPA call instead of one call per window.

Without flash-attention, transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention splits the packed patch
sequence at ``cu_seqlens`` and runs one ``scaled_dot_product_attention`` per window (or per image, in the
full-attention blocks): at 4 images of 448 px with Qwen2.5-VL's 112 px windows that is 1,864 calls per step,
each a few microseconds of GPU work behind tens of microseconds of launch. Consecutive windows of the same
length are contiguous in that sequence, so a run of ``m`` windows of length ``L`` is one (m, heads, L, d) view
and one call. Same math per window (attention never crosses a window), so the result is the same.

``batch_vision_windows(model)`` swaps the forward of every such module (matched by its source: the split loop
and ``apply_rotary_pos_emb_vision``); flash-attention, eager attention and attention dropout in training keep
the original forward. ``apply_kernels`` calls it. Tests: ``tests/models/test_vision_attention.py``.

Example:
    >>> batch_vision_windows(model)        # 32 for Qwen2.5-VL-7B (one per vision block)
    32
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf import forward_source
from .patch import swap_forward, unpatched_class

_SPLIT_LOOP = "torch.split(tensor,lengths.tolist(),dim=2)"
_ROTARY = "apply_rotary_pos_emb_vision(query_states,key_states,cos,sin)"


def _windowed(module: nn.Module) -> bool:
    if not type(module).__name__.endswith("VisionAttention"):
        return False
    if not all(isinstance(getattr(module, a, None), nn.Module) for a in ("qkv", "proj")):
        return False
    src = forward_source(type(module).forward)
    return _SPLIT_LOOP in src and _ROTARY in src


def _runs(lengths: list[int]):
    """(start, count, length) of each run of consecutive equal lengths (empty windows dropped)."""
    start, i = 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        if lengths[i] > 0:
            yield start, j - i, lengths[i]
        start += (j - i) * lengths[i]
        i = j


def windowed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                  scale: float) -> torch.Tensor:
    """Attention within each window of a packed sequence. q, k, v: (heads, S, d) with S = sum(lengths).
    Returns (S, heads, d)."""
    h, _, d = q.shape
    outs = []
    for start, m, n in _runs(lengths):
        qs, ks, vs = (t[:, start:start + m * n].reshape(h, m, n, d).transpose(0, 1) for t in (q, k, v))  # (m,h,n,d)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)  # (m, h, n, d)
        outs.append(o.permute(0, 2, 1, 3).reshape(m * n, h, d))
    return torch.cat(outs, dim=0)


def _make_forward(original):
    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != "sdpa" or position_embeddings is None or (self.training and self.attention_dropout > 0):
            return original(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                            max_seqlen=max_seqlen, **kwargs)
        rotary = sys.modules[unpatched_class(self).__module__].apply_rotary_pos_emb_vision
        s = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S,h,d)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        out = windowed_sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), lengths, self.scaling)
        return self.proj(out.reshape(s, -1).contiguous())
    return forward


def batch_vision_windows(model: nn.Module) -> int:
    """Swap the forward of every windowed Qwen-VL vision attention in ``model``; returns how many."""
    n = 0
    for module in model.modules():
        if _windowed(module):
            swap_forward(module, "vision_windows", _make_forward)
            n += 1
    return n
