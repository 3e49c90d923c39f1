"""LightningModules: supervised fine-tuning (``VisionSFTModule``)."""
from .sft import VisionSFTModule

__all__ = ["VisionSFTModule"]
