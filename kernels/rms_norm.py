"""RMSNorm: Triton forward/backward -> ``RMSNormFunction`` -> ``rms_norm``.

Statistics in fp32. Two casting conventions, as in Hugging Face:
  - "llama" (Qwen2/2.5-VL, Llama, Mistral, Ministral): y = w * (x * rstd).to(x.dtype)
  - "gemma" (Gemma 3, with offset=1.0): y = (x * rstd * (1 + w)).to(x.dtype), all in fp32.
Forward saves x, w and one fp32 rstd per row. Backward reads x, dy and rstd once and writes dx once:
  - frozen weight (LoRA; what bench_kernels.py times): one tile of rows per program, as many programs as
    tiles, no loop and no reduction buffer, so the GPU keeps as many rows in flight as occupancy allows;
  - trainable weight: a few persistent programs per SM, each walking a contiguous block of rows and
    accumulating its dW partial in registers (fp32); one (programs, H) fp32 partial, summed by torch
    (a few MB: 264 x 3584 x 4 B on an H200).

Example:
    >>> y = rms_norm(x, weight, eps=1e-6)                          # Qwen / Llama
    >>> y = rms_norm(x, weight, eps=1e-6, offset=1.0, casting="gemma")   # Gemma 3
"""
from __future__ import annotations

import functools

import torch

