"""Fused linear cross-entropy: loss straight from hidden states and the lm_head weight.

Design (Liger's FLCE shape, plus skipping ignored tokens):
  1. keep only the rows whose label is not ``ignore_index`` (no GEMM work for prompt / image / pad
     tokens: 30-70% of an SFT batch);
  2. for chunks of C rows: logits = h_c @ W.T into one reused (C, V) buffer (cuBLAS), then the Triton
     kernels of ``_vocab`` write per-row loss and overwrite the buffer with dloss/dlogits (already
     divided by the global denominator);
  3. still in the forward: grad_h_c = dlogits @ W and, only if the weight requires grad,
     grad_W += dlogits.T @ h_c. Backward only scales the saved gradients by the upstream scalar.
The full (N, V) logits never exist: extra memory is one (C, V) buffer plus grad_hidden (N, H).

Mean reduction divides by ``num_items_in_batch`` when given (the number of valid tokens over all
micro-batches of one optimizer step, as HF's Trainer passes it) so gradient accumulation gives the
same gradient as one big batch; otherwise by the number of valid tokens here. No valid token: loss 0.

Example:
    >>> loss = fused_linear_cross_entropy(h.view(-1, H), lm_head.weight, labels.view(-1))
    >>> loss.backward()
"""
from __future__ import annotations

import torch

from ._vocab import default_chunk_rows, vocab_chunk


def _valid_rows(labels: torch.Tensor, ignore_index: int, vocab: int):
    """Indices (n_valid,) of rows to score, or None when all rows are valid. One host sync."""
    keep = labels != ignore_index
    idx = keep.nonzero().squeeze(1)
    if idx.numel():
        lo, hi = torch.aminmax(labels.index_select(0, idx))
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"fused_linear_cross_entropy: label {bad} is outside the vocabulary [0, {vocab}) "
                             f"and is not ignore_index={ignore_index}")
    return None if idx.numel() == labels.numel() else idx


def flce_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 reduction: str, num_items_in_batch, softcap: float | None, need_h: bool, need_w: bool,
                 chunk_rows: int | None = None):
    """Launcher. hidden (N, H), weight (V, H), labels (N,). Returns (loss fp32 0-dim, grad_h, grad_w)."""
    n, h = hidden.shape
    v = weight.shape[0]
    labels = labels.to(torch.int64)
    idx = _valid_rows(labels, ignore_index, v)
    n_valid = n if idx is None else idx.numel()
    if reduction == "sum":
        denom = 1.0
    elif num_items_in_batch is not None:
        denom = float(num_items_in_batch)
    else:
        denom = float(max(n_valid, 1))
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    need_grad = need_h or need_w
    c = chunk_rows or default_chunk_rows(v, hidden.element_size())
    c = max(1, min(c, n_valid))
    buf = torch.empty((c, v), dtype=hidden.dtype, device=hidden.device) if n_valid else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, n_valid, c):
        e = min(s + c, n_valid)
        rows = None if idx is None else idx[s:e]
        h_c = hidden[s:e] if rows is None else hidden.index_select(0, rows)
        y_c = labels[s:e] if rows is None else labels.index_select(0, rows)
        z = buf[: e - s]
        torch.mm(h_c, w.t(), out=z)  # (C, V) logits
        lp, _, _ = vocab_chunk(z, y_c, softcap=softcap, write_grad=need_grad, coef_lp=-1.0 / denom)
        total -= lp.sum()
        if need_h:
            if rows is None:
                torch.mm(z, w, out=grad_h[s:e])
            else:
                grad_h.index_copy_(0, rows, z @ w)
        if need_w:
            grad_w.addmm_(z.t().to(grad_w.dtype), h_c.to(grad_w.dtype))
    return total / denom, grad_h, grad_w


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, num_items_in_batch, softcap, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = flce_forward(hidden, weight, labels, ignore_index, reduction,
                                            num_items_in_batch, softcap, need_h, need_w, chunk_rows)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else grad_w * grad_out.to(grad_w.dtype)
        return gh, gw, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
                               softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against labels without materialising the logits.

    hidden: (N, H) (or (..., H), flattened), weight: (V, H), labels: (N,) int with ``ignore_index``.
    reduction: "mean" (sum / (num_items_in_batch or valid tokens)) or "sum". softcap: Gemma's
    final-logit softcapping, logits -> softcap * tanh(logits / softcap). Returns an fp32 scalar.
    The lm_head gradient is computed only when ``weight.requires_grad``.

    Example:
        >>> loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, shift_labels,
        ...                                   num_items_in_batch=n_tokens_in_step)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden size {hidden.shape[-1]} != weight {tuple(weight.shape)}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if y.numel() != h2.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: {h2.shape[0]} hidden rows but {y.numel()} labels")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = float(num_items_in_batch)
    return FusedLinearCrossEntropyFunction.apply(h2, weight, y, ignore_index, reduction, num_items_in_batch,
                                                 softcap, chunk_rows)
