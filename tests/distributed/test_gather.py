"""The rank-zero helper and the single-process paths of gathering (the sharded paths run in test_fsdp.py)."""
from __future__ import annotations

import types

import pytest
import torch

from vlm_lightning.distributed.gather import all_gather_objects, clean_parameter_name, on_rank_zero


class _Strategy:
    def __init__(self, rank: int):
        self.global_rank = rank
        self.barriers: list[str] = []

    def barrier(self, name: str) -> None:
        self.barriers.append(name)


def test_on_rank_zero_runs_there_and_every_rank_meets_at_the_barrier():
    calls = []
    zero, one = _Strategy(0), _Strategy(1)
    assert on_rank_zero(types.SimpleNamespace(strategy=zero), lambda: calls.append(0) or "done", "b") == "done"
    assert on_rank_zero(types.SimpleNamespace(strategy=one), lambda: calls.append(1) or "done", "b") is None
    assert calls == [0] and zero.barriers == one.barriers == ["b"]


def test_on_rank_zero_raises_its_error_after_the_barrier():
    strategy = _Strategy(0)

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        on_rank_zero(strategy, broken, "vlm_lightning.merge_lora")
    assert strategy.barriers == ["vlm_lightning.merge_lora"]  # the other ranks were released first


def test_clean_parameter_name_and_gathering_without_a_process_group():
    name = "base_model._fsdp_wrapped_module.model._checkpoint_wrapped_module.layers.0.q_proj.lora_A.default.weight"
    assert clean_parameter_name(name) == "base_model.model.layers.0.q_proj.lora_A.default.weight"
    assert all_gather_objects(types.SimpleNamespace(world_size=1), [{"row_index": 3}]) == [{"row_index": 3}]
    assert not torch.distributed.is_initialized()
