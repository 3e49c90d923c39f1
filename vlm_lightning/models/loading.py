"""Load a vision-language model and its processor: 16-bit, or 4-/8-bit bitsandbytes on the language model only.

Quantisation touches only the language model's linear layers. The vision tower, the projector and the
lm_head stay in 16 bits: they are small, and quantising them is a known way to get nonsense from a VLM
(unsloth#1347). The skip list is built from the family table (``vlm_lightning.models.families``) and always
keeps ``lm_head``: a user skip list that replaces transformers' defaults would otherwise drop it
(transformers#45674).

``name_or_path`` may be a hub id, a local directory, or ``tiny:<name>[@<dir>]``: a small random-weight model
built on first use by ``vlm_lightning.testing.make_tiny_vlm``. ``<name>`` is a family
(``tiny:qwen2_vl`` = the test-fixture size) or a preset from ``TINY_PRESETS`` (``tiny:ocr_demo``, the
CPU demo's model). It is written to ``<dir>``, by default ``$VLM_LIGHTNING_TINY_DIR/<name>`` (``runs/tiny/<name>``),
and reused when it is already there.

Example:
    >>> model, processor = load_vlm("Qwen/Qwen2.5-VL-7B-Instruct", quantization="4bit")
    >>> model, processor = load_vlm("tiny:qwen2_vl", dtype="float32")      # CPU tests and the demo
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

log = logging.getLogger(__name__)

Quantization = Literal["4bit", "8bit"] | None

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
    chat_template: str | None = None  # an attribute name in vlm_lightning.testing.chat_templates


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
    from tokenizers import Tokenizer, pre_tokenizers

    path = Path(model_dir) / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.save(str(path))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``; ``"auto"``/None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (use bfloat16, float16, float32 or auto)")
    return value


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """The directory or hub id to load: ``tiny:<name>[@<dir>]`` is built on first use, anything else returned.

    Building goes to a temporary sibling folder first and is renamed into place, so two processes (DDP ranks,
    the data module and the model) never see a half-written model.
    """
    spec = str(name_or_path)
    if not spec.startswith(TINY_SCHEME):
        return spec
    from vlm_lightning.testing import TINY_FAMILIES, chat_templates, make_tiny_vlm

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


def quantization_skip_modules(family_spec) -> list[str]:
    """Module paths kept in 16 bits under 4-/8-bit loading: vision tower, projector, lm_head.

    transformers skips a module when a pattern is its dotted path (or a prefix of it at a module boundary),
    in every 5.x version; plain dotted paths are used so the saved ``quantization_config`` stays readable.
    """
    skip = [family_spec.vision_tower, family_spec.projector, family_spec.lm_head]
    # the projector may sit inside the vision tower (Qwen's ``model.visual.merger``): keep both anyway
    return list(dict.fromkeys(s for s in skip if s))


def would_quantize(module_name: str, skip_modules: list[str]) -> bool:
    """Whether a Linear named ``module_name`` is quantised given ``skip_modules`` (prefix at a dot boundary
    or exact match; the semantics shared by transformers 5.x's ``should_convert_module``)."""
    return not any(module_name == s or module_name.startswith(s + ".") or module_name.endswith("." + s)
                   for s in skip_modules)


def build_quantization_config(quantization: Quantization, family_spec=None, compute_dtype="bfloat16",
                              quant_type: str = "nf4", double_quant: bool = True, quant_storage=None,
                              skip_modules: list[str] | None = None):
    """A ``BitsAndBytesConfig`` quantising only the language model's linear layers (or None for 16-bit).

    Args:
        quantization: "4bit" (NF4, double quantisation, 16-bit compute), "8bit" (LLM.int8) or None.
        family_spec: the ``FamilySpec`` whose vision tower / projector / lm_head are skipped.
        compute_dtype: the 4-bit matmul dtype (bf16 by default).
        quant_storage: the dtype the packed 4-bit weights are stored in; set it to the compute dtype for
            FSDP, which cannot flatten uint8 next to bf16 parameters (peft#1432).
        skip_modules: extra module paths to keep 16-bit (added to the family's, never replacing them).

    Example:
        >>> cfg = build_quantization_config("4bit", get_family_spec("qwen2_vl"), quant_storage="bfloat16")
    """
    if quantization is None or quantization in ("none", "None", ""):
        return None
    from transformers import BitsAndBytesConfig

    skip = quantization_skip_modules(family_spec) if family_spec is not None else ["lm_head"]
    skip = list(dict.fromkeys(skip + list(skip_modules or [])))
    if quantization == "4bit":
        kwargs = {}
        if quant_storage is not None:
            kwargs["bnb_4bit_quant_storage"] = resolve_dtype(quant_storage)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=resolve_dtype(compute_dtype),
                                  llm_int8_skip_modules=skip, **kwargs)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"quantization={quantization!r}: use None, '4bit' or '8bit'")


def load_vlm(name_or_path: str | os.PathLike, quantization: Quantization = None, dtype: str | torch.dtype = "bfloat16",
             attn_implementation: str | None = None, trust_remote_code: bool = False, device_map: Any = None,
             bnb_4bit_quant_storage: str | None = None, **processor_kwargs):
    """Build ``(model, processor)`` with ``AutoModelForImageTextToText`` + ``AutoProcessor``.

    Args:
        name_or_path: hub id, local directory, or ``tiny:<name>[@<dir>]`` (see the module docstring).
        quantization: None (16-bit), "4bit" (NF4 + double quant, compute in ``dtype``) or "8bit";
            only the language model's linears are quantised.
        dtype: weight dtype of everything not quantised (and the 4-bit compute dtype).
        attn_implementation: "sdpa", "eager", "flash_attention_2", ... (None: transformers' default).
        device_map: passed to ``from_pretrained``; for 4/8-bit on a GPU give ``{"": device}`` so
            weights are quantised while loading.
        bnb_4bit_quant_storage: storage dtype of packed 4-bit weights (set to ``dtype`` for FSDP).
        **processor_kwargs: forwarded to ``AutoProcessor.from_pretrained`` (e.g. ``min_pixels``).

    Example:
        >>> model, processor = load_vlm("Qwen/Qwen2-VL-2B-Instruct", quantization="4bit", device_map={"": 0})
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .families import get_family_spec

    path = resolve_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization:
        spec = get_family_spec(config)
        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        kwargs["quantization_config"] = build_quantization_config(
            quantization, spec, compute_dtype=compute, quant_storage=bnb_4bit_quant_storage)
        if device_map is None:
            kwargs["device_map"] = _default_quantized_device_map()
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **processor_kwargs)
    return model, processor


def _default_quantized_device_map():
    """bitsandbytes quantises weights as they land on their device: the current GPU, else the CPU."""
    default = torch.get_default_device()
    if default.type == "cuda":
        return {"": default}
    if torch.cuda.is_available():
        return {"": torch.cuda.current_device()}
    return {"": "cpu"}
