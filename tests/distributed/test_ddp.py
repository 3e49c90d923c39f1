"""DDP on the CPU (gloo, 2 processes) for VisionSFTModule and VisionGRPOModule, plus the strategy helpers.

The 2-process runs train LoRA on the language *and* vision layers while rank 1 only ever sees text rows:
the vision tower sits out on rank 1, which without ``find_unused_parameters`` makes DDP hang
(reliability note 14). ``VisionDDPStrategy`` switches it on because the vision tower trains; the tests
assert that nothing hangs, that every LoRA parameter has a non-zero gradient on every rank at the last
step (after the all-reduce, identical on both ranks), and that both ranks end with identical, updated
weights. The SFT run also has (non-reentrant) gradient checkpointing on, the module's default.
Each run takes ~15 s of CPU on 2 cores.
"""
from __future__ import annotations

import types

import pytest
import torch
from tests.distributed.launch import load_ranks, run_worker

from vlm_lightning.strategies import (
    LayerWrapPolicy,
    VisionDDPStrategy,
    VisionFSDPStrategy,
    check_module_strategy,
    layer_class_names,
    make_strategy,
    validate_strategy_for_quantization,
    vision_parameters_trainable,
)
from vlm_lightning.testing import TINY_FAMILIES


# ----------------------------------------------------------------------------------------- 2 processes
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
    pytest.importorskip("vlm_lightning.modules.grpo")
    run_worker(tmp_path, tiny_vlm_dir("qwen2_vl"), "--module", "grpo", "--strategy", "ddp", "--steps", "3",
               "--text-only-rank", "1", "--finetune-vision")
    ranks = load_ranks(tmp_path)
    _assert_ddp_invariants(ranks)
    # each rank sampled its own prompts (images on rank 0, text on rank 1) and logged its rollout metrics
    assert all("train/reward" in r["metrics"] for r in ranks)


# ----------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("strategy", ["fsdp", VisionFSDPStrategy(), "deepspeed_stage_3"])
def test_4bit_sharding_needs_quant_storage_equal_to_compute_dtype(strategy):
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage equal to the compute dtype"):
        validate_strategy_for_quantization(strategy, "4bit", None, "bfloat16")
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage equal"):
        validate_strategy_for_quantization(strategy, "4bit", "float32", "bfloat16")
    with pytest.raises(ValueError, match="8bit"):
        validate_strategy_for_quantization(strategy, "8bit", None, "bfloat16")
    validate_strategy_for_quantization(strategy, "4bit", "bfloat16", "bf16")  # same dtype: accepted
    validate_strategy_for_quantization(strategy, None, None, "bfloat16")


@pytest.mark.parametrize("strategy", ["ddp", VisionDDPStrategy(), "deepspeed_stage_2", None, "auto"])
def test_replicating_strategies_take_any_quantization(strategy):
    for q in ("4bit", "8bit", None):
        validate_strategy_for_quantization(strategy, q, None, "bfloat16")


def test_module_setup_runs_the_check():
    fsdp = types.SimpleNamespace(strategy=VisionFSDPStrategy())
    module = types.SimpleNamespace(_trainer=fsdp, hparams={"quantization": "4bit", "dtype": "bfloat16",
                                                           "bnb_4bit_quant_storage": None})
    with pytest.raises(ValueError, match="recipes/strategies/fsdp_qlora.yaml"):
        check_module_strategy(module)
    module.hparams["bnb_4bit_quant_storage"] = "bfloat16"
    check_module_strategy(module)
    check_module_strategy(types.SimpleNamespace(_trainer=None, hparams={}))  # no trainer: nothing to check


def test_sft_module_setup_refuses_fsdp_4bit_without_quant_storage():
    from vlm_lightning.modules.sft import VisionSFTModule

    module = VisionSFTModule("tiny:qwen2_vl", quantization="4bit", dtype="bfloat16")
    module._trainer = types.SimpleNamespace(strategy=VisionFSDPStrategy())
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        module.setup("fit")


def test_make_strategy_names():
    assert isinstance(make_strategy("ddp"), VisionDDPStrategy)
    fsdp = make_strategy("fsdp", wrap_vision_blocks=True)
    assert isinstance(fsdp, VisionFSDPStrategy)
    assert isinstance(fsdp.kwargs["auto_wrap_policy"], LayerWrapPolicy) and fsdp.kwargs["use_orig_params"]
    with pytest.raises(ValueError, match="one of ddp, fsdp"):
        make_strategy("horovod")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the `deepspeed` package"):
            make_strategy("deepspeed_stage_2")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_wrap_policy_finds_decoder_layers_of_every_family(family, tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir(family))
    text = layer_class_names(model, vision=False)
    assert text and all(name.endswith("DecoderLayer") for name in text), text
    both = layer_class_names(model, vision=True)
    assert both > text, f"{family}: no vision block class found besides {text}"
    policy = LayerWrapPolicy(wrap_vision_blocks=False).resolve(model)
    wrapped = {type(m).__name__ for m in model.modules() if policy(m, recurse=False)}
    assert wrapped == text
    assert policy(model, recurse=True) is True


def test_vision_parameters_trainable_follows_lora_switches(tiny_vlm_dir):
    from vlm_lightning.models import apply_lora, load_vlm

    path = str(tiny_vlm_dir("qwen2_vl"))
    text_only = apply_lora(load_vlm(path, dtype="float32")[0], r=2, gradient_checkpointing=False)
    assert not vision_parameters_trainable(text_only)  # DDP keeps find_unused_parameters off
    with_vision = apply_lora(load_vlm(path, dtype="float32")[0], r=2, finetune_vision_layers=True,
                             gradient_checkpointing=False)
    assert vision_parameters_trainable(with_vision)
