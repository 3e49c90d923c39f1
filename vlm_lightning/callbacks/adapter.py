"""`SaveAdapter`: write the PEFT adapter folder (and the processor) when `fit` ends.

The module writes it (`save_adapter`); under FSDP / ZeRO-3 the weights are gathered first and rank zero
writes (`vlm_lightning.distributed.gather.save_adapter_gathered`). Left out: merging (`MergeLoRA`).
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

from ..distributed.checks import shards_parameters
from ..distributed.gather import save_adapter_gathered

__all__ = ["SaveAdapter"]


class SaveAdapter(Callback):
    """Save the module's adapter with ``module.save_adapter(dirpath)`` at the end of ``fit``: the folder
    ``PeftModel.from_pretrained(base, dirpath)`` and ``vlm-lightning export merge --checkpoint dirpath`` read
    (the full model for ``lora=False``). Only global rank zero writes.

    Args:
        dirpath: the adapter folder; default ``<trainer.default_root_dir>/adapter``.

    Example (YAML):
        trainer:
          callbacks:
            - class_path: vlm_lightning.callbacks.SaveAdapter
              init_args: {dirpath: runs/ocr/adapter}
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.last_path: Path | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if getattr(trainer, "fast_dev_run", False):
            return
        target = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "adapter"
        if shards_parameters(trainer):  # FSDP / ZeRO-3: gather on every rank, rank zero writes
            self.last_path = save_adapter_gathered(trainer, pl_module, target)
        else:
            self.last_path = pl_module.save_adapter(target)
