"""The tiny-model zoo behind ``tiny:<name>``: random-weight VLMs of every supported family, built locally.

``make_tiny_vlm`` writes one (tests build them per family); ``resolve_model_path`` turns ``tiny:<name>``
into a built folder (the demo presets, or a family at test-fixture size). No downloads, CPU only.

Example:
    >>> from vlm_lightning.models.tiny import TINY_FAMILIES, make_tiny_vlm, resolve_model_path
    >>> path = make_tiny_vlm("qwen2_vl", "/tmp/tiny-qwen2-vl")
    >>> resolve_model_path("tiny:ocr_demo")
    'runs/tiny/ocr_demo'
"""

from .features import image_feature_counts
from .presets import TINY_PRESETS, TINY_SCHEME, TinyPreset, resolve_model_path
from .tiny_models import TINY_FAMILIES, make_tiny_vlm

__all__ = ["TINY_FAMILIES", "TINY_PRESETS", "TINY_SCHEME", "TinyPreset", "image_feature_counts", "make_tiny_vlm",
           "resolve_model_path"]
