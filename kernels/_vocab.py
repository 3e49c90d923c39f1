"""Row-wise softmax statistics and in-place logit gradients over a chunk of logits (C, V).

Shared by the fused linear cross-entropy and the fused token log-probs. For one chunk of logits
``x = h_c @ W.T`` (already in a buffer), with z = softcap(x) * inv_temp:

  kernel A (grid rows x vocab segments): per segment online max m, sum exp(z - m) d and, for the
      entropy, sum exp(z - m) * z s; the segment holding the row's target also stores z[target].
  kernel B (same grid): combines the segments (logsumexp, E[z]); segment 0 writes the outputs
      (log p(target), entropy, lse); with WRITE_GRAD every segment then overwrites its logits with
      d/dx of  c_lp * log p(target) + c_ent * entropy  (chain rule through temperature and softcap).

Splitting the vocabulary into segments keeps every SM busy even for small chunks (a chunk of 384 rows
x 8 segments = 3072 programs at V=152064). Logits are read twice and written once per chunk.
Targets outside [0, V) (ignore_index, padding) give log p = 0 and no target term in the gradient.
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, next_pow2, sm_count, triton_ok

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _transform(x, inv_temp, softcap, SOFTCAP: tl.constexpr):
        """fp32 logits -> (z, t) with z = softcap * tanh(x / softcap) * inv_temp (t = tanh(...))."""
        if SOFTCAP:
            t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
            z = softcap * t * inv_temp
        else:
            t = x
            z = x * inv_temp
        return z, t

    @triton.jit
    def _vocab_stats_kernel(Z, z_stride, TGT, M_P, D_P, S_P, ZY, V, n_seg, inv_temp, softcap,
                            SEG: tl.constexpr, BLOCK: tl.constexpr, ENTROPY: tl.constexpr,
                            SOFTCAP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        seg = tl.program_id(1)
        z_row = Z + row * z_stride
        v0 = seg * SEG
        m = -float("inf")
        d = 0.0
        s = 0.0
        for off in range(0, SEG, BLOCK):
            cols = v0 + off + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            z, _ = _transform(x, inv_temp, softcap, SOFTCAP)
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            d = d * alpha + tl.sum(e, axis=0)
            if ENTROPY:
                s = s * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
            m = m_new
        idx = row * n_seg + seg
        tl.store(M_P + idx, m)
        tl.store(D_P + idx, d)
        if ENTROPY:
            tl.store(S_P + idx, s)
        y = tl.load(TGT + row)
        here = (y >= v0) & (y < v0 + SEG) & (y < V)
        y_safe = tl.where(here, y, 0)
        xy = tl.load(z_row + y_safe, mask=here, other=0.0).to(tl.float32)
        zy, _ = _transform(xy, inv_temp, softcap, SOFTCAP)
        tl.store(ZY + row, zy, mask=here)

    @triton.jit
    def _vocab_finish_kernel(Z, z_stride, TGT, M_P, D_P, S_P, ZY, OUT_LP, OUT_ENT, OUT_LSE,
                             COEF_LP, COEF_ENT, coef_lp_scalar, V, n_seg, inv_temp, softcap,
                             SEG: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                             ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
                             COEF_LP_PTR: tl.constexpr, ENT_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        seg = tl.program_id(1)
        sidx = tl.arange(0, BLOCK_S)
        smask = sidx < n_seg
        mp = tl.load(M_P + row * n_seg + sidx, mask=smask, other=-float("inf"))
        dp = tl.load(D_P + row * n_seg + sidx, mask=smask, other=0.0)
        mx = tl.max(mp, axis=0)
        scale = tl.where(smask, tl.exp(mp - mx), 0.0)
        dsum = tl.sum(dp * scale, axis=0)
        lse = mx + tl.log(dsum)
        ez = 0.0
        if ENTROPY:
            sp = tl.load(S_P + row * n_seg + sidx, mask=smask, other=0.0)
            ez = tl.sum(sp * scale, axis=0) / dsum
        y = tl.load(TGT + row)
        valid = (y >= 0) & (y < V)
        if seg == 0:
            zy = tl.load(ZY + row, mask=valid, other=0.0)
            tl.store(OUT_LP + row, tl.where(valid, zy - lse, 0.0))
            tl.store(OUT_LSE + row, lse)
            if ENTROPY:
                tl.store(OUT_ENT + row, lse - ez)
        if WRITE_GRAD:
            if COEF_LP_PTR:
                c_lp = tl.load(COEF_LP + row)
            else:
                c_lp = coef_lp_scalar
            c_lp = tl.where(valid, c_lp, 0.0)
            c_ent = 0.0
            if ENT_GRAD:
                c_ent = tl.load(COEF_ENT + row)
            z_row = Z + row * z_stride
            v0 = seg * SEG
            for off in range(0, SEG, BLOCK):
                cols = v0 + off + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
                z, t = _transform(x, inv_temp, softcap, SOFTCAP)
                p = tl.exp(z - lse)
                dz = c_lp * (tl.where(cols == y, 1.0, 0.0) - p)
                if ENT_GRAD:
                    dz += c_ent * (-p * (z - ez))
                dx = dz * inv_temp
                if SOFTCAP:
                    dx = dx * (1.0 - t * t)
                tl.store(z_row + cols, dx.to(Z.dtype.element_ty), mask=mask)


def default_chunk_rows(vocab: int, elt_size: int, budget_bytes: int = 128 * 2**20) -> int:
    """Rows per chunk so that one (rows, V) logits buffer stays within ``budget_bytes`` (multiple of 64).

    At V=152064 in bf16 that is 384 rows (111 MiB).
    """
    rows = budget_bytes // max(1, vocab * elt_size)
    return max(64, min(4096, rows // 64 * 64))


def _segments(n_rows: int, vocab: int, block: int, device: torch.device) -> int:
    """Vocabulary segment length (a multiple of block) giving at least ~8 programs per SM."""
    if device.type != "cuda":
        return max(block, triton.cdiv(vocab, block) * block)  # interpreter: one segment per row
    want = max(1, min(32, (8 * sm_count(device.index or 0) + n_rows - 1) // max(1, n_rows)))
    seg = triton.cdiv(triton.cdiv(vocab, want), block) * block
    return max(block, seg)


def vocab_chunk(logits: torch.Tensor, targets: torch.Tensor, *, inv_temp: float = 1.0,
                softcap: float | None = None, entropy: bool = False, write_grad: bool = False,
                coef_lp: torch.Tensor | float = 0.0, coef_ent: torch.Tensor | None = None):
    """Statistics (and optionally gradients, in place) for one chunk of logits.

    logits: (C, V) contiguous rows, overwritten by d/dlogits when write_grad.
    targets: (C,) int64. coef_lp: (C,) fp32 or a float; coef_ent: (C,) fp32 or None.
    Returns (logp (C,), entropy (C,) or None, lse (C,)), all fp32.
    """
    c, v = logits.shape
    dev = logits.device
    lp = torch.empty(c, dtype=torch.float32, device=dev)
    lse = torch.empty(c, dtype=torch.float32, device=dev)
    ent = torch.empty(c, dtype=torch.float32, device=dev) if entropy else None
    if c == 0:
        return lp, ent, lse
    if not triton_ok(logits, targets):
        return _vocab_chunk_torch(logits, targets, inv_temp=inv_temp, softcap=softcap, entropy=entropy,
                                  write_grad=write_grad, coef_lp=coef_lp, coef_ent=coef_ent)
    block = min(2048 if dev.type == "cuda" else 1024, next_pow2(v))
    seg = _segments(c, v, block, dev)
    n_seg = triton.cdiv(v, seg)
    m_p = torch.empty((c, n_seg), dtype=torch.float32, device=dev)
    d_p = torch.empty_like(m_p)
    s_p = torch.empty_like(m_p) if entropy else m_p
    zy = torch.zeros(c, dtype=torch.float32, device=dev)
    sc = float(softcap) if softcap is not None else 1.0
    _vocab_stats_kernel[(c, n_seg)](logits, logits.stride(0), targets, m_p, d_p, s_p, zy, v, n_seg,
                                    float(inv_temp), sc, SEG=seg, BLOCK=block, ENTROPY=entropy,
                                    SOFTCAP=softcap is not None, num_warps=8)
    coef_ptr = isinstance(coef_lp, torch.Tensor)
    ent_grad = write_grad and coef_ent is not None
    _vocab_finish_kernel[(c, n_seg if write_grad else 1)](
        logits, logits.stride(0), targets, m_p, d_p, s_p, zy, lp, ent if entropy else lp, lse,
        coef_lp if coef_ptr else lp, coef_ent if ent_grad else lp, 0.0 if coef_ptr else float(coef_lp),
        v, n_seg, float(inv_temp), sc, SEG=seg, BLOCK=block, BLOCK_S=next_pow2(n_seg), ENTROPY=entropy,
        SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, COEF_LP_PTR=coef_ptr, ENT_GRAD=ent_grad,
        num_warps=8)
    return lp, ent, lse


def _vocab_chunk_torch(logits, targets, *, inv_temp, softcap, entropy, write_grad, coef_lp, coef_ent):
    """Same contract as ``vocab_chunk`` in torch ops (CPU without the Triton interpreter)."""
    c, v = logits.shape
    x = logits.float()
    if softcap is not None:
        t = torch.tanh(x / softcap)
        z = softcap * t * inv_temp
    else:
        z = x * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    valid = (targets >= 0) & (targets < v)
    ysafe = targets.clamp(0, v - 1)
    lp = torch.where(valid, z.gather(1, ysafe[:, None])[:, 0] - lse, torch.zeros_like(lse))
    p = torch.exp(z - lse[:, None])
    ez = (p * z).sum(-1)
    ent = (lse - ez) if entropy else None
    if write_grad:
        c_lp = coef_lp if isinstance(coef_lp, torch.Tensor) else torch.full_like(lse, float(coef_lp))
        c_lp = torch.where(valid, c_lp.float(), torch.zeros_like(c_lp, dtype=torch.float32))
        dz = -p * c_lp[:, None]
        dz[torch.arange(c, device=z.device)[valid], ysafe[valid]] += c_lp[valid]
        if coef_ent is not None:
            dz += coef_ent.float()[:, None] * (-p * (z - ez[:, None]))
        dx = dz * inv_temp
        if softcap is not None:
            dx = dx * (1 - t * t)
        logits.copy_(dx)
    return lp, ent, lse
