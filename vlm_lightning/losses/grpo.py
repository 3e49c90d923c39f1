"""GRPO-family policy losses as pure tensor functions: GRPO, GSPO, DAPO, Dr.GRPO, BNPO.

The math follows TRL's ``GRPOTrainer._compute_loss`` (trl f2cd577, ``trl/trainer/grpo_trainer.py``
L2991-3150; advantages L2681-2730) so numbers can be compared line for line:

    A_i      = (r_i - mean_group(r)) / (std(r) + 1e-4)                 group_advantages
    log w    = logp - logp_old                   (B, T)   token level    importance_log_weights
             = sum_t M (logp - logp_old) / sum_t M  (B, 1) sequence level (GSPO, arXiv:2507.18071)
    c1       = exp(log w);  c2 = clamp(c1, 1 - eps, 1 + eps_high);  c1 = min(c1, delta) if delta
    loss_t   = -min(c1 A, c2 A) + beta * (exp(ref - logp) - (ref - logp) - 1)   (k3 KL)
    aggregate over the completion mask M: grpo | bnpo | dr_grpo | dapo        aggregate_loss

Nothing here knows about models or Lightning, so every line is unit-tested with hand-worked values
(``tests/losses/test_grpo.py``). Example:

    >>> cfg = GRPOLossConfig(num_generations=4, loss_type="dapo", epsilon_high=0.28, beta=0.04)
    >>> adv = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)          # (B,)
    >>> loss, metrics = clipped_policy_loss(logp, old_logp, adv, mask, cfg, ref_logp=ref_logp,
    ...                                     num_items_in_batch=global_active_tokens)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
ImportanceLevel = Literal["token", "sequence", "sequence_token"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

_SCALES = ("group", "batch", "none")
_LEVELS = ("token", "sequence", "sequence_token")
_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Options of the GRPO-family loss, validated when built (bad combinations raise ``ValueError``).

    Args:
        num_generations: completions sampled per prompt (the group size G). Must be >= 2 for training:
            a group of one has no baseline, so every advantage is 0 (or its std is NaN).
        loss_type: how per-token losses are reduced (see ``aggregate_loss``). TRL's default is "dapo".
        importance_sampling_level: "token" (GRPO), "sequence" (GSPO) or "sequence_token" (GSPO-token).
        scale_rewards: "group" (divide advantages by the group std), "batch" (by the batch std) or
            "none" (Dr.GRPO, arXiv:2503.20783).
        epsilon: lower clip, ratio >= 1 - epsilon. GSPO's paper uses 3e-4 (sequence ratios are
            near 1), GRPO/DAPO 0.2.
        epsilon_high: upper clip, ratio <= 1 + epsilon_high; defaults to ``epsilon``. DAPO's
            "clip-higher" (arXiv:2503.14476) uses 0.28; GSPO 4e-4.
        delta: optional cap on the unclipped ratio (two-sided clipping, INTELLECT-2 arXiv:2505.07291):
            bounds the loss of negative-advantage samples whose ratio has run away. Must exceed
            ``1 + epsilon_high``.
        beta: weight of the k3 KL to the reference policy (0 = no reference forward needed).
        max_completion_length: the fixed denominator of "dr_grpo" (B * max_completion_length); when
            None the padded completion width T of each batch is used.
        log_ratio_clip: |log w| and ``ref - logp`` (from above only) are clamped to this before ``exp`` so
            that a run-away ratio stays finite in fp32/bf16 (exp(20) = 4.9e8); beyond it the term has no
            gradient. A large negative ``ref - logp`` cannot overflow and keeps its exact k3 value and gradient.
    """

    num_generations: int = 8
    loss_type: LossType = "dapo"
    importance_sampling_level: ImportanceLevel = "token"
    scale_rewards: ScaleRewards = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    max_completion_length: int | None = None
    log_ratio_clip: float = 20.0

    def __post_init__(self) -> None:
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)
        if self.loss_type not in _LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: expected one of {_LOSS_TYPES}")
        if self.importance_sampling_level not in _LEVELS:
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}: expected one of {_LEVELS}")
        if self.scale_rewards not in _SCALES:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: expected one of {_SCALES}")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: GRPO needs at least 2 completions per prompt. "
                "The advantage is the reward minus the group mean, so a group of one always gets 0 "
                "(and its std is NaN): nothing would be learned.")
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"epsilon={self.epsilon}: must be in [0, 1) so that the lower clip 1 - epsilon stays > 0")
        if self.epsilon_high < 0.0:
            raise ValueError(f"epsilon_high={self.epsilon_high}: must be >= 0")
        if self.epsilon_high < self.epsilon:
            raise ValueError(
                f"epsilon_high={self.epsilon_high} < epsilon={self.epsilon}: the upper clip would be tighter "
                "than the lower one, which suppresses exactly the low-probability tokens that DAPO's "
                "clip-higher is meant to let grow. Use epsilon_high >= epsilon (DAPO: 0.2 / 0.28).")
        if self.delta is not None and self.delta <= 1.0 + self.epsilon_high:
            raise ValueError(
                f"delta={self.delta}: the two-sided cap must be above the upper clip bound "
                f"1 + epsilon_high = {1.0 + self.epsilon_high}; a lower cap would clip ratios that "
                "ordinary clipping keeps (INTELLECT-2 recommends delta > 1 + epsilon, e.g. 4).")
        if self.beta < 0.0:
            raise ValueError(f"beta={self.beta}: the KL weight must be >= 0")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length}: must be >= 1")
        if self.log_ratio_clip <= 0 or self.log_ratio_clip > 80:
            raise ValueError(f"log_ratio_clip={self.log_ratio_clip}: must be in (0, 80] (exp(88) overflows fp32)")
        if self.importance_sampling_level != "token" and self.loss_type != "grpo":
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r} with loss_type={self.loss_type!r} "
                "is refused: a sequence-level (GSPO) ratio is one number per completion, and "
                f"{self.loss_type!r} sums the per-token loss over tokens before normalising, so each "
                "completion's term gets weighted by its length |y_i| - the length bias GSPO removes "
                "(GSPO objective: mean over the group of min(s_i A_i, clip(s_i) A_i); trl#3823, TRL warns "
                "since PR #6042). Use loss_type='grpo' (per-sequence mean), which gives exactly GSPO.")


