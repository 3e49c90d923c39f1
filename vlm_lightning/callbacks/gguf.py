"""`GGUFExport`: at the end of `fit`, merge the LoRA (if `MergeLoRA` has not already) and write GGUF files.

A thin callback over `vlm_lightning.export` (`merge_lora`, `to_gguf`, `push_folder`); rank-zero work and
gathering from a sharded run are `vlm_lightning.distributed.gather`'s. It reuses the folder of a `MergeLoRA`
callback in the same Trainer (found in `trainer.callbacks`; Lightning runs callbacks in list order, so put
`MergeLoRA` first) instead of merging twice.

Example (YAML):
    trainer:
      callbacks:
        - class_path: vlm_lightning.callbacks.GGUFExport
          init_args: {out_dir: runs/ocr/gguf, quants: [q8_0]}
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

from ..distributed.gather import exportable_source, on_rank_zero
from ..export.gguf import GGUF_QUANTS, to_gguf
from ..export.hub import push_folder
from ..export.merge import merge_lora
from .merge import MergeLoRA, base_model_path

__all__ = ["GGUFExport"]


class GGUFExport(Callback):
    """Write `<name>-<quant>.gguf` + `mmproj-<name>-f16.gguf` for llama.cpp when `fit` ends.

    Uses the folder of a `MergeLoRA` callback in the same Trainer when there is one (it runs first);
    otherwise merges into `<out_dir>/merged` itself. Global rank zero writes; other ranks wait.

    Args:
        out_dir: folder for the GGUF files.
        quants: one or more of f16, bf16, f32, q8_0, q4_k_m, q5_k_m, q6_k (K-quants need llama-cpp-python
            or `llama-quantize`).
        name: file name stem (default: the merged folder's name).
        merged_dir: an existing merged folder to convert instead of merging.
        dtype: dtype of the merge this callback makes itself.
        mmproj_quant: f16 (default) or f32 for the vision tower + projector.
        mmproj: write the mmproj (False: the text model only).
        approximate_mmproj: LLaVA-NeXT only: write its mmproj although llama.cpp's image token layout differs
            from the model's (``export.gguf.llava_next``); without it LLaVA-NeXT needs ``mmproj=False``.
        at_fit_end: export when `fit` ends (`export(trainer, pl_module)` exports on demand).
        push_to_hub: Hub repo id for the GGUF files (token from `HF_TOKEN`); private: make it private.

    Example:
        >>> trainer = L.Trainer(callbacks=[MergeLoRA("runs/demo/merged"),
        ...                                GGUFExport("runs/demo/gguf", quants=["q8_0"])])  # doctest: +SKIP
    """

    def __init__(
        self,
        out_dir: str,
        quants: str | list[str] = "q8_0",
        name: str | None = None,
        merged_dir: str | None = None,
        dtype: str = "bfloat16",
        mmproj_quant: str = "f16",
        mmproj: bool = True,
        approximate_mmproj: bool = False,
        at_fit_end: bool = True,
        push_to_hub: str | None = None,
        private: bool = True,
    ):
        self.quants = [quants] if isinstance(quants, str) else list(quants)
        bad = [q for q in self.quants if q.lower() not in GGUF_QUANTS]
        if bad or not self.quants:
            raise ValueError(f"GGUFExport quants={self.quants}: choose from {', '.join(GGUF_QUANTS)}")
        self.out_dir, self.name = Path(out_dir), name
        self.merged_dir = Path(merged_dir) if merged_dir else None
        self.dtype, self.mmproj_quant, self.at_fit_end = dtype, mmproj_quant, at_fit_end
        self.push_to_hub, self.private = push_to_hub, private
        self.mmproj, self.approximate_mmproj = mmproj, approximate_mmproj
        self.written: dict[str, dict[str, Path]] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and not getattr(trainer, "fast_dev_run", False):
            self.export(trainer, pl_module)

    def _existing_merge(self, trainer) -> Path | None:
        if self.merged_dir is not None:
            return self.merged_dir
        for cb in trainer.callbacks:
            if isinstance(cb, MergeLoRA) and cb.last_path is not None and Path(cb.last_path).is_dir():
                return Path(cb.last_path)
        return None

    def export(self, trainer, pl_module) -> dict[str, dict[str, Path]]:
        """Export now; returns {quant: {"model": path, "mmproj": path}} on rank zero ({} elsewhere)."""
        merged = self._existing_merge(trainer) if trainer.is_global_zero else None
        has_merge = bool(trainer.strategy.broadcast(merged is not None, src=0))
        # collective under FSDP / ZeRO-3: every rank helps gather the adapter when a merge is needed
        source = None if has_merge else exportable_source(trainer, pl_module, self.out_dir / "adapter_gathered")

        def write() -> None:
            folder = merged
            if folder is None:
                folder = merge_lora(source, self.out_dir / "merged", dtype=self.dtype,
                                    processor=getattr(pl_module, "processor", None),
                                    base_name_or_path=base_model_path(pl_module))
            for i, q in enumerate(self.quants):
                self.written[q] = to_gguf(folder, self.out_dir, quant=q, name=self.name, mmproj=self.mmproj and i == 0,
                                          approximate_mmproj=self.approximate_mmproj,
                                          mmproj_quant=self.mmproj_quant)
            if self.push_to_hub:
                push_folder(self.out_dir, self.push_to_hub, private=self.private, allow_patterns=["*.gguf"],
                            commit_message="Upload GGUF files (vlm-lightning)")

        on_rank_zero(trainer, write, "vlm_lightning.gguf_export")
        return dict(self.written)

    def state_dict(self) -> dict:
        return {"written": {q: {k: str(v) for k, v in d.items()} for q, d in self.written.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.written = {q: {k: Path(v) for k, v in d.items()} for q, d in state_dict.get("written", {}).items()}

