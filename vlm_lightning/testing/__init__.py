"""Test and demo helpers: tiny random-weight VLMs for every supported family (no downloads).

Example:
    >>> from vlm_lightning.testing import TINY_FAMILIES, make_tiny_vlm
    >>> path = make_tiny_vlm("qwen2_vl", "/tmp/tiny-qwen2-vl")
"""

from .features import image_feature_counts
from .tiny_models import TINY_FAMILIES, make_tiny_vlm

__all__ = ["TINY_FAMILIES", "image_feature_counts", "make_tiny_vlm"]
