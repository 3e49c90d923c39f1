"""Lightning callbacks: adapter saving, LoRA merge, GGUF export, OCR scoring.

Each is imported on first use (``vlm_lightning.callbacks.MergeLoRA``), so that a recipe naming one callback
does not pull in the others' dependencies (the GGUF writer, torchmetrics). The demo's ``DemoReport`` lives in
``vlm_lightning.demo.report``.

Example (YAML):
    trainer:
      callbacks:
        - class_path: vlm_lightning.callbacks.SaveAdapter
"""
from __future__ import annotations

import importlib

_EXPORTS = {"MergeLoRA": ".merge", "GGUFExport": ".gguf", "OCRMetrics": ".ocr", "SaveAdapter": ".adapter"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
