"""Qwen-VL vision attention: the windows in one or a few SDPA calls instead of one call per window.

Without flash-attention, transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention splits the packed patch
sequence at ``cu_seqlens`` and runs one ``scaled_dot_product_attention`` per window (or per image, in the
full-attention blocks): at 4 images of 448 px with Qwen2.5-VL's 112 px windows that is 1,864 calls per step,
each a few microseconds of GPU work behind tens of microseconds of launch. Consecutive windows of the same
length are contiguous in that sequence, so a run of ``m`` windows of length ``L`` is one (m, heads, L, d) view
and one call. Images of other sizes than multiples of the window have short edge windows, which break the runs
(real data: 2,524 cuDNN calls per step at 8 images of 280-1000 px, 0.28 ms of host time each, the GPU idle
60% of the step): short windows of several lengths are then padded to the longest, keys masked, in one call,
and long ones (whole images in the full-attention blocks) gathered by length, one call per distinct length.
The plan is computed once per ``cu_seqlens`` tensor, not per block. Same math per window (attention never
crosses a window), so the result is the same.

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


#: windows up to this many patches go into one padded call (key-masked) when the padding adds at most
#: ``_PAD_WASTE`` of the tokens; longer ones (whole images in the full-attention blocks) are grouped by length
_PAD_MAX_LEN = 256
_PAD_WASTE = 0.5


def _plan(lengths: list[int]):
    """How ``windowed_sdpa`` calls attention for these window lengths (host-side, cached per ``cu_seqlens``):
    ("runs", runs) when every window has one length; ("pad", starts, lens) for one key-masked call over windows
    padded to the longest; else ("groups", [(length, starts)]) for one call per distinct length."""
    runs = list(_runs(lengths))
    if len({n for _, _, n in runs}) <= 1:
        return ("runs", runs)
    starts, lens, pos = [], [], 0
    for n in lengths:
        if n > 0:
            starts.append(pos)
            lens.append(n)
        pos += n
    longest, total = max(lens), sum(lens)
    if longest <= _PAD_MAX_LEN and longest * len(lens) <= (1 + _PAD_WASTE) * total:
        return ("pad", starts, lens)
    groups: dict[int, list[int]] = {}
    for st, n in zip(starts, lens):
        groups.setdefault(n, []).append(st)
    return ("groups", sorted(groups.items()))


def windowed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                  scale: float, plan=None) -> torch.Tensor:
    """Attention within each window of a packed sequence. q, k, v: (heads, S, d) with S = sum(lengths).
    Returns (S, heads, d). Windows of one length are one (m, heads, L, d) batch: a view when they are
    consecutive, a gather otherwise; short windows of several lengths are padded to the longest with the padded
    keys masked out (their padded query rows are dropped), so attention never crosses a window either way."""
    h, s, d = q.shape
    kind, *rest = plan if plan is not None else _plan(lengths)
    if kind == "runs":
        outs = []
        for start, m, n in rest[0]:
            qs, ks, vs = (t[:, start:start + m * n].reshape(h, m, n, d).transpose(0, 1) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)  # (m, h, n, d)
            outs.append(o.permute(0, 2, 1, 3).reshape(m * n, h, d))
        return torch.cat(outs, dim=0)
    out = q.new_empty(s, h, d)
    if kind == "pad":
        starts, lens = rest
        longest = max(lens)
        ar = torch.arange(longest, device=q.device)
        st = torch.tensor(starts, device=q.device)[:, None]
        ln = torch.tensor(lens, device=q.device)[:, None]
        valid = ar[None] < ln  # (M, L)
        idx = torch.where(valid, st + ar[None], st)  # padded slots read the window's first token (masked)
        qs, ks, vs = (t[:, idx].transpose(0, 1) for t in (q, k, v))  # (M, h, L, d)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :], scale=scale)
        out[idx[valid]] = o.permute(0, 2, 1, 3)[valid]
        return out
    for n, starts in rest[0]:
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)[None])  # (m, n)
        qs, ks, vs = (t[:, idx].transpose(0, 1) for t in (q, k, v))  # (m, h, n, d)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[idx.reshape(-1)] = o.permute(0, 2, 1, 3).reshape(-1, h, d)
    return out


class _PlanCache:
    """The host-side plan per ``cu_seqlens`` tensor: one ``.tolist()`` sync per tensor and forward, not one per
    vision block (all window blocks share one tensor, all full-attention blocks another). Holds the tensors it
    keys on, so an id is never reused while cached; a few entries at most."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, []

    def get(self, cu_seqlens: torch.Tensor):
        for t, version, lengths, plan in self.entries:
            if t is cu_seqlens and version == cu_seqlens._version:
                return lengths, plan
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        plan = _plan(lengths)
        self.entries = [(cu_seqlens, cu_seqlens._version, lengths, plan)] + self.entries[: self.size - 1]
        return lengths, plan


_plans = _PlanCache()


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
        lengths, plan = _plans.get(cu_seqlens)
        out = windowed_sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), lengths, self.scaling, plan)
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
