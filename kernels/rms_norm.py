"""RMSNorm: Triton forward/backward -> ``RMSNormFunction`` -> ``rms_norm``.

Statistics in fp32. Two casting conventions, as in Hugging Face:
  - "llama" (Qwen2/2.5-VL, Llama, Mistral, Ministral): y = w * (x * rstd).to(x.dtype)
  - "gemma" (Gemma 3, with offset=1.0): y = (x * rstd * (1 + w)).to(x.dtype), all in fp32.
Forward saves x, w and one fp32 rstd per row; backward recomputes x_hat. The weight gradient is computed
only when the weight requires grad (frozen norms under LoRA skip the per-program partial sums).

Example:
    >>> y = rms_norm(x, weight, eps=1e-6)                          # Qwen / Llama
    >>> y = rms_norm(x, weight, eps=1e-6, offset=1.0, casting="gemma")   # Gemma 3
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, as_rows, next_pow2, programs_for, row_warps, triton_ok
from .reference import rms_norm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, x_stride, y_stride, n_rows, H, eps, offset,
                             GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols < H)[None, :]
        x = tl.load(X + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)  # (BLOCK_M,)
        tl.store(RSTD + rows, rstd, mask=rmask)
        xhat = x * rstd[:, None]
        w = (tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32) + offset)[None, :]
        if GEMMA:
            y = xhat * w
        else:  # HF Llama rounds x_hat to the input dtype before the weight multiply
            y = xhat.to(X.dtype.element_ty).to(tl.float32) * w
        tl.store(Y + rows[:, None] * y_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, dy_stride, x_stride, dx_stride, n_rows, H,
                             offset, rows_per_prog, GEMMA: tl.constexpr, HAS_DW: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
        # persistent: program pid owns rows [pid * rows_per_prog, ...) and one partial dw row
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < H
        w = (tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset)[None, :]
        dw_acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_prog
        end = tl.minimum(start + rows_per_prog, n_rows)
        for r0 in range(0, rows_per_prog, BLOCK_M):
            rows = start + r0 + tl.arange(0, BLOCK_M)
            rmask = rows < end
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(X + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
            xhat = x * rstd
            dxhat = dy * w
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / H)[:, None])
            tl.store(DX + rows[:, None] * dx_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DW:
                if GEMMA:
                    dw_acc += dy * xhat
                else:
                    dw_acc += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        if HAS_DW:
            tl.store(DW_PART + pid * H + cols, tl.sum(dw_acc, axis=0), mask=cmask)


def _rows_per_block(block: int, device: torch.device) -> int:
    """Rows per program tile: one row of a wide hidden size on a GPU; many rows under the interpreter
    (it pays per operation, not per element)."""
    if device.type == "cuda":
        return max(1, min(16, 2048 // block))
    return max(1, min(64, 65536 // block))


def _out_dtype(x: torch.Tensor, w: torch.Tensor, casting: str) -> torch.dtype:
    return x.dtype if casting == "gemma" else torch.promote_types(x.dtype, w.dtype)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str):
    """Launcher. Returns (y with x's shape, x as (N, H) rows, rstd (N,) fp32)."""
    x2 = as_rows(x)
    n, h = x2.shape
    y = torch.empty((n, h), dtype=_out_dtype(x, weight, casting), device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block = next_pow2(h)
    bm = _rows_per_block(block, x.device)
    if n:
        _rms_norm_fwd_kernel[(triton.cdiv(n, bm),)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, h, eps,
                                                    offset, GEMMA=casting == "gemma", BLOCK_M=bm, BLOCK=block,
                                                    num_warps=row_warps(block * bm))
    return y.view(x.shape), x2, rstd


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float, casting: str, need_dw: bool):
    """Launcher. dy: (..., H). Returns (dx (N, H) in x's dtype, dw (H,) or None)."""
    dy2 = as_rows(dy)
    n, h = x2.shape
    dx = torch.empty_like(x2)
    progs = max(1, min(programs_for(x2), n))
    rows_per_prog = (n + progs - 1) // progs
    dw_part = torch.empty((progs, h), dtype=torch.float32, device=x2.device) if need_dw else dx
    block = next_pow2(h)
    if n:
        _rms_norm_bwd_kernel[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0),
                                       dx.stride(0), n, h, offset, rows_per_prog, GEMMA=casting == "gemma",
                                       HAS_DW=need_dw, BLOCK_M=_rows_per_block(block, x2.device), BLOCK=block,
                                       num_warps=row_warps(block))
    dw = None
    if need_dw:
        dw = dw_part.sum(0).to(weight.dtype) if n else torch.zeros_like(weight)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        y, x2, rstd = rms_norm_forward(x, weight, eps, offset, casting)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.casting, ctx.x_shape = offset, casting, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.offset, ctx.casting, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             casting: str = "llama") -> torch.Tensor:
    """Fused RMSNorm over the last dim of x (..., H) with weight (H,). See the module docstring.

    Falls back to ``reference.rms_norm_ref`` where Triton cannot run (CPU without the interpreter, bf16 on
    the interpreter).
    """
    if casting not in ("llama", "gemma"):
        raise ValueError(f"rms_norm: casting must be 'llama' or 'gemma', got {casting!r}")
    if not triton_ok(x, weight):
        return rms_norm_ref(x, weight, eps, offset, casting)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), casting)
