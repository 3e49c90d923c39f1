"""Rotary position embeddings, q and k in one launch: Triton kernel -> ``RopeFunction`` -> ``apply_rope``.

HF layout ("rotate_half"): out = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), i.e.
    out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2],    out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:].
Backward is the inverse rotation of the incoming gradient (the same kernel with the sign of sin flipped),
so nothing but cos/sin is saved.

Two ways in:
  - ``apply_rope(q, k, cos, sin)``: cos/sin (B or 1, T, D) as HF's rotary embedding returns them. For
    Qwen2-VL / Qwen2.5-VL the M-RoPE section interleave is already inside those cos/sin (HF builds them in
    ``Qwen2VLRotaryEmbedding``), so this one kernel serves 1-D RoPE and M-RoPE alike; it is what
    ``apply_kernels`` patches in.
  - ``apply_rope_from_positions(q, k, position_ids, inv_freq, mrope_section)``: cos/sin computed in the
    kernel (fp32) from 1-D (B, T) or M-RoPE (3, B, T) position ids: frequency j uses the position row of
    the ``mrope_section`` it falls in. Nothing of size (B, T, D) is materialised.
q: (B, Hq, T, D), k: (B, Hk, T, D), any strides with a unit stride on D (HF passes transposed views).

Example:
    >>> q, k = apply_rope(q, k, cos, sin)
    >>> q, k = apply_rope_from_positions(q, k, position_ids_3bt, rotary.inv_freq, mrope_section=[16, 24, 24])
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, next_pow2, triton_ok
from .reference import rope_cos_sin_ref, rope_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(X, Y, x_sb, x_sh, x_st, o_sb, o_sh, o_st, b, t, nmask, n_heads, c1, c2, s1, s2,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                      BACKWARD: tl.constexpr):
        # tile (BLOCK_T tokens, BLOCK_H heads, BLOCK_D = D/2 padded); b, t: (BLOCK_T,) int64
        hh = tl.arange(0, BLOCK_H)[None, :, None]
        dd = tl.arange(0, BLOCK_D)[None, None, :]
        mask = nmask[:, None, None] & (hh < n_heads) & (dd < HALF)
        xp = X + (b * x_sb + t * x_st)[:, None, None] + hh * x_sh + dd
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        op = Y + (b * o_sb + t * o_st)[:, None, None] + hh * o_sh + dd
        tl.store(op, o1.to(Y.dtype.element_ty), mask=mask)
        tl.store(op + HALF, o2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, COS, SIN, POS, INV_FREQ,
                     q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st,
                     c_sb, c_st, p_s0, p_sb, p_st, n_tok, T, HQ, HK, scaling,
                     HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                     BLOCK_HK: tl.constexpr, BLOCK_T: tl.constexpr, FROM_POS: tl.constexpr,
                     SEC0: tl.constexpr, SEC1: tl.constexpr, BACKWARD: tl.constexpr):
        n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat (b, t) token index
        nmask = n < n_tok
        b = n // T
        t = n % T
        d = tl.arange(0, BLOCK_D)[None, :]
        m2 = nmask[:, None] & (d < HALF)
        if FROM_POS:
            # M-RoPE: frequency j takes the position row (t, h, w) of its section; 1-D: SEC0 = HALF.
            sec = (d >= SEC0).to(tl.int64) + (d >= SEC0 + SEC1).to(tl.int64)
            pos = tl.load(POS + sec * p_s0 + (b * p_sb + t * p_st)[:, None], mask=m2, other=0).to(tl.float32)
            ang = pos * tl.load(INV_FREQ + d, mask=d < HALF, other=0.0).to(tl.float32)
            c1 = tl.cos(ang) * scaling
            s1 = tl.sin(ang) * scaling
            c2 = c1
            s2 = s1
        else:
            off = (b * c_sb + t * c_st)[:, None] + d
            c1 = tl.load(COS + off, mask=m2, other=0.0).to(tl.float32)
            c2 = tl.load(COS + off + HALF, mask=m2, other=0.0).to(tl.float32)
            s1 = tl.load(SIN + off, mask=m2, other=0.0).to(tl.float32)
            s2 = tl.load(SIN + off + HALF, mask=m2, other=0.0).to(tl.float32)
        c1 = c1[:, None, :]
        c2 = c2[:, None, :]
        s1 = s1[:, None, :]
        s2 = s2[:, None, :]
        _rotate_heads(Q, QO, q_sb, q_sh, q_st, qo_sb, qo_sh, qo_st, b, t, nmask, HQ, c1, c2, s1, s2,
                      HALF, BLOCK_HQ, BLOCK_D, BACKWARD)
        _rotate_heads(K, KO, k_sb, k_sh, k_st, ko_sb, ko_sh, ko_st, b, t, nmask, HK, c1, c2, s1, s2,
                      HALF, BLOCK_HK, BLOCK_D, BACKWARD)


def _launch(q, k, cos, sin, pos, inv_freq, sections, scaling, backward):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) into new tensors with the same strides."""
    bsz, hq, t, d = q.shape
    hk = k.shape[1]
    half = d // 2
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if qo.stride(-1) != 1:
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if ko.stride(-1) != 1:
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    from_pos = pos is not None
    if from_pos:
        c_sb = c_st = 0
        p_s0 = pos.stride(0) if pos.shape[0] > 1 else 0
        p_sb = pos.stride(1) if pos.shape[1] > 1 else 0
        p_st = pos.stride(2)
        cos = sin = inv_freq
        sec0, sec1 = (sections[0], sections[1]) if sections is not None else (half, half)
    else:
        c_sb = cos.stride(0) if cos.shape[0] > 1 else 0
        c_st = cos.stride(1)
        p_s0 = p_sb = p_st = 0
        pos = inv_freq = cos
        sec0 = sec1 = half
    n_tok = bsz * t
    # one token per program on a GPU (28 x 64 x 2 elements of q per token at Qwen-7B); under the
    # interpreter, which pays per operation, up to 64 tokens per program
    per_tok = next_pow2(hq) * next_pow2(half)
    block_t = 1 if q.is_cuda else max(1, min(64, next_pow2(n_tok), 32768 // per_tok))
    if n_tok:
        _rope_kernel[(triton.cdiv(n_tok, block_t),)](
            q, k, qo, ko, cos, sin, pos, inv_freq,
            *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
            c_sb, c_st, p_s0, p_sb, p_st, n_tok, t, hq, hk, float(scaling),
            HALF=half, BLOCK_D=next_pow2(half), BLOCK_HQ=next_pow2(hq), BLOCK_HK=next_pow2(hk),
            BLOCK_T=block_t, FROM_POS=from_pos, SEC0=sec0, SEC1=sec1, BACKWARD=backward,
            num_warps=4 if per_tok <= 2048 else 8)
    return qo, ko


class RopeFunction(torch.autograd.Function):
    """(q, k, cos, sin) -> rotated (q, k); or with cos=None, (q, k, pos, inv_freq) in-kernel angles."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, pos, inv_freq, sections, scaling):
        ctx.save_for_backward(cos, sin, pos, inv_freq)
        ctx.sections, ctx.scaling = sections, scaling
        ctx.shapes = (q.shape, q.dtype, q.device), (k.shape, k.dtype, k.device)
        return _launch(q, k, cos, sin, pos, inv_freq, sections, scaling, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, pos, inv_freq = ctx.saved_tensors
        (qs, qd, qdev), (ks, kd, kdev) = ctx.shapes
        if dq is None:  # an output that did not reach the loss
            dq = torch.zeros(qs, dtype=qd, device=qdev)
        if dk is None:
            dk = torch.zeros(ks, dtype=kd, device=kdev)
        dq_in, dk_in = _launch(dq, dk, cos, sin, pos, inv_freq, ctx.sections, ctx.scaling, backward=True)
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
            or not triton_ok(q, k, cos, sin)):
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
