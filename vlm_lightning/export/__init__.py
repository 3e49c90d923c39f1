"""Export: merge LoRA into 16-bit weights, write GGUF (text model + mmproj), upload to the Hub.

The callbacks in `vlm_lightning.callbacks` and `vlm-lightning export` call these functions.
"""
from .base_weights import BaseWeightsMissing
from .hub import HubUploadError, push_folder
from .merge import check_finite, merge_lora

__all__ = ["merge_lora", "check_finite", "push_folder", "HubUploadError", "BaseWeightsMissing", "to_gguf"]


def __getattr__(name):  # gguf writer imported on first use (it pulls in numpy quantisers)
    if name == "to_gguf":
        from .gguf import to_gguf  # heavy import: the gguf writer and its numpy quantisers

        return to_gguf
    raise AttributeError(name)
