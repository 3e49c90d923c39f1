"""A callback for the kill-and-resume test: at the start of a given optimizer step it writes a marker file and
waits, so the test can `kill -9` the fit at a known point (after the checkpoint of the step before)."""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class PauseAt(L.Callback):
    def __init__(self, step: int, marker: str, seconds: float = 600.0):
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(self.seconds)
