"""Torch references for every fused kernel: the tests and the benchmarks share these.

Each reference is written the way Hugging Face writes the op (same casts, same layout), so a kernel that
matches its reference matches the unpatched model. They materialise everything (full logits included),
so use them on small shapes only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------- norms
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
                 casting: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., H), weight: (H,).

    casting="llama" (Qwen, Llama, Mistral): ``weight * (x_fp32 * rstd).to(x.dtype)``.
    casting="gemma" (Gemma 3, offset=1.0): ``(x_fp32 * rstd * (offset + weight_fp32)).to(x.dtype)``.
    """
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (xhat * (offset + weight.float())).to(x.dtype)
    if offset:
        return (offset + weight) * xhat.to(x.dtype)
    return weight * xhat.to(x.dtype)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 statistics, output in x.dtype. x: (..., H)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------ rope
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``apply_rotary_pos_emb``. q: (B, Hq, T, D), k: (B, Hk, T, D), cos/sin: (B or 1, T, D)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_cos_sin_ref(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section=None,
                     attention_scaling: float = 1.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, D) as HF's rotary embeddings build them.

    position_ids: (B, T) for 1-D RoPE, or (3, B, T) (temporal, height, width) for Qwen2-VL M-RoPE with
    ``mrope_section`` (e.g. [16, 24, 24], summing to D/2): frequency j takes the position of the section it
    falls in (Qwen2VLRotaryEmbedding.recomposition_frequencies).
    """
    if position_ids.dim() == 2:
        position_ids = position_ids[None]
    ft = torch.float64 if inv_freq.dtype == torch.float64 else torch.float32  # fp64 for accuracy references
    freqs = position_ids[..., None].to(ft) * inv_freq.to(ft)  # (P, B, T, D/2)
    if mrope_section is not None and position_ids.shape[0] > 1:
        freqs = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1)
    else:
        freqs = freqs[0]
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


# ---------------------------------------------------------------------------------------- gated MLP
def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and rounded once to the input dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu_tanh_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up (Gemma's ``gelu_pytorch_tanh``), fp32 then rounded once."""
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


# ------------------------------------------------------------------------------------- linear + loss
def _logits(hidden, weight, softcap):
    z = hidden.float() @ weight.float().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100, reduction: str = "mean",
                             num_items_in_batch=None, softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` (materialised, fp32). hidden (N, H), weight (V, H), labels (N,).

    mean: sum over valid tokens / (num_items_in_batch or number of valid tokens); a batch with no valid
    token gives 0 (HF gives NaN there). sum: plain sum.
    """
    z = _logits(hidden, weight, softcap)
    loss = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss
    denom = num_items_in_batch if num_items_in_batch is not None else (labels != ignore_index).sum()
    denom = torch.as_tensor(denom, dtype=torch.float32, device=loss.device).clamp_min(1)
    return loss / denom


def linear_token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                              temperature: float = 1.0, return_entropy: bool = False,
                              softcap: float | None = None):
    """log softmax(hidden @ weight.T / temperature)[token] per row, fp32 (N,); optionally entropy (N,).

    Tokens outside [0, V) (padding such as -100) get log-prob 0.
    """
    z = _logits(hidden, weight, softcap) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = (tokens >= 0) & (tokens < weight.shape[0])
    lp = logp_all.gather(-1, tokens.clamp(0, weight.shape[0] - 1)[:, None])[:, 0]
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    if not return_entropy:
        return lp
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent
