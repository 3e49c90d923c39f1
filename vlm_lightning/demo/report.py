"""``DemoReport``: print the validation CER before and after training (the CPU demo's headline).

It scores nothing itself: it reads the scores of the ``OCRMetrics`` callback in the same Trainer (found in
``trainer.callbacks``; ``vlm_lightning.callbacks.ocr``): "before" comes from Lightning's sanity-check
validation pass (run ``OCRMetrics(on_sanity_check=True)`` with ``num_sanity_val_steps`` >= 1, so the
untrained model is scored on the same rows), "after" from the last validation. Prints on rank zero.

Example:
    >>> trainer = L.Trainer(callbacks=[OCRMetrics(on_sanity_check=True), DemoReport()], num_sanity_val_steps=1)
"""
from __future__ import annotations

import json
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..callbacks.ocr import OCRMetrics

__all__ = ["DemoReport"]


class DemoReport(L.Callback):
    """Before/after validation CER, exact match, a few predictions and the wall time of ``fit``.

    Args:
        num_examples: predictions shown from the last validation.
        save_adapter_to: when set, ``pl_module.save_adapter(dir)`` at the end of ``fit`` (the full model for
            ``lora: false``), so the run ends with something to load.
        torch_threads: ``torch.set_num_threads`` at setup (None: leave it). The CPU demo uses 1: on 2 cores
            shared with other work, 2 intra-op threads (torch's default there) measured 2,100-2,650 ms a step
            against 350-450 ms for 1 (machine load 4-5), and the data loader's worker has the other core.
    """

    def __init__(self, num_examples: int = 6, save_adapter_to: str | None = None, torch_threads: int | None = None):
        self.num_examples = num_examples
        self.save_adapter_to = save_adapter_to
        self.torch_threads = torch_threads
        self.before: dict | None = None
        self.after: dict | None = None
        self._t0 = 0.0

    def _ocr(self, trainer) -> OCRMetrics:
        found = [c for c in trainer.callbacks if isinstance(c, OCRMetrics)]
        if not found:
            raise RuntimeError("DemoReport needs the OCRMetrics callback in trainer.callbacks")
        return found[0]

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._ocr(trainer)

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.before = dict(self._ocr(trainer).last_scores.get("val", {})) or None
        if self.before:
            self._print(f"[demo] before training: val CER {self.before['cer']:.3f}, "
                        f"exact match {self.before['exact_match']:.3f}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.after = dict(self._ocr(trainer).last_scores.get("val", {})) or None

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.save_adapter_to and hasattr(pl_module, "save_adapter"):
            pl_module.save_adapter(self.save_adapter_to)
        minutes = (time.perf_counter() - self._t0) / 60
        lines = [f"[demo] fit took {minutes:.1f} min, {trainer.global_step} steps"]
        if self.before and self.after:
            lines.append(f"[demo] validation CER {self.before['cer']:.3f} -> {self.after['cer']:.3f}, exact match "
                         f"{self.before['exact_match']:.3f} -> {self.after['exact_match']:.3f} "
                         "(validation images are never trained on)")
        ocr = self._ocr(trainer)
        if ocr.last_predictions_file and ocr.last_predictions_file.exists():
            rows = [json.loads(x) for x in ocr.last_predictions_file.read_text().splitlines()[: self.num_examples]]
            lines += [f"    reference {r['reference']!r:>8}   prediction {r['prediction']!r}" for r in rows]
            lines.append(f"[demo] all predictions: {ocr.last_predictions_file}")
        if self.save_adapter_to:
            lines.append(f"[demo] model saved to {self.save_adapter_to}")
        self._print("\n".join(lines))

    @rank_zero_only
    def _print(self, text: str) -> None:
        print(text, flush=True)

    def state_dict(self) -> dict:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = state_dict.get("before")
