"""GGUF export: a merged transformers VLM folder -> ``<name>-<quant>.gguf`` + ``mmproj-<name>-f16.gguf``.

``writer.py`` reads the folder and writes the files (``to_gguf``); ``arch.py`` holds the llama.cpp layouts
(metadata and tensor names per text architecture and projector); ``vocab.py`` the tokenizer.

Example:
    >>> from vlm_lightning.export.gguf import to_gguf
    >>> to_gguf("runs/demo/merged", "runs/demo/gguf", quant="q8_0")
"""
from .arch import SUPPORTED_GGUF_FAMILIES, UnsupportedGGUFFamily
from .writer import GGUF_QUANTS, kquant_backend, to_gguf

__all__ = ["GGUF_QUANTS", "SUPPORTED_GGUF_FAMILIES", "UnsupportedGGUFFamily", "kquant_backend", "to_gguf"]
