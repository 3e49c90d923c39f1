"""DDP on the CPU (gloo, 2 processes) for VisionSFTModule and VisionGRPOModule.

The 2-process runs train LoRA on the language *and* vision layers while rank 1 only ever sees text rows:
the vision tower sits out on rank 1, which without ``find_unused_parameters`` makes DDP hang
(reliability note 14). ``VisionDDPStrategy`` switches it on because the vision tower trains; the tests
assert that nothing hangs, that every LoRA parameter has a non-zero gradient on every rank at the last
step (after the all-reduce, identical on both ranks), and that both ranks end with identical, updated
weights. The SFT run also has (non-reentrant) gradient checkpointing on, the module's default.
Each run takes ~15 s of CPU on 2 cores. The strategy's single-process behaviour is in test_strategies.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import load_ranks, run_worker


def _assert_ddp_invariants(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r0["had_images"]) and not any(r1["had_images"]), "rank 1 must see text-only batches"
    assert r0["find_unused_parameters"] is True and r1["find_unused_parameters"] is True
    names = sorted(r0["grad_norms"][-1])
    assert any(".visual." in n for n in names) and any(".language_model." in n for n in names)
    assert all("lora_" in n for n in names), [n for n in names if "lora_" not in n]
    for rank in ranks:  # lora_A has a zero gradient while lora_B is still 0: look at the last step
        last = rank["grad_norms"][-1]
        dead = [n for n in names if not last[n]]
        assert not dead, f"rank {rank['rank']}: no gradient for {dead[:5]} (of {len(dead)})"
    for n in names:  # the all-reduce gives both ranks the same gradient
        assert r0["grad_norms"][-1][n] == pytest.approx(r1["grad_norms"][-1][n], rel=1e-5)
    assert sorted(r0["weights"]) == names
    for n in names:
        assert torch.equal(r0["weights"][n], r1["weights"][n]), f"ranks differ in {n}"
    moved = [n for n in names if not torch.equal(r0["weights"][n], r0["initial"][n])]
    assert len(moved) == len(names), f"weights that never moved: {sorted(set(names) - set(moved))[:5]}"


def test_ddp_sft_text_only_rank_trains_vision_lora(tmp_path, tiny_vlm_dir):
    run_worker(tmp_path, tiny_vlm_dir("qwen2_vl"), "--module", "sft", "--strategy", "ddp", "--steps", "3",
               "--text-only-rank", "1", "--finetune-vision", "--gradient-checkpointing")
    ranks = load_ranks(tmp_path)
    _assert_ddp_invariants(ranks)
    # the token-weighted loss is reduced over ranks: both ranks log their own micro-batch mean
    assert all("train/loss" in r["metrics"] for r in ranks)


def test_ddp_grpo_text_only_rank_trains_vision_lora(tmp_path, tiny_vlm_dir):
    run_worker(tmp_path, tiny_vlm_dir("qwen2_vl"), "--module", "grpo", "--strategy", "ddp", "--steps", "3",
               "--text-only-rank", "1", "--finetune-vision")
    ranks = load_ranks(tmp_path)
    _assert_ddp_invariants(ranks)
    # each rank sampled its own prompts (images on rank 0, text on rank 1) and logged its rollout metrics
    assert all("train/reward" in r["metrics"] for r in ranks)
