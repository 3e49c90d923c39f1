"""Rotary position embeddings, q and k in one launch: Triton kernel -> ``RopeFunction`` -> ``apply_rope``.

HF layout ("rotate_half"): out = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), i.e.
    out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2],    out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:].
Backward is the inverse rotation of the incoming gradient (the same kernel with the sign of sin flipped),
so nothing but cos/sin is saved.

One program per token (a block of tokens under the interpreter): it loads the token's cos/sin (or builds
them from the position ids) once and rotates every head of q and of k with them, so q and k are read
once and written once, forward and backward alike. Each output has its input's strides, so one set of
strides addresses both and the launch stays short (launch overhead is a visible part of these sub-ms ops).

Two ways in:
  - ``apply_rope(q, k, cos, sin)``: cos/sin (B or 1, T, D) as HF's rotary embedding returns them. For
    Qwen2-VL / Qwen2.5-VL the M-RoPE section interleave is already inside those cos/sin (HF builds them in
    ``Qwen2VLRotaryEmbedding``), so this one kernel serves 1-D RoPE and M-RoPE alike; it is what
    ``apply_kernels`` patches in.
  - ``apply_rope_from_positions(q, k, position_ids, inv_freq, mrope_section)``: cos/sin computed in the
    kernel (fp32) from 1-D (B, T) or M-RoPE (3, B, T) position ids: frequency j uses the position row of
    the ``mrope_section`` it falls in. Nothing of size (B, T, D) is materialised.
q: (B, Hq, T, D), k: (B, Hk, T, D), any strides (HF passes transposed views; q or k without a unit stride
on D, or not dense, is copied once).

Example:
    >>> q, k = apply_rope(q, k, cos, sin)
    >>> q, k = apply_rope_from_positions(q, k, position_ids_3bt, rotary.inv_freq, mrope_section=[16, 24, 24])
"""
from __future__ import annotations

import functools

import torch

