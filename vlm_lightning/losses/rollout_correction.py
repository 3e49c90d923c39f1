"""Rollout correction: importance weights between the engine that sampled and the trainer, as pure functions.

The fast engine samples with LoRA merged into bf16 weights, a static KV cache and its own attention, so its
token probabilities differ slightly from the trainer's forward of the same policy (pi_rollout != pi_old). The
policy gradient assumes the samples came from pi_old; the per-token ratio rho_t = pi_old(y_t) / pi_rollout(y_t)
corrects that, with its variance bounded by a cap C:

    log rho = logp_old - logp_rollout                 (B, T)  token level
    TIS     w = min(rho, C)                           truncated importance sampling (Yao et al. 2025,
                                                      "Your efficient RL framework secretly brings you off-policy RL")
    MIS     w = rho * 1[rho <= C]                     masked importance sampling (tokens above the cap get
                                                      weight 0: dropped from the loss, as verl / ms-swift "token_mask")

``w`` is detached and multiplies the clipped policy term of each token (``clipped_policy_loss(token_weights=w)``),
as TRL's ``vllm_importance_sampling_correction`` does; the KL term is left as it is and the loss denominators
(active-token / row counts) do not change, so micro-batching stays exact. Diagnostics
(``rollout_mismatch_metrics``): the k3 estimate of KL(pi_rollout || pi_old) from the sampled tokens, the
ratio's mean / min / max and the fraction of tokens clipped (TIS) or masked (MIS). Left out: sequence-level
and geometric-mean variants, rejection of whole sequences.

Example:
    >>> w = rollout_correction_weights(old_logp, rollout_logp, mask, "tis", cap=2.0)            # (B, T)
    >>> loss, m = clipped_policy_loss(logp, old_logp, adv, mask, cfg, token_weights=w)
    >>> rollout_mismatch_metrics(old_logp, rollout_logp, mask, "tis", cap=2.0)["rollout_correction/kl"]
"""
from __future__ import annotations

from typing import Literal

import torch

from .grpo import k3_kl

RolloutCorrection = Literal["tis", "mis"]
_MODES = ("tis", "mis")


def _ratio(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, clip: float) -> torch.Tensor:
    return torch.exp((trainer_logp.detach().float() - rollout_logp.float()).clamp(-clip, clip))  # (B, T)


def rollout_correction_weights(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                               mode: RolloutCorrection, cap: float = 2.0, clip: float = 20.0) -> torch.Tensor:
    """Per-token importance weights that correct for the sampling engine's numerics (detached).

    Args:
        trainer_logp: (B, T) log-probs of the sampled tokens under the trainer's policy that "sampled" them
            (the old policy: ``logp.detach()`` of the first pass when ``num_iterations == 1``).
        rollout_logp: (B, T) the engine's own log-probs of the same tokens (``Rollout.sampling_logprobs``).
        mask: (B, T) 0/1 completion mask; the weights are 0 outside it.
        mode: "tis" -> min(rho, cap); "mis" -> rho where rho <= cap, else 0.
        cap: C > 0, the truncation / masking threshold on rho = exp(trainer - rollout).
        clip: |log rho| is clamped to this before ``exp`` (finite in fp32).

    Returns:
        (B, T) float32, no gradient.
    """
    if mode not in _MODES:
        raise ValueError(f"rollout_correction={mode!r}: expected one of {_MODES} or None")
    if cap <= 0:
        raise ValueError(f"rollout_correction_cap={cap}: must be > 0")
    if trainer_logp.shape != rollout_logp.shape or mask.shape != trainer_logp.shape:
        raise ValueError(f"trainer_logp {tuple(trainer_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and "
                         f"mask {tuple(mask.shape)} must all be (B, T)")
    rho = _ratio(trainer_logp, rollout_logp, clip)
    w = rho.clamp(max=cap) if mode == "tis" else torch.where(rho <= cap, rho, torch.zeros_like(rho))
    return w * mask.to(w.dtype)


def rollout_mismatch_metrics(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                             mode: RolloutCorrection | None = None, cap: float = 2.0,
                             clip: float = 20.0) -> dict[str, torch.Tensor]:
    """How far the engine's sampling distribution is from the trainer's, over the active tokens.

    Args:
        trainer_logp, rollout_logp, mask: (B, T) as ``rollout_correction_weights``.
        mode, cap: which fraction to report: "tis" -> ``clipped_frac`` (rho > cap), "mis" -> ``masked_frac``
            (rho > cap); None -> both are left out.

    Returns:
        detached () scalars: ``rollout_correction/kl`` (mean k3 estimate of KL(pi_rollout || pi_trainer):
        rho - 1 - log rho, >= 0, exactly 0 when the engines agree), ``rollout_correction/ratio_mean``,
        ``ratio_min``, ``ratio_max`` and the clipped / masked fraction. NaN when no token is active.
    """
    m = mask.bool()
    rho = _ratio(trainer_logp, rollout_logp, clip)[m]  # (n_active,)
    if rho.numel() == 0:
        nan = torch.tensor(float("nan"))
        return {f"rollout_correction/{k}": nan for k in ("kl", "ratio_mean", "ratio_min", "ratio_max")}
    kl = k3_kl(rollout_logp.float()[m], trainer_logp.detach().float()[m], clip)  # k3 with ref = trainer
    out = {"rollout_correction/kl": kl.mean(), "rollout_correction/ratio_mean": rho.mean(),
           "rollout_correction/ratio_min": rho.min(), "rollout_correction/ratio_max": rho.max()}
    if mode is not None:
        name = "clipped_frac" if mode == "tis" else "masked_frac"
        out[f"rollout_correction/{name}"] = (rho > cap).float().mean()
    return {k: v.detach() for k, v in out.items()}


__all__ = ["RolloutCorrection", "rollout_correction_weights", "rollout_mismatch_metrics"]
