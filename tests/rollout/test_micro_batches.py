"""plan_tile_micro_batches (vlm_lightning.rollout.batch): consecutive whole tiles under a token and a tile cap."""
from __future__ import annotations

import pytest

from vlm_lightning.rollout.batch import plan_tile_micro_batches


def test_token_budget_packs_consecutive_tiles():
    # 300 + 300 + 100 = 700 fits in 700; 500 starts the next
    assert plan_tile_micro_batches([300, 300, 100, 500], max_tokens=700) == [(0, 3), (3, 4)]
    assert plan_tile_micro_batches([300, 300, 100, 500], max_tokens=699) == [(0, 2), (2, 4)]


def test_a_tile_over_budget_is_its_own_micro_batch():
    assert plan_tile_micro_batches([800, 10, 10], max_tokens=700) == [(0, 1), (1, 3)]


def test_tile_cap_and_no_caps():
    assert plan_tile_micro_batches([1] * 5, max_tiles=2) == [(0, 2), (2, 4), (4, 5)]
    assert plan_tile_micro_batches([1] * 5) == [(0, 5)]
    assert plan_tile_micro_batches([5, 5, 5], max_tokens=100, max_tiles=1) == [(0, 1), (1, 2), (2, 3)]


def test_bad_budget_raises():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        plan_tile_micro_batches([1], max_tokens=0)
