"""LayerNorm forward (inference / frozen vision towers): Triton kernel -> ``layer_norm``.

Frozen vision towers (Qwen2-VL's ViT, Gemma 3's SigLIP) run LayerNorm forward-only under LoRA on the
language model, so there is no backward kernel: when a gradient is needed (input or affine params
requiring grad with grad mode on) ``layer_norm`` calls ``torch.nn.functional.layer_norm`` instead.

Example:
    >>> y = layer_norm(x, ln.weight, ln.bias, ln.eps)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import HAS_TRITON, as_rows, next_pow2, row_warps, triton_ok

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _layer_norm_fwd_kernel(X, W, B, Y, x_stride, y_stride, H, eps,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / H + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim (fp32 statistics, output in x.dtype); torch when a gradient is needed."""
    if _needs_grad(x, weight, bias) or not triton_ok(x, weight, bias):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    x2 = as_rows(x)
    n, h = x2.shape
    y = torch.empty((n, h), dtype=x.dtype, device=x.device)
    block = next_pow2(h)
    if n:
        _layer_norm_fwd_kernel[(n,)](x2, weight if weight is not None else x2, bias if bias is not None else x2,
                                     y, x2.stride(0), y.stride(0), h, float(eps), HAS_W=weight is not None,
                                     HAS_B=bias is not None, BLOCK=block, num_warps=row_warps(block))
    return y.view(x.shape)
