"""``gradient_checkpointing: lean | offload`` is refused, naming the option, when the Trainer runs several
processes (its recompute accumulates gradients inside the backward; tested on one device only)."""
from __future__ import annotations

import lightning as L
import pytest

from vlm_lightning.modules import VisionSFTModule


@pytest.mark.parametrize("mode", ["lean", "offload"])
def test_lean_and_offload_refuse_a_multi_process_trainer(tiny_vlm_dir, mode):
    module = VisionSFTModule(str(tiny_vlm_dir("qwen2_5_vl")), dtype="float32", gradient_checkpointing=mode)
    module.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                               enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=f"gradient_checkpointing='{mode}' runs on one device only"):
        module.configure_model()
    assert module.model is None  # refused before any weight was loaded


def test_offload_builds_on_one_device(tiny_vlm_dir):
    module = VisionSFTModule(str(tiny_vlm_dir("qwen2_5_vl")), dtype="float32", gradient_checkpointing="offload")
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False)
    module.configure_model()
    layer = module.hf_model.model.language_model.layers[0]
    assert layer._vlm_checkpoint[2] is True  # offload on
