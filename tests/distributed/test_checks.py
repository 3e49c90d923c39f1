"""What a module asks of its strategy: quantisation combinations that cannot be sharded are refused (with the
recipe that fixes them), ``shards_parameters`` tells sharding strategies apart, and the GRPO module picks its
rollout path from it in its own ``setup`` (the strategy never reads or changes the module's settings)."""
from __future__ import annotations

import types

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from vlm_lightning.distributed.checks import (
    check_module_strategy,
    shards_parameters,
    validate_strategy_for_quantization,
)
from vlm_lightning.distributed.strategies import VisionDDPStrategy, VisionFSDPStrategy


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


def test_shards_parameters():
    for strategy in (VisionFSDPStrategy(), FSDPStrategy(), "deepspeed_stage_3"):
        assert shards_parameters(types.SimpleNamespace(strategy=strategy))
        assert shards_parameters(strategy)
    for strategy in (VisionDDPStrategy(), DDPStrategy(), SingleDeviceStrategy(), "deepspeed_stage_2", None):
        assert not shards_parameters(types.SimpleNamespace(strategy=strategy))


def _grpo_under(strategy, backend: str):
    from vlm_lightning.modules.grpo import VisionGRPOModule

    module = VisionGRPOModule("tiny:qwen2_vl", reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)],
                              rollout_backend=backend)
    module._trainer = types.SimpleNamespace(strategy=strategy, datamodule=None)
    return module


def test_grpo_setup_picks_hf_rollouts_when_parameters_are_sharded():
    module = _grpo_under(VisionFSDPStrategy(), "auto")
    module.setup("fit")
    assert module.rollout_backend == "hf"  # "auto": the fast path needs unsharded weights
    assert module.hparams.rollout_backend == "auto"  # what the user asked for stays recorded
    with pytest.raises(ValueError, match="rollout_backend='fast'"):
        _grpo_under(VisionFSDPStrategy(), "fast").setup("fit")
    for backend in ("auto", "fast", "hf"):  # replicated weights: the module's own choice stands
        module = _grpo_under(VisionDDPStrategy(), backend)
        module.setup("fit")
        assert module.rollout_backend == backend
