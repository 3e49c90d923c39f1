"""Lightning callbacks: adapter saving, LoRA merge, GGUF export, OCR scoring. Imported lazily (each pulls in its own deps)."""
from __future__ import annotations

_EXPORTS = {"MergeLoRA": ".merge", "GGUFExport": ".gguf", "OCRMetrics": ".ocr", "SaveAdapter": ".adapter"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
