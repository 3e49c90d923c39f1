"""`MergeLoRA`: write the LoRA-merged 16-bit model at the end of `fit` (or when asked).

A thin callback: the merge itself is `vlm_lightning.export.merge_lora`; getting the weights out of a sharded
run and the rank-zero work are `vlm_lightning.distributed.gather`'s. Left out: GGUF (`GGUFExport` reads
this callback's folder).

Example (YAML):
    trainer:
      callbacks:
        - class_path: vlm_lightning.callbacks.MergeLoRA
          init_args: {out_dir: runs/ocr/merged}
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

from ..distributed.checks import shards_parameters
from ..distributed.gather import exportable_source, on_rank_zero, save_adapter_gathered
from ..export.atomic import inside
from ..export.merge import merge_lora

__all__ = ["MergeLoRA", "base_model_path"]


class MergeLoRA(Callback):
    """Merge the module's LoRA adapter into the 16-bit base weights (a full fine-tune: save its weights the
    same way) and save a standalone HF folder, with the processor the module trained with.

    Runs at `on_fit_end` (unless `at_fit_end=False`); call `merge(trainer, pl_module)` for an on-demand
    merge. Global rank zero writes; the other ranks wait at a barrier. With a 4-bit base the original
    16-bit weights are reloaded from the module's `model_name_or_path` (see `vlm_lightning.export.merge_lora`).

    Args:
        out_dir: folder for the merged model (safetensors shards, config, processor, chat template); written
            under a temporary name and renamed when complete (an older folder there is replaced).
        base_name_or_path: 16-bit base weights, if not the module's own `name_or_path`.
        dtype: dtype of the merged weights ("bfloat16", "float16", "float32").
        max_shard_size: safetensors shard size, e.g. "2GB".
        adapter_dir: also save the bare adapter here (`PeftModel.save_pretrained`), if set.
        at_fit_end: merge when `fit` ends.
        push_to_hub: Hub repo id to upload the merged folder to (token from `HF_TOKEN`).
        private: create the Hub repo as private.

    Example:
        >>> trainer = L.Trainer(callbacks=[MergeLoRA("runs/demo/merged")])  # doctest: +SKIP
    """

    def __init__(
        self,
        out_dir: str,
        base_name_or_path: str | None = None,
        dtype: str = "bfloat16",
        max_shard_size: str = "2GB",
        adapter_dir: str | None = None,
        at_fit_end: bool = True,
        push_to_hub: str | None = None,
        private: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.base_name_or_path = base_name_or_path
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        if self.adapter_dir is not None and inside(self.adapter_dir, self.out_dir):
            raise ValueError(f"MergeLoRA adapter_dir={adapter_dir!r} is inside out_dir={out_dir!r}, which the merge "
                             "replaces as a whole: choose a folder beside it")
        self.at_fit_end = at_fit_end
        self.push_to_hub = push_to_hub
        self.private = private
        self.last_path: Path | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and not getattr(trainer, "fast_dev_run", False):
            self.merge(trainer, pl_module)

    def merge(self, trainer, pl_module) -> Path | None:
        """Merge now; returns the folder on rank zero, None elsewhere."""
        # collective under FSDP / ZeRO-3 (gathers the LoRA weights into an adapter folder); the module itself
        # for one device / DDP
        if self.adapter_dir is not None and shards_parameters(trainer):
            source = save_adapter_gathered(trainer, pl_module, self.adapter_dir)
        else:
            scratch = self.out_dir.parent / f"{self.out_dir.name}_adapter_gathered"
            source = exportable_source(trainer, pl_module, scratch)

        def write() -> Path:
            if self.adapter_dir is not None and source is pl_module:
                if callable(getattr(pl_module, "save_adapter", None)):  # adapter + the training processor
                    pl_module.save_adapter(self.adapter_dir)
                else:
                    pl_module.model.save_pretrained(self.adapter_dir)
                    proc = getattr(pl_module, "processor", None)
                    if proc is not None:
                        proc.save_pretrained(self.adapter_dir)
            self.last_path = merge_lora(
                source, self.out_dir, base_name_or_path=self.base_name_or_path or base_model_path(pl_module),
                processor=getattr(pl_module, "processor", None),
                max_shard_size=self.max_shard_size, dtype=self.dtype,
                push_to_hub=self.push_to_hub, private=self.private,
            )
            return self.last_path

        return on_rank_zero(trainer, write, "vlm_lightning.merge_lora")

    def state_dict(self) -> dict:
        return {"last_path": str(self.last_path) if self.last_path else None}

    def load_state_dict(self, state_dict: dict) -> None:
        last = state_dict.get("last_path")
        self.last_path = Path(last) if last else None


def base_model_path(pl_module) -> str | None:
    """The 16-bit base a module was trained from (``hparams.model_name_or_path``), where a merge reloads it."""
    hp = getattr(pl_module, "hparams", None) or {}
    name = hp.get("model_name_or_path") if hasattr(hp, "get") else None
    return name or getattr(pl_module, "model_name_or_path", None)