# ----------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------
def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std over non-NaN entries (NaN when fewer than 2 valid values), as TRL's ``nanstd``."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True) if dim is not None else valid.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    ssum = sq.sum(dim=dim, keepdim=True) if dim is not None else sq.sum()
    var = ssum / (count - 1).clamp(min=0)  # count 1 -> 0/0 = NaN, count 0 -> NaN
    var = torch.where(count >= 2, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    if dim is not None and not keepdim:
        std = std.squeeze(dim)
    return std


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, NaN-aware.

    Args:
        rewards: (B*G,) total reward per completion, grouped contiguously (rows ``g*G .. g*G+G-1`` share
            a prompt). NaN marks an unscorable completion (a reward function returned ``None``).
        num_generations: G, the group size (>= 2).
        scale_rewards: "group" -> (r - mean_g) / (std_g + eps); "batch" -> (r - mean_g) / (std_batch + eps);
            "none" -> r - mean_g (Dr.GRPO).
        eps: added to the std (TRL: 1e-4).

    Returns:
        (B*G,) float32 advantages. NaN rows get 0 and are left out of means and stds. A group whose
        valid rewards are all equal gets exactly 0 (computed in float64, then the zero-spread groups are
        forced to 0, so an fp32 std residue can never be blown up by the 1e-4 denominator).

    Example:
        >>> group_advantages(torch.tensor([1., 0., 0., 1.]), 4)   # mean .5, std sqrt(1/3)
        tensor([ 0.8659, -0.8659, -0.8659,  0.8659])
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if num_generations < 2:
        raise ValueError(f"num_generations={num_generations}: a group of one has no baseline (advantage "
                         "always 0, std NaN); sample at least 2 completions per prompt for training")
    n = rewards.numel()
    if n % num_generations:
        raise ValueError(f"{n} rewards is not a multiple of num_generations={num_generations}")
    if scale_rewards not in _SCALES:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {_SCALES}")
    r = rewards.detach().to(torch.float64).view(-1, num_generations)  # (B, G)
    nan = torch.isnan(r)
    if torch.isinf(r).any():
        raise ValueError(f"rewards contain inf at rows {torch.isinf(rewards).nonzero().flatten().tolist()}")
    all_nan = nan.all(dim=1, keepdim=True)
    mean = torch.nanmean(torch.where(all_nan, torch.zeros_like(r), r), dim=1, keepdim=True)  # (B, 1)
    adv = r - mean
    big, small = torch.finfo(r.dtype).max, torch.finfo(r.dtype).min
    spread = (torch.where(nan, small, r).amax(1, keepdim=True) - torch.where(nan, big, r).amin(1, keepdim=True))
    flat_group = (spread <= 0) | all_nan  # at most one distinct valid value
    if scale_rewards == "group":
        std = _nanstd(r, dim=1, keepdim=True)
        adv = adv / (std + eps)
    elif scale_rewards == "batch":
        std = _nanstd(r.flatten())
        if torch.isnan(std):  # fewer than 2 valid rewards in the whole batch
            std = torch.zeros_like(std)
        adv = adv / (std + eps)
    adv = torch.where(flat_group, torch.zeros_like(adv), adv)
    adv = torch.where(nan | torch.isnan(adv), torch.zeros_like(adv), adv)
    return adv.flatten().to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------
def mask_truncated_completions(completion_mask: torch.Tensor, is_truncated: torch.Tensor) -> torch.Tensor:
    """Zero the mask of completions that never emitted EOS (DAPO's overlong filtering).

    Args:
        completion_mask: (B, T) 0/1. is_truncated: (B,) bool.

    Returns:
        (B, T) same dtype; truncated rows all zero, so they add nothing to the loss or its denominator.
    """
    return completion_mask * (~is_truncated.bool()).unsqueeze(1).to(completion_mask.dtype)


# ----------------------------------------------------------------------------------------------------------
# Ratios, KL
# ----------------------------------------------------------------------------------------------------------
def importance_log_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                           level: ImportanceLevel = "token", clip: float = 20.0) -> torch.Tensor:
    """Log importance weight log w of the current policy against the sampling policy.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the policy being optimised (requires grad).
        old_logp: (B, T) the same under the policy that sampled (detached; equal to ``logp.detach()``
            when ``num_iterations == 1``).
        mask: (B, T) 0/1 completion mask; padding is excluded from the sequence mean.
        level: "token" -> (B, T) ``logp - old_logp`` (GRPO).
            "sequence" -> (B, 1) ``sum_t M (logp - old) / sum_t M``, i.e. s_i = (pi(y|x) / pi_old(y|x))^(1/|y|)
            (GSPO eq. 7); its gradient reaches every token as s_i / |y_i| * grad logp_t (GSPO eq. 10).
            "sequence_token" -> (B, T) ``logp - sg(logp) + sg(seq)``: the value of s_i on every token
            with a per-token gradient path (GSPO-token, eq. 13), for token-level advantages.
        clip: the result is clamped to [-clip, clip] (``sg(seq)`` for "sequence_token") so exp stays finite.

    Returns:
        float32 (B, T) or (B, 1).
    """
    log_ratio = logp.float() - old_logp.float()  # (B, T)
    if level == "token":
        return log_ratio.clamp(-clip, clip)
    m = mask.to(log_ratio.dtype)
    seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
    if level == "sequence":
        return seq.clamp(-clip, clip)
    if level == "sequence_token":
        lp = logp.float()
        return lp - lp.detach() + seq.detach().clamp(-clip, clip)
    raise ValueError(f"level={level!r}: expected one of {_LEVELS}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clip: float = 20.0) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0.

    Args:
        logp, ref_logp: (B, T). ``ref - logp`` is clamped to at most ``clip`` so ``exp`` cannot overflow;
            below the reference (negative differences) the value and gradient are exact.

    Returns:
        (B, T) float32; exactly 0 where ``logp == ref_logp``.
    """
    d = (ref_logp.float() - logp.float()).clamp(max=clip)
    return torch.exp(d) - d - 1.0


# ----------------------------------------------------------------------------------------------------------
# Aggregation and the full loss
# ----------------------------------------------------------------------------------------------------------
def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType,
                   max_completion_length: int | None = None, num_items_in_batch: float | torch.Tensor | None = None,
                   grad_accum_steps: int = 1, world_size: int = 1, batch_rows: int | None = None,
                   batch_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a masked (B, T) per-token loss to a scalar, as TRL does per loss type.

    With A = accumulation steps (``grad_accum_steps``) and M the mask:
      - "grpo":    mean_i[sum_t l M / sum_t M] / A       (each completion weighs the same)
      - "bnpo":    sum l M / sum M (this micro-batch) / A (each token of the micro-batch weighs the same)
      - "dr_grpo": sum l M / (B * max_completion_length) / A  (a constant, length-unbiased, Dr.GRPO)
      - "dapo":    sum l M / (num_items_in_batch / world_size), where ``num_items_in_batch`` is the active
        token count over all micro-batches of the optimizer step and all ranks; summing the micro-batch
        losses and averaging gradients over ranks then gives sum / global count. When it is None the
        local count ``sum M * grad_accum_steps`` is used (exact for one micro-batch on one rank).

    With uneven micro-batches (``max_tokens_per_micro_batch``) "B * A" and "sum M * A" are not the step's counts;
    give the step's own instead and the micro-batch losses (and gradients) sum to exactly the loss of the whole
    step as one batch, however it is split: ``batch_rows`` (rows of the optimizer step on this rank) replaces
    ``B * A`` in "grpo" (sum_i[...] / batch_rows) and "dr_grpo" (sum l M / (batch_rows * max_completion_length));
    ``batch_tokens`` (its active tokens on this rank) replaces ``sum M * A`` in "bnpo". ("bnpo" is then the
    step's token mean, where TRL's is each micro-batch's: the same for one micro-batch.)

    Args:
        per_token_loss: (B, T) or (B, 1) (broadcast over T). mask: (B, T) 0/1.

    Returns:
        () scalar. A batch whose mask is all zero gives 0 (with a zero gradient), never NaN.
    """
    m = mask.to(torch.float32)
    lm = per_token_loss.float() * m  # (B, T)
    rows = batch_rows if batch_rows is not None else mask.shape[0] * grad_accum_steps
    if loss_type == "grpo":
        return (lm.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / rows
    if loss_type == "bnpo":
        if batch_tokens is None:
            return lm.sum() / m.sum().clamp(min=1.0) / grad_accum_steps
        return lm.sum() / torch.as_tensor(batch_tokens, dtype=torch.float32, device=lm.device).clamp(min=1.0)
    if loss_type == "dr_grpo":
        width = max_completion_length if max_completion_length is not None else mask.shape[-1]
        return lm.sum() / (rows * width)
    if loss_type == "dapo":
        if num_items_in_batch is None:
            denom = m.sum() * grad_accum_steps
        else:
            denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=lm.device) / world_size
        return lm.sum() / denom.clamp(min=1.0)
    raise ValueError(f"loss_type={loss_type!r}: expected one of {_LOSS_TYPES}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return (x.float().expand_as(m) * m).sum() / m.sum().clamp(min=1.0)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                        mask: torch.Tensor, config: GRPOLossConfig, ref_logp: torch.Tensor | None = None,
                        num_items_in_batch: float | torch.Tensor | None = None, grad_accum_steps: int = 1,
                        world_size: int = 1, batch_rows: int | None = None,
                        batch_tokens: float | torch.Tensor | None = None,
                        token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate + k3 KL, aggregated per ``config.loss_type``.

    Args:
        logp: (B, T) token log-probs of the completions under the current policy (requires grad).
        old_logp: (B, T) under the sampling policy, or None for ``logp.detach()`` (num_iterations == 1).
        advantages: (B,) or (B, 1) per completion, or (B, T) per token.
        mask: (B, T) 0/1 completion mask (apply ``mask_truncated_completions`` before, if wanted).
        config: a validated ``GRPOLossConfig``.
        ref_logp: (B, T) reference-policy log-probs; required when ``config.beta > 0``.
        num_items_in_batch, grad_accum_steps, world_size, batch_rows, batch_tokens: the normalisers of
            ``aggregate_loss``.
        token_weights: (B, T) detached per-token weights multiplied into the clipped policy term (not the KL),
            e.g. the rollout correction of ``losses.rollout_correction.rollout_correction_weights``; None: 1.

    Returns:
        (loss () scalar, metrics dict of detached scalars): ``kl`` (masked mean k3, only if beta > 0),
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (fraction of active
        tokens where the clip bound is the active term: ratio < 1-eps with A < 0, ratio > 1+eps_high with
        A > 0), ``ratio_mean`` (masked mean importance ratio).
    """
    if logp.dim() != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    if old_logp is None:
        old_logp = logp.detach()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # (B, 1)
    if config.beta > 0 and ref_logp is None:
        raise ValueError(f"beta={config.beta} > 0 needs ref_logp (the reference policy's token log-probs)")

    log_w = importance_log_weights(logp, old_logp, mask, config.importance_sampling_level, config.log_ratio_clip)
    coef_1 = torch.exp(log_w)  # (B, T) or (B, 1)
    coef_2 = coef_1.clamp(1.0 - config.epsilon, 1.0 + config.epsilon_high)
    if config.delta is not None:
        coef_1 = coef_1.clamp(max=config.delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # (B, T) or (B, 1)
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights.detach().float()  # (B, T)
    metrics: dict[str, torch.Tensor] = {}
    if config.beta > 0:
        kl = k3_kl(logp, ref_logp, config.log_ratio_clip)  # (B, T)
        per_token_loss = per_token_loss + config.beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    loss = aggregate_loss(per_token_loss, mask, config.loss_type, config.max_completion_length,
                          num_items_in_batch, grad_accum_steps, world_size, batch_rows, batch_tokens)
    with torch.no_grad():
        c1 = coef_1.detach()
        low = ((c1 < 1.0 - config.epsilon) & (adv < 0)).float()
        high = ((c1 > 1.0 + config.epsilon_high) & (adv > 0)).float()
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, high), mask)
        metrics["ratio_mean"] = _masked_mean(c1, mask)
    return loss, metrics


__all__ = [
    "GRPOLossConfig", "group_advantages", "mask_truncated_completions", "importance_log_weights", "k3_kl",
    "aggregate_loss", "clipped_policy_loss",
]
