"""Several GPUs and nodes: Lightning strategies for our modules, the checks a module asks of them, and
getting weights out of a sharded run.

Importing this package registers ``vision_ddp``, ``vision_fsdp``, ``vision_deepspeed_stage_2`` and
``vision_deepspeed_stage_3`` in Lightning's ``StrategyRegistry`` (``strategies.py``).

    strategies.py   VisionDDPStrategy, VisionFSDPStrategy, VisionDeepSpeedStrategy, LayerWrapPolicy
    checks.py       shards_parameters, validate_strategy_for_quantization, check_module_strategy
    gather.py       gather_full_state_dict, save_adapter_gathered, exportable_source, run_unsharded, on_rank_zero
    fsdp.py         the FSDP1 internals the FSDP strategy patches, quarantined

Example:
    >>> L.Trainer(accelerator="gpu", devices=4, strategy="vision_fsdp", precision="bf16-true")
"""
from .strategies import STRATEGY_NAMES, VisionDDPStrategy, VisionDeepSpeedStrategy, VisionFSDPStrategy

__all__ = ["STRATEGY_NAMES", "VisionDDPStrategy", "VisionDeepSpeedStrategy", "VisionFSDPStrategy"]
