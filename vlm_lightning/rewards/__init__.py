"""Reward callables with TRL's signature ``(prompts, completions, **columns) -> list[float | None]``."""
from .base import (
    RewardError,
    RewardSet,
    completion_text,
    compute_rewards,
    extract_tag,
    reward_name,
)
from .builtin import (
    CharF1Reward,
    ExactMatchReward,
    FormatReward,
    LengthPenalty,
    NumericAnswerReward,
    OCRReward,
    parse_number,
)

__all__ = [
    "RewardError", "RewardSet", "completion_text", "compute_rewards", "extract_tag", "reward_name",
    "CharF1Reward", "ExactMatchReward", "FormatReward", "LengthPenalty", "NumericAnswerReward", "OCRReward",
    "parse_number",
]
