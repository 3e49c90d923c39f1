"""Fused linear token log-probs (and entropy) for RL: log softmax(h @ W.T / T)[token] without logits.

The hot path of GRPO/GSPO: per-token log-probabilities of the sampled tokens under the policy, from the
last hidden states and the lm_head weight. Forward: chunks of C rows, logits = h_c @ W.T into one reused
(C, V) buffer, Triton kernels (``_vocab``) reduce to log p(token), entropy and logsumexp.
Backward (the upstream gradients are per-token, so they are unknown in the forward): recompute each
chunk's logits, let the kernels overwrite them with dL/dlogits = g_lp * (onehot - p) / T
+ g_ent * (-p (z - E[z])) / T, then grad_h = dlogits @ W and (if the weight requires grad)
grad_W += dlogits.T @ h_c. Memory: one (C, V) buffer; never (N, V).

Example:
    >>> logp = fused_linear_token_logprobs(h.view(-1, H), lm_head.weight, completion_ids.view(-1),
    ...                                    temperature=0.9)                    # (N,) fp32
    >>> logp, ent = fused_linear_token_logprobs(h2, w, ids, return_entropy=True)
"""
from __future__ import annotations

import torch

from ._vocab import default_chunk_rows, vocab_chunk


def _chunks(n: int, v: int, hidden: torch.Tensor, chunk_rows: int | None):
    c = chunk_rows or default_chunk_rows(v, hidden.element_size())
    c = max(1, min(c, n))
    return c, [(s, min(s + c, n)) for s in range(0, n, c)]


def logprobs_forward(hidden, weight, tokens, inv_temp, softcap, entropy, chunk_rows=None):
    """Launcher (no grad). Returns (logp (N,), entropy (N,) or None), fp32."""
    n, v = hidden.shape[0], weight.shape[0]
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if entropy else None
    if n == 0:
        return lp, ent
    c, spans = _chunks(n, v, hidden, chunk_rows)
    buf = torch.empty((c, v), dtype=hidden.dtype, device=hidden.device)
    for s, e in spans:
        z = buf[: e - s]
        torch.mm(hidden[s:e], w.t(), out=z)
        lp_c, ent_c, _ = vocab_chunk(z, tokens[s:e], inv_temp=inv_temp, softcap=softcap, entropy=entropy)
        lp[s:e] = lp_c
        if entropy:
            ent[s:e] = ent_c
    return lp, ent


def logprobs_backward(hidden, weight, tokens, inv_temp, softcap, g_lp, g_ent, need_h, need_w, chunk_rows=None):
    """Launcher. g_lp, g_ent: (N,) upstream gradients or None. Returns (grad_h, grad_w)."""
    n, v = hidden.shape[0], weight.shape[0]
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    if n == 0:
        if grad_h is not None:
            grad_h.zero_()
        return grad_h, grad_w
    if g_lp is None:
        g_lp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    g_lp = g_lp.float().contiguous()
    g_ent = None if g_ent is None else g_ent.float().contiguous()
    c, spans = _chunks(n, v, hidden, chunk_rows)
    buf = torch.empty((c, v), dtype=hidden.dtype, device=hidden.device)
    for s, e in spans:
        z = buf[: e - s]
        h_c = hidden[s:e]
        torch.mm(h_c, w.t(), out=z)
        vocab_chunk(z, tokens[s:e], inv_temp=inv_temp, softcap=softcap, entropy=g_ent is not None,
                    write_grad=True, coef_lp=g_lp[s:e], coef_ent=None if g_ent is None else g_ent[s:e])
        if need_h:
            torch.mm(z, w, out=grad_h[s:e])
        if need_w:
            grad_w.addmm_(z.t().to(grad_w.dtype), h_c.to(grad_w.dtype))
    return grad_h, grad_w


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, inv_temp, softcap, return_entropy, chunk_rows):
        lp, ent = logprobs_forward(hidden, weight, tokens, inv_temp, softcap, return_entropy, chunk_rows)
        ctx.save_for_backward(hidden, weight, tokens)
        ctx.inv_temp, ctx.softcap, ctx.chunk_rows, ctx.return_entropy = inv_temp, softcap, chunk_rows, return_entropy
        if return_entropy:
            return lp, ent
        return lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, tokens = ctx.saved_tensors
        grad_h, grad_w = logprobs_backward(hidden, weight, tokens, ctx.inv_temp, ctx.softcap, g_lp,
                                           g_ent if ctx.return_entropy else None, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[1], ctx.chunk_rows)
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                                temperature: float = 1.0, return_entropy: bool = False,
                                softcap: float | None = None, chunk_rows: int | None = None):
    """log softmax(hidden @ weight.T / temperature)[tokens] per row, without materialising the logits.

    hidden: (N, H) (or (..., H)), weight: (V, H), tokens: (N,) (or hidden's leading shape). Tokens
    outside [0, V) (e.g. -100 padding) give 0. Returns fp32 log-probs shaped like tokens, and with
    ``return_entropy`` also the entropy of the tempered distribution. Differentiable w.r.t. hidden and,
    when it requires grad, weight.

    Example:
        >>> logp = fused_linear_token_logprobs(hidden[:, :-1], lm_head.weight, input_ids[:, 1:], temperature=0.7)
    """
    if temperature <= 0:
        raise ValueError(f"fused_linear_token_logprobs: temperature must be > 0, got {temperature}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fused_linear_token_logprobs: hidden size {hidden.shape[-1]} != weight {tuple(weight.shape)}")
    out_shape = tokens.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if not h2.is_contiguous():
        h2 = h2.contiguous()
    t = tokens.reshape(-1).to(torch.int64)
    if t.numel() != h2.shape[0]:
        raise ValueError(f"fused_linear_token_logprobs: {h2.shape[0]} hidden rows but {t.numel()} tokens")
    out = FusedLinearTokenLogprobsFunction.apply(h2, weight, t, 1.0 / float(temperature), softcap,
                                                 return_entropy, chunk_rows)
    if return_entropy:
        return out[0].view(out_shape), out[1].view(out_shape)
    return out.view(out_shape)