from ._utils import HAS_TRITON, cdiv, next_pow2, triton_ok
from .reference import rope_cos_sin_ref, rope_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(X, OUT, sb, sh, st, b, t, nmask, c1, c2, s1, s2, NH: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        # tile (BLOCK_T tokens, BLOCK_H heads, BLOCK_D = D/2 padded); b, t: (BLOCK_T,) int64.
        # OUT has X's strides, so one offset addresses both.
        hh = tl.arange(0, BLOCK_H)[None, :, None]
        dd = tl.arange(0, BLOCK_D)[None, None, :]
        mask = nmask[:, None, None] & (hh < NH) & (dd < HALF)
        off = (b * sb + t * st)[:, None, None] + hh * sh + dd
        x1 = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + off + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(OUT + off, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + off + HALF, o2.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, TA, TB, q_sb, q_sh, q_st, k_sb, k_sh, k_st, a_s0, a_sb, a_st, n_tok, T, scaling,
                     HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_T: tl.constexpr,
                     FROM_POS: tl.constexpr, SEC0: tl.constexpr, SEC1: tl.constexpr, BACKWARD: tl.constexpr):
        # TA, TB: cos, sin tables (B or 1, T, D) with strides (a_sb, a_st, 1); or, FROM_POS, position ids
        # (P, B or 1, T) with strides (a_s0, a_sb, a_st) and inv_freq (D/2,) fp32.
        n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat (b, t) token index
        nmask = n < n_tok
        b = n // T
        t = n % T
        d = tl.arange(0, BLOCK_D)[None, :]
        m2 = nmask[:, None] & (d < HALF)
        if FROM_POS:
            # M-RoPE: frequency j takes the position row (t, h, w) of its section; 1-D: SEC0 = HALF.
            sec = (d >= SEC0).to(tl.int64) + (d >= SEC0 + SEC1).to(tl.int64)
            pos = tl.load(TA + sec * a_s0 + (b * a_sb + t * a_st)[:, None], mask=m2, other=0).to(tl.float32)
            ang = pos * tl.load(TB + d, mask=d < HALF, other=0.0)
            c1 = tl.cos(ang) * scaling
            s1 = tl.sin(ang) * scaling
            c2 = c1
            s2 = s1
        else:
            off = (b * a_sb + t * a_st)[:, None] + d
            c1 = tl.load(TA + off, mask=m2, other=0.0).to(tl.float32)
            c2 = tl.load(TA + off + HALF, mask=m2, other=0.0).to(tl.float32)
            s1 = tl.load(TB + off, mask=m2, other=0.0).to(tl.float32)
            s2 = tl.load(TB + off + HALF, mask=m2, other=0.0).to(tl.float32)
        c1 = c1[:, None, :]
        c2 = c2[:, None, :]
        s1 = s1[:, None, :]
        s2 = s2[:, None, :]
        _rotate_heads(Q, QO, q_sb, q_sh, q_st, b, t, nmask, c1, c2, s1, s2, HQ, HALF, BLOCK_HQ, BLOCK_D, BACKWARD)
        _rotate_heads(K, KO, k_sb, k_sh, k_st, b, t, nmask, c1, c2, s1, s2, HK, HALF, BLOCK_HK, BLOCK_D, BACKWARD)


def _with_output(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(x, out, x's strides) where out is new and has x's strides (x copied to contiguous where that cannot
    be had: a non-dense x, e.g. a slice of a fused qkv projection, or a strided last dim)."""
    out = torch.empty_like(x)  # keeps the strides of a dense x (HF's transposed (B, T, H, D) views)
    xs, os_ = x.stride(), out.stride()
    if (xs != os_ and any(s != o and n != 1 for n, s, o in zip(x.shape, xs, os_))) or xs[-1] != 1:
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        xs = x.stride()
    return x, out, xs


@functools.lru_cache(maxsize=None)
def _config(hq: int, hk: int, half: int, cuda: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_HQ, BLOCK_HK, BLOCK_D, tokens per program, num_warps). One token per program on a GPU
    (28 x 64 x 2 elements of q per token at Qwen-7B); up to 64 under the interpreter, which pays per operation."""
    bhq, bhk, bd = next_pow2(hq), next_pow2(hk), next_pow2(half)
    per_tok = max(bhq, bhk) * bd
    if cuda:
        return bhq, bhk, bd, 1, 4 if per_tok <= 2048 else 8
    return bhq, bhk, bd, max(1, min(64, 32768 // per_tok)), 4


def _launch(q, k, ta, tb, a_strides, from_pos, sections, scaling, backward):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) into new tensors with the same strides."""
    q, qo, qs = _with_output(q)
    k, ko, ks = _with_output(k)
    bsz, hq, t, d = q.shape
    hk = k.shape[1]
    n_tok = bsz * t
    if n_tok:
        bhq, bhk, bd, block_t, warps = _config(hq, hk, d // 2, q.is_cuda)
        _rope_kernel[(cdiv(n_tok, block_t),)](
            q, k, qo, ko, ta, tb, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], *a_strides, n_tok, t, scaling,
            HQ=hq, HK=hk, HALF=d // 2, BLOCK_D=bd, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_T=block_t,
            FROM_POS=from_pos, SEC0=sections[0], SEC1=sections[1], BACKWARD=backward, num_warps=warps)
    return qo, ko


class RopeFunction(torch.autograd.Function):
    """(q, k, cos, sin) -> rotated (q, k); or with cos=None, (q, k, pos, inv_freq) in-kernel angles.

    Gradients that do not reach the loss arrive as zeros (autograd materialises them), so backward always
    has both dq and dk.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, pos, inv_freq, sections, scaling):
        half = q.shape[-1] // 2
        if pos is None:  # tables (B or 1, T, D); sin has cos's strides
            ta, tb = cos, sin
            a_strides = (0, cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
            sections = (half, half)
        else:  # position ids (P, B or 1, T), fp32 inv_freq (D/2,); 1-D RoPE: every frequency uses row 0
            ta, tb = pos, inv_freq
            a_strides = (pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1) if pos.shape[1] > 1 else 0,
                         pos.stride(2))
            sections = (sections[0], sections[1]) if sections is not None else (half, half)
        ctx.save_for_backward(ta, tb)
        ctx.args = a_strides, pos is not None, sections, scaling
        return _launch(q, k, ta, tb, a_strides, pos is not None, sections, scaling, False)

    @staticmethod
    def backward(ctx, dq, dk):
        ta, tb = ctx.saved_tensors
        dq_in, dk_in = _launch(dq, dk, ta, tb, *ctx.args, True)
        return dq_in, dk_in, None, None, None, None, None, None


def _shapes_ok(q, k, d_expected):
    return (q.dim() == 4 and k.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
            and q.shape[3] == k.shape[3] == d_expected and d_expected % 2 == 0 and q.dtype == k.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF ``apply_rotary_pos_emb(q, k, cos, sin)``: q (B, Hq, T, D), k (B, Hk, T, D),
    cos/sin (B or 1, T, D). Other layouts, or cos/sin that need a gradient, use the torch reference."""
    if (unsqueeze_dim != 1 or cos.dim() != 3 or not _shapes_ok(q, k, cos.shape[-1])
            or cos.shape != sin.shape or cos.shape[1] != q.shape[2] or cos.shape[0] not in (1, q.shape[0])
            or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
            or not ((q.is_cuda and k.is_cuda and cos.is_cuda and sin.is_cuda and HAS_TRITON)
                    or triton_ok(q, k, cos, sin))):
        return rope_ref(q, k, cos, sin, unsqueeze_dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():  # the kernel indexes both with cos's strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return RopeFunction.apply(q, k, cos, sin, None, None, None, 1.0)


def apply_rope_from_positions(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
                              inv_freq: torch.Tensor, mrope_section=None,
                              attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with the angles computed in the kernel. position_ids: (B, T) for 1-D RoPE or (3, B, T) for
    M-RoPE with ``mrope_section`` (three ints summing to D/2, e.g. [16, 24, 24] for Qwen2/2.5-VL)."""
    d = q.shape[-1]
    pos = position_ids if position_ids.dim() == 3 else position_ids[None]
    if mrope_section is not None:
        mrope_section = tuple(int(s) for s in mrope_section)
        if len(mrope_section) != 3 or sum(mrope_section) != d // 2 or pos.shape[0] != 3:
            raise ValueError(f"apply_rope_from_positions: mrope_section {mrope_section} must be 3 ints summing "
                             f"to head_dim/2={d // 2} with position_ids (3, B, T), got {tuple(position_ids.shape)}")
    ok = (_shapes_ok(q, k, d) and inv_freq.numel() == d // 2 and pos.shape[-1] == q.shape[2]
          and pos.shape[1] in (1, q.shape[0]) and triton_ok(q, k, inv_freq, pos))
    if not ok:
        cos, sin = rope_cos_sin_ref(pos, inv_freq, mrope_section, attention_scaling, dtype=q.dtype)
        return rope_ref(q, k, cos, sin)
    return RopeFunction.apply(q, k, None, None, pos, inv_freq.float().contiguous(), mrope_section,
                              float(attention_scaling))
