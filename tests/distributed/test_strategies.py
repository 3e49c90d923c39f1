"""The strategies in one process: registered names build our classes, FSDP's options and wrap policy, and the
FSDP strategy's refusal of a mixed image / text-only step. The multi-process runs are test_ddp.py / test_fsdp.py.
"""
from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.strategies import StrategyRegistry

from vlm_lightning.distributed import STRATEGY_NAMES
from vlm_lightning.distributed.strategies import (
    LayerWrapPolicy,
    VisionDDPStrategy,
    VisionDeepSpeedStrategy,
    VisionFSDPStrategy,
)
from vlm_lightning.models.layers import layer_class_names
from vlm_lightning.models.tiny import TINY_FAMILIES


def _deepspeed_installed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def test_registered_names_build_our_strategies():
    assert set(STRATEGY_NAMES) <= set(StrategyRegistry.available_strategies())
    assert isinstance(StrategyRegistry.get("vision_ddp"), VisionDDPStrategy)
    fsdp = StrategyRegistry.get("vision_fsdp")
    assert isinstance(fsdp, VisionFSDPStrategy)
    assert isinstance(fsdp.kwargs["auto_wrap_policy"], LayerWrapPolicy) and fsdp.kwargs["use_orig_params"]
    for stage in (2, 3):
        name = f"vision_deepspeed_stage_{stage}"
        if _deepspeed_installed():
            strategy = StrategyRegistry.get(name)
            assert isinstance(strategy, VisionDeepSpeedStrategy) and strategy.zero_stage_3 == (stage == 3)
        else:  # Lightning's own message, naming the missing package
            with pytest.raises(Exception, match="must have DeepSpeed installed"):
                StrategyRegistry.get(name)


def test_trainer_takes_the_names_and_fsdp_runs_on_the_cpu():
    # Lightning's own "fsdp" name demands a GPU; ours wraps on the CPU too (gloo, what the tests use)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="vision_fsdp", logger=False)
    assert isinstance(trainer.strategy, VisionFSDPStrategy)
    assert type(trainer.strategy.precision_plugin).__name__ == "NormClippingFSDPPrecision"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="vision_ddp", logger=False)
    assert isinstance(trainer.strategy, VisionDDPStrategy)


def test_fsdp_options_reach_fsdp():
    fsdp = VisionFSDPStrategy(wrap_vision_blocks=True, sharding_strategy="SHARD_GRAD_OP")
    policy = fsdp.kwargs["auto_wrap_policy"]
    assert isinstance(policy, LayerWrapPolicy) and policy.wrap_vision_blocks and policy.class_names is None
    assert fsdp.kwargs["use_orig_params"] and fsdp.sharding_strategy.name == "SHARD_GRAD_OP"
    named = VisionFSDPStrategy(layer_class_names=["Qwen2VLDecoderLayer"])
    assert named.kwargs["auto_wrap_policy"].class_names == {"Qwen2VLDecoderLayer"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_wrap_policy_wraps_exactly_the_decoder_layers_of_every_family(family, tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir(family))
    text = layer_class_names(model, vision=False)
    policy = LayerWrapPolicy(wrap_vision_blocks=False).resolve(model)
    wrapped = {type(m).__name__ for m in model.modules() if policy(m, recurse=False)}
    assert wrapped == text
    assert policy(model, recurse=True) is True
