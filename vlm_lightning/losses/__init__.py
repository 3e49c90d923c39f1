"""Pure loss functions: SFT token loss, the GRPO family (GRPO, GSPO, DAPO, Dr.GRPO, BNPO), rollout correction."""
from .grpo import (
    GRPOLossConfig,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    importance_log_weights,
    k3_kl,
    mask_truncated_completions,
)
from .rollout_correction import rollout_correction_weights, rollout_mismatch_metrics
from .sft import masked_token_loss

__all__ = [
    "GRPOLossConfig", "aggregate_loss", "clipped_policy_loss", "group_advantages", "importance_log_weights",
    "k3_kl", "mask_truncated_completions", "masked_token_loss", "rollout_correction_weights",
    "rollout_mismatch_metrics",
]
