"""LightningModules: supervised fine-tuning (``VisionSFTModule``) and GRPO/GSPO (``VisionGRPOModule``)."""
from .grpo import VisionGRPOModule
from .sft import VisionSFTModule

__all__ = ["VisionGRPOModule", "VisionSFTModule"]
