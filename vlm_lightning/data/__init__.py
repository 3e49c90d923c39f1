"""Multimodal data pipeline: rows (datasets) -> conversations (formats) -> images -> labels + collation ->
validation (check) -> LightningDataModule.

Example:
    >>> from vlm_lightning.data import VisionChatDataModule
    >>> from vlm_lightning.demo.data import make_demo_ocr_dataset   # the bundled synthetic OCR set
    >>> paths = make_demo_ocr_dataset("/tmp/demo_ocr")
    >>> dm = VisionChatDataModule("path/to/model", train=paths["train"], val=paths["val"], batch_size=4)
"""

from .check import DataCheckReport, SplitCheck, check_splits
from .collate import EncodedRow, OverlongRowError, VisionChatCollator
from .datamodule import VisionChatDataModule, apply_pixel_bounds, build_processor
from .datasets import ConversationDataset, load_rows
from .formats import DEFAULT_INSTRUCTION, FormatOptions, RowFormatError, detect_format, normalize_row, normalize_rows
from .images import ImageLoadError, load_image, to_rgb

__all__ = [
    "ConversationDataset", "DataCheckReport", "DEFAULT_INSTRUCTION", "EncodedRow", "FormatOptions",
    "ImageLoadError", "OverlongRowError", "RowFormatError", "SplitCheck", "VisionChatCollator",
    "VisionChatDataModule", "apply_pixel_bounds", "build_processor", "check_splits", "detect_format", "load_image",
    "load_rows", "normalize_row", "normalize_rows", "to_rgb",
]