from ._utils import HAS_TRITON, cdiv, next_pow2, programs_for, row_warps, triton_ok
from .reference import rms_norm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, x_stride, n_rows, eps, offset,
                             H: tl.constexpr, GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
        # one tile of BLOCK_M rows; Y is contiguous (row stride H)
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
        tl.store(Y + rows[:, None] * H + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_load(DY, X, RSTD, rows, row_end, cols, dy_stride, x_stride, H: tl.constexpr):
        """x, dy (in their own dtypes) and rstd (fp32) of one tile of rows; rows >= row_end read as zeros."""
        rmask = rows < row_end
        mask = rmask[:, None] & (cols < H)[None, :]
        x = tl.load(X + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        return x, dy, rstd

    @triton.jit
    def _rms_norm_bwd_math(x, dy, rstd, DX, rows, row_end, cols, w, H: tl.constexpr, GEMMA: tl.constexpr):
        """Stores dx for one tile of rows; returns the tile's dW contribution dy * x_hat (fp32)."""
        mask = (rows < row_end)[:, None] & (cols < H)[None, :]
        xf = x.to(tl.float32)
        dyf = dy.to(tl.float32)
        r = rstd[:, None]
        xhat = xf * r
        dxhat = dyf * w
        dx = r * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / H)[:, None])
        tl.store(DX + rows[:, None] * H + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if GEMMA:
            g = dyf * xhat
        else:  # y = w * x_hat.to(x.dtype): the weight sees the rounded x_hat
            g = dyf * xhat.to(x.dtype).to(tl.float32)
        return g

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, dy_stride, x_stride, n_rows, rows_per_prog, offset,
                             H: tl.constexpr, GEMMA: tl.constexpr, HAS_DW: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < H
        w = (tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset)[None, :]
        if HAS_DW:
            # persistent: program pid owns rows [start, end) and one dW partial row. The next tile's x / dy
            # are loaded before this tile's math, so each program keeps two tiles in flight (the register
            # budget allows about two such programs per SM at H=3584).
            start = pid.to(tl.int64) * rows_per_prog
            end = tl.minimum(start + rows_per_prog, n_rows)
            acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
            rows = start + tl.arange(0, BLOCK_M)
            x, dy, rstd = _rms_norm_bwd_load(DY, X, RSTD, rows, end, cols, dy_stride, x_stride, H)
            for _ in range(0, rows_per_prog, BLOCK_M):
                nxt = rows + BLOCK_M
                x_n, dy_n, rstd_n = _rms_norm_bwd_load(DY, X, RSTD, nxt, end, cols, dy_stride, x_stride, H)
                acc += _rms_norm_bwd_math(x, dy, rstd, DX, rows, end, cols, w, H, GEMMA)
                x, dy, rstd, rows = x_n, dy_n, rstd_n, nxt
            tl.store(DW_PART + pid * H + cols, tl.sum(acc, axis=0), mask=cmask)
        else:
            # frozen weight: one tile per program, no loop, no partials
            rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            x, dy, rstd = _rms_norm_bwd_load(DY, X, RSTD, rows, n_rows, cols, dy_stride, x_stride, H)
            _rms_norm_bwd_math(x, dy, rstd, DX, rows, n_rows, cols, w, H, GEMMA)


@functools.lru_cache(maxsize=None)
def _config(h: int, cuda: bool) -> tuple[int, int, int, float]:
    """(BLOCK = next_pow2(H), rows per tile, num_warps, multiplier on ``programs_for`` for the dW programs).

    GPU: tiles of ~2048+ elements, i.e. one row of a wide hidden size (8 warps at H=2560..4096; ptxas
    gives the forward 32 registers and the frozen-weight backward ~47, so 5-8 programs per SM stream
    rows). The trainable-weight backward holds two tiles plus the dW partial in registers: ~120 at 16
    elements per thread, 2 programs per SM, which is what ``programs_for`` launches; 64-80 at 8 elements
    per thread, 3 per SM. The interpreter pays per operation, not per element: up to 64 rows per tile."""
    block = next_pow2(h)
    if cuda:
        bm = max(1, min(16, 2048 // block))
        warps = row_warps(block * bm)
        return block, bm, warps, 1.0 if block * bm >= 16 * 32 * warps else 1.5
    return block, max(1, min(64, 65536 // block)), 4, 1.0


def _rows(t: torch.Tensor, h: int) -> tuple[torch.Tensor, int]:
    """(t, row stride) for the kernels, which index rows of H: t itself when contiguous (the usual case; no
    view op on the host), else its (N, H) view (a copy when the last dim is strided)."""
    if t.is_contiguous():
        return t, h
    t2 = t.reshape(-1, h)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str):
    """Launcher. Returns (y with x's shape, x2, rstd (N,) fp32) where x2 is x itself when x is contiguous,
    else x as (N, H) rows; pass x2 to ``rms_norm_backward``."""
    h = x.shape[-1]
    x2, x_stride = _rows(x, h)
    n = x2.numel() // h if h else 0
    out_dtype = x.dtype if casting == "gemma" or weight.dtype == x.dtype else torch.promote_types(x.dtype, weight.dtype)
    # y: contiguous rows of H (empty_like is the cheapest host-side allocation)
    if x2 is x:
        y = torch.empty_like(x) if out_dtype == x.dtype else torch.empty_like(x, dtype=out_dtype)
    else:
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = x.new_empty((n,), dtype=torch.float32)
    if n:
        block, bm, warps, _ = _config(h, x.is_cuda)
        _rms_norm_fwd_kernel[(cdiv(n, bm),)](x2, weight, y, rstd, x_stride, n, eps, offset, H=h,
                                             GEMMA=casting == "gemma", BLOCK_M=bm, BLOCK=block, num_warps=warps)
    return y, x2, rstd


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float, casting: str, need_dw: bool):
    """Launcher. dy: (..., H); x2 as ``rms_norm_forward`` returned it. Returns (dx shaped like x2 (contiguous,
    x's dtype), dw (H,) in the weight's dtype, or None)."""
    h = x2.shape[-1]
    n = rstd.shape[0]
    x_stride = h if x2.is_contiguous() else x2.stride(0)
    dy2, dy_stride = _rows(dy, h)
    dx = torch.empty_like(x2) if x_stride == h else torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    if not n:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    block, bm, warps, dw_mult = _config(h, x2.is_cuda)
    gemma = casting == "gemma"
    if not need_dw:
        _rms_norm_bwd_kernel[(cdiv(n, bm),)](dy2, x2, weight, rstd, dx, dx, dy_stride, x_stride, n, bm, offset,
                                             H=h, GEMMA=gemma, HAS_DW=False, BLOCK_M=bm, BLOCK=block,
                                             num_warps=warps)
        return dx, None
    progs = min(int(programs_for(x2) * dw_mult), cdiv(n, bm))
    rows_per_prog = cdiv(n, progs)
    dw_part = x2.new_empty((progs, h), dtype=torch.float32)
    _rms_norm_bwd_kernel[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy_stride, x_stride, n, rows_per_prog,
                                   offset, H=h, GEMMA=gemma, HAS_DW=True, BLOCK_M=bm, BLOCK=block, num_warps=warps)
    dw = dw_part.sum(0)
    return dx, (dw if dw.dtype == weight.dtype else dw.to(weight.dtype))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        y, x2, rstd = rms_norm_forward(x, weight, eps, offset, casting)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.casting = offset, casting
        ctx.x_shape = None if x2 is x else x.shape  # dx comes back shaped like x2
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.offset, ctx.casting, ctx.needs_input_grad[1])
        return (dx if ctx.x_shape is None else dx.view(ctx.x_shape)), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             casting: str = "llama") -> torch.Tensor:
    """Fused RMSNorm over the last dim of x (..., H) with weight (H,). See the module docstring.

    Falls back to ``reference.rms_norm_ref`` where Triton cannot run (CPU without the interpreter, bf16 on
    the interpreter).
    """
    if casting not in ("llama", "gemma"):
        raise ValueError(f"rms_norm: casting must be 'llama' or 'gemma', got {casting!r}")
    if not ((x.is_cuda and weight.is_cuda and HAS_TRITON) or triton_ok(x, weight)):  # (the common case first)
        return rms_norm_ref(x, weight, eps, offset, casting)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), casting)
