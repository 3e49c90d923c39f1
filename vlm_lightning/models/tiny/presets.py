"""``tiny:<name>[@<dir>]``: the named tiny models (a family at test-fixture size, or a demo preset), built once.

``<name>`` is a family (``tiny:qwen2_vl`` = the test-fixture size of ``make_tiny_vlm``) or a preset from
``TINY_PRESETS`` (``tiny:ocr_demo``, the CPU demo's model). It is written to ``<dir>``, by default
``$VLM_LIGHTNING_TINY_DIR/<name>`` (``runs/tiny/<name>``), and reused when it is already there. Real hub ids
and local folders are not this file's business: ``resolve_model_path`` returns them unchanged.

Example:
    >>> resolve_model_path("tiny:ocr_demo")        # 'runs/tiny/ocr_demo', built on first use
    >>> resolve_model_path("Qwen/Qwen2-VL-2B-Instruct")
    'Qwen/Qwen2-VL-2B-Instruct'
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer, pre_tokenizers

from . import chat_templates
from .tiny_models import TINY_FAMILIES, make_tiny_vlm

log = logging.getLogger(__name__)

TINY_SCHEME = "tiny:"
_DEMO_QWEN = {
    "text_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}},
    "vision_config": {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 4, "mlp_ratio": 2},
}
_DEMO_QWEN_L = {
    "text_config": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2,
                    "num_attention_heads": 6, "num_key_value_heads": 2,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}},
    "vision_config": {"depth": 2, "embed_dim": 128, "hidden_size": 192, "num_heads": 4, "mlp_ratio": 2},
}


class TinyPreset(NamedTuple):
    """A named tiny model for ``tiny:<name>``: ``make_tiny_vlm(family, **overrides, chat_template=...)``,
    then, with ``split_digits``, a tokenizer that splits numbers into single digits."""

    family: str
    overrides: dict[str, Any]
    split_digits: bool = False
    chat_template: str | None = None  # an attribute name in vlm_lightning.models.tiny.chat_templates


#: The OCR demo's models are small Qwen2-VLs that learn the bundled OCR set from scratch on 2 CPU cores.
#: Their tokenizer splits numbers into single digits, as the real Qwen2 / Llama / Mistral / Gemma tokenizers
#: do (the test fixtures' byte-level BPE merges digit runs, e.g. "0171" -> "01", "7", "1"), and their chat
#: template has no default system turn, so the demo's rows are short.
TINY_PRESETS: dict[str, TinyPreset] = {
    "ocr_demo": TinyPreset("qwen2_vl", _DEMO_QWEN, True, "QWEN2_VL_NO_DEFAULT_SYSTEM"),
    "ocr_demo_l": TinyPreset("qwen2_vl", _DEMO_QWEN_L, True, "QWEN2_VL_NO_DEFAULT_SYSTEM"),
}


_PRESET_STAMP = "tiny_preset.json"


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def split_digits(model_dir: str | os.PathLike) -> None:
    """Make the saved fast tokenizer pre-split numbers into single digits (offsets are kept)."""
    path = Path(model_dir) / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.save(str(path))


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """The directory or hub id to load: ``tiny:<name>[@<dir>]`` is built on first use, anything else returned.

    Building goes to a temporary sibling folder first and is renamed into place, so two processes (DDP ranks,
    the data module and the model) never see a half-written model.
    """
    spec = str(name_or_path)
    if not spec.startswith(TINY_SCHEME):
        return spec
    name, _, where = spec[len(TINY_SCHEME):].partition("@")
    if name in TINY_PRESETS:
        preset = TINY_PRESETS[name]
    elif name in TINY_FAMILIES:
        preset = TinyPreset(name, {})
    else:
        raise ValueError(f"model_name_or_path={spec!r}: unknown tiny model {name!r}; "
                         f"use a family {sorted(TINY_FAMILIES)} or a preset {sorted(TINY_PRESETS)}")
    root = Path(os.environ.get("VLM_LIGHTNING_TINY_DIR", "runs/tiny"))
    target = Path(where) if where else root / name
    # a preset's folder records what it was built from, so a folder left by an older preset is rebuilt
    stamp = json.dumps({"preset": name, **preset._asdict()}, sort_keys=True) if name in TINY_PRESETS else None
    if (target / "config.json").exists():
        if stamp is None or _read(target / _PRESET_STAMP) == stamp:
            return str(target)
        log.warning("%s was built from an older %r preset: rebuilding it", target, name)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        template = getattr(chat_templates, preset.chat_template) if preset.chat_template else None
        # same seed: same model everywhere
        make_tiny_vlm(preset.family, tmp / "model", seed=0, chat_template=template, **preset.overrides)
        if preset.split_digits:
            split_digits(tmp / "model")
        if stamp is not None:
            (tmp / "model" / _PRESET_STAMP).write_text(stamp)
        try:
            os.replace(tmp / "model", target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
        log.info("built tiny %s model %r in %s", preset.family, name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
