"""Pure loss functions: SFT token loss and the GRPO family (GRPO, GSPO, DAPO, Dr.GRPO, BNPO)."""
from .grpo import (
    GRPOLossConfig,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    importance_log_weights,
    k3_kl,
    mask_truncated_completions,
)
from .sft import masked_token_loss

__all__ = [
    "GRPOLossConfig", "aggregate_loss", "clipped_policy_loss", "group_advantages", "importance_log_weights",
    "k3_kl", "mask_truncated_completions", "masked_token_loss",
]
