"""vlm-lightning: Lightning modules for fine-tuning vision-language models.

The public API, each name imported on first use (``import vlm_lightning`` stays light, and a script that needs
only the data module does not load the training stack):

    from vlm_lightning import VisionChatDataModule, VisionSFTModule, VisionGRPOModule, load_vlm, apply_lora
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "VisionChatDataModule": "vlm_lightning.data",
    "VisionSFTModule": "vlm_lightning.modules",
    "VisionGRPOModule": "vlm_lightning.modules",
    "build_model": "vlm_lightning.models.build",
    "load_vlm": "vlm_lightning.models",
    "apply_lora": "vlm_lightning.models",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
