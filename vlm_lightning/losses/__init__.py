"""Pure loss functions: SFT token loss and the GRPO family (GRPO, GSPO, DAPO, Dr.GRPO, BNPO)."""
from .grpo import (
    GRPOLossConfig,
    aggregate_loss,
    clipped_policy_loss,
    completion_mask_from_ids,
    count_active_tokens,
    group_advantages,
    importance_log_weights,
    importance_ratio,
    k3_kl,
    mask_truncated_completions,
    selective_log_softmax,
)
from .sft import masked_token_loss

__all__ = [
    "GRPOLossConfig", "aggregate_loss", "clipped_policy_loss", "completion_mask_from_ids", "count_active_tokens",
    "group_advantages", "importance_log_weights", "importance_ratio", "k3_kl", "mask_truncated_completions",
    "selective_log_softmax", "masked_token_loss",
]
