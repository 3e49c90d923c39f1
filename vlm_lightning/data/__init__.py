"""Multimodal data pipeline: row formats -> image loading -> collation -> LightningDataModule.

Example:
    >>> from vlm_lightning.data import VisionChatDataModule, make_demo_ocr_dataset
    >>> paths = make_demo_ocr_dataset("/tmp/demo_ocr")
    >>> dm = VisionChatDataModule("path/to/model", train=paths["train"], val=paths["val"], batch_size=4)
"""

from .collate import IGNORE_INDEX, EncodedRow, OverlongRowError, VisionChatCollator, expected_image_tokens
from .datamodule import (
    ConversationDataset,
    DataCheckReport,
    SplitCheck,
    VisionChatDataModule,
    apply_pixel_bounds,
    load_rows,
)
from .demo import make_demo_ocr_dataset
from .formats import DEFAULT_INSTRUCTION, FormatOptions, RowFormatError, detect_format, normalize_row, normalize_rows
from .images import ImageLoadError, load_image, to_rgb

__all__ = [
    "IGNORE_INDEX", "ConversationDataset", "DataCheckReport", "DEFAULT_INSTRUCTION", "EncodedRow", "FormatOptions",
    "ImageLoadError", "OverlongRowError", "RowFormatError", "SplitCheck", "VisionChatCollator",
    "VisionChatDataModule", "apply_pixel_bounds", "detect_format", "expected_image_tokens", "load_image",
    "load_rows", "make_demo_ocr_dataset", "normalize_row", "normalize_rows", "to_rgb",
]
