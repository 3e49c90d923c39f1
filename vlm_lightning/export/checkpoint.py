"""Read a Lightning ``.ckpt`` of ``VisionSFTModule`` / ``VisionGRPOModule`` for export, without the module.

Only two entries are used: ``ckpt["vlm_lightning"]`` (written by ``VisionSFTModule.on_save_checkpoint``:
``model_name_or_path``, ``adapter_only``, ``peft_config``, ``processor_kwargs``) and ``ckpt["state_dict"]``
(the trainable weights only, keys ``model.<name in the trained model>``). The stored class path and
hyper-parameters are never used: LightningCLI adds keys to them (``_class_path``) and they may name code
that has changed since.

    LoRA run:  model.base_model.model.<hf module>.lora_A.default.weight  -> an adapter state dict as
               ``get_peft_model_state_dict`` returns it (adapter name dropped), plus the PEFT config
    full run:  model.<hf key>                                            -> every trained weight, by HF key
"""
from __future__ import annotations

import copy
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from transformers import AutoConfig

from vlm_lightning.models.tiny import resolve_model_path

from .base_weights import stock_model_class
from .source import ExportSource

__all__ = ["is_deepspeed_checkpoint", "read_export_info", "source_from_checkpoint", "strip_wrapper_names"]

_WRAPPERS = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def strip_wrapper_names(key: str) -> str:
    """``model.`` prefix and the segments FSDP / activation checkpointing / torch.compile insert, removed."""
    return _WRAPPERS.sub("", key.removeprefix("model."))


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed strategy writes ``last.ckpt`` as a folder: ``latest`` (the tag) and ``checkpoint/`` shards."""
    path = Path(path)
    return path.is_dir() and (path / "checkpoint").is_dir() and not (path / "adapter_config.json").is_file()


def _consolidate_deepspeed(path: Path) -> dict:
    """The ZeRO shards of a DeepSpeed checkpoint folder gathered into one Lightning checkpoint dict (in a
    temporary file, removed after reading), by Lightning's own ``convert_zero_checkpoint_to_fp32_state_dict``;
    the ``vlm_lightning`` block travels in its client state."""
    try:
        import deepspeed  # noqa: F401  # optional dependency: only DeepSpeed checkpoints need it

        # Lightning's converter, which imports deepspeed itself
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as err:
        raise ImportError(f"{path} is a DeepSpeed checkpoint folder; reading it needs the `deepspeed` package "
                          "(pip install deepspeed), as training with it did") from err
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "consolidated.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
        return torch.load(str(out), map_location="cpu", weights_only=False)


def read_export_info(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(ckpt["vlm_lightning"], ckpt["state_dict"])`` of a Lightning checkpoint (a ``.ckpt`` file, or the folder
    a DeepSpeed strategy writes); a clear error when the block is missing (not written by this package)."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        ckpt = _consolidate_deepspeed(path)
    else:
        try:  # what Lightning itself resumes with; the block and state dict are plain types and tensors
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:  # other entries (callback state) hold objects: the user's own file
            warnings.warn(f"{path}: not loadable with weights_only=True, loading it fully", stacklevel=2)
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    info = ckpt.get("vlm_lightning") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or not info.get("model_name_or_path"):
        raise ValueError(
            f"{path} has no 'vlm_lightning' block (model_name_or_path, adapter_only, peft_config): it was not written "
            "by VisionSFTModule / VisionGRPOModule. Export an adapter folder (module.save_adapter) instead."
        )
    state = ckpt.get("state_dict") or {}
    if not state:
        raise ValueError(f"{path} holds no weights (empty state_dict)")
    return info, state


def _peft_config(d: dict, path: Path):
    try:
        cfg = PeftConfig.from_peft_type(**copy.deepcopy(d))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: the recorded peft_config cannot be read by this PEFT version ({err})") from err
    cfg.inference_mode = True
    return cfg


def _adapter_state_dict(peft_config, trained: dict[str, torch.Tensor], base_path: str,
                        path: Path) -> dict[str, torch.Tensor]:
    """PEFT-module keys (``...lora_A.default.weight``, ``...modules_to_save.default...``) -> the keys of
    ``get_peft_model_state_dict``, by PEFT itself on a meta-device copy of the base (no weights read)."""
    config = AutoConfig.from_pretrained(base_path)
    cfg = copy.deepcopy(peft_config)
    if getattr(cfg, "init_lora_weights", True) not in (True, False):  # PiSSA & co. read base weights at init
        cfg.init_lora_weights = True
    with torch.device("meta"):
        skeleton = PeftModel(stock_model_class(config=config)._from_config(config), cfg, adapter_name="default")
    known = {n for n, _ in skeleton.named_parameters()}
    unknown = [k for k in trained if k not in known]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} trained weight(s) do not exist in a LoRA model of {base_path!r}, "
                         f"e.g. {unknown[:3]}; is the base right (--base)?")
    sd = get_peft_model_state_dict(skeleton, state_dict=trained, adapter_name="default")
    if len(sd) != len(trained):  # every trained tensor must reach the merge
        raise ValueError(f"{path}: {len(trained)} trained weights, but PEFT takes only {len(sd)} of them into the "
                         "adapter; the checkpoint does not match its recorded peft_config")
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def source_from_checkpoint(path: str | Path, base_name_or_path: str | None = None) -> ExportSource:
    """An `ExportSource` from a Lightning checkpoint: the adapter (LoRA runs) or every trained weight (full
    fine-tunes), the base to merge into (``--base`` overrides the recorded one) and the processor kwargs.

    Example:
        >>> src = source_from_checkpoint("runs/qwen/checkpoints/last.ckpt")  # doctest: +SKIP
    """
    path = Path(path)
    info, state = read_export_info(path)
    base = resolve_model_path(base_name_or_path or info["model_name_or_path"])
    trained = {strip_wrapper_names(k): v for k, v in state.items()}
    src = ExportSource(peft_config=None, adapter_state_dict={}, base_name_or_path=base,
                       origin=f"Lightning checkpoint {path}", processor_kwargs=dict(info.get("processor_kwargs") or {}))
    if info.get("adapter_only", True):
        if not info.get("peft_config"):
            raise ValueError(f"{path}: adapter_only checkpoint without a recorded peft_config")
        src.peft_config = _peft_config(info["peft_config"], path)
        src.adapter_state_dict = _adapter_state_dict(src.peft_config, trained, base, path)
    else:
        src.full_state_dict = trained
    return src
