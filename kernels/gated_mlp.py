"""Gated MLP activations ``act(gate) * up``: Triton forward/backward -> ``GatedActFunction``.

SwiGLU (act = silu: Qwen, Llama/LLaVA, Mistral, Ministral) and GeGLU with tanh GELU (Gemma 3's
``gelu_pytorch_tanh``). Forward saves only gate and up; backward recomputes the activation in fp32
instead of storing it (saves one (N, I) tensor per layer). Math in fp32, one rounding on store.

Example:
    >>> h = swiglu(gate_proj(x), up_proj(x))          # then down_proj(h)
    >>> h = geglu_tanh(gate_proj(x), up_proj(x))      # Gemma 3
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, triton_ok
from .reference import geglu_tanh_ref, swiglu_ref

_BLOCK = 1024


def _block(t: torch.Tensor) -> int:
    return _BLOCK if t.is_cuda else 65536  # the interpreter pays per operation: few, large programs
ACTIVATIONS = {"swiglu": 0, "geglu_tanh": 1}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        """fp32 activation value and derivative at g."""
        if ACT == 0:  # silu
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        else:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
            k0 = 0.7978845608028654  # sqrt(2 / pi)
            k1 = 0.044715
            t = 2.0 * tl.sigmoid(2.0 * k0 * (g + k1 * g * g * g)) - 1.0
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * g * g)
        return a, da

    @triton.jit
    def _gated_fwd_kernel(G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT)
        tl.store(Y + offs, (a * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd_kernel(DY, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        tl.store(DG + offs, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * a).to(DU.dtype.element_ty), mask=mask)


def gated_act_forward(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        blk = _block(gate)
        _gated_fwd_kernel[(triton.cdiv(n, blk),)](gate, up, y, n, ACT=ACTIVATIONS[act], BLOCK=blk, num_warps=4)
    return y


def gated_act_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str):
    dy = dy.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        blk = _block(gate)
        _gated_bwd_kernel[(triton.cdiv(n, blk),)](dy, gate, up, dg, du, n, ACT=ACTIVATIONS[act], BLOCK=blk,
                                                  num_warps=4)
    return dg, du


class GatedActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return gated_act_forward(gate, up, act)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = gated_act_backward(dy, gate, up, ctx.act)
        return dg, du, None


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str = "swiglu") -> torch.Tensor:
    """``act(gate) * up`` for act in {"swiglu", "geglu_tanh"}; gate and up of the same shape and dtype."""
    if act not in ACTIVATIONS:
        raise ValueError(f"gated_act: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gated_act: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must match")
    if not triton_ok(gate, up):
        return swiglu_ref(gate, up) if act == "swiglu" else geglu_tanh_ref(gate, up)
    return GatedActFunction.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused (see ``gated_act``)."""
    return gated_act(gate, up, "swiglu")


def geglu_tanh(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, fused (see ``gated_act``)."""
    return gated_act(gate, up, "geglu_tanh")
