"""LightningModules: supervised fine-tuning (``VisionSFTModule``) and GRPO/GSPO (``VisionGRPOModule``)."""
from .base import NonFiniteError
from .grpo import VisionGRPOModule
from .sft import VisionSFTModule

__all__ = ["NonFiniteError", "VisionGRPOModule", "VisionSFTModule"]
