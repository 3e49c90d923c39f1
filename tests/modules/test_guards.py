"""The module's guards (CPU, tiny Qwen2-VL): a processor whose image-token id differs from the model config's
fails at setup, naming both; a NaN/inf loss or gradient norm stops SFT and GRPO training (naming the global step
and the rows) before the optimizer step, so no checkpoint is written after the bad step; ``nan_guard=False``
trains on. Non-finite values come from real hooks (a callback that poisons a weight or a gradient), not mocks."""
from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.modules.test_grpo import _module as _grpo_module
from tests.modules.test_grpo import _rows as _grpo_rows
from vlm_lightning.data import VisionChatDataModule
from vlm_lightning.data.collate import VisionChatCollator
from vlm_lightning.demo.data import make_demo_ocr_dataset
from vlm_lightning.modules import NonFiniteError, VisionSFTModule


@pytest.fixture(scope="module")
def qwen_dir(tiny_vlm_dir):
    return tiny_vlm_dir("qwen2_vl")


@pytest.fixture(scope="module")
def ocr_paths(tmp_path_factory):
    return make_demo_ocr_dataset(tmp_path_factory.mktemp("ocr"), n_train=8, n_val=2)


def _sft(path, **kw):
    return VisionSFTModule(str(path), dtype="float32", r=4, gradient_checkpointing=False, init_lora_weights=False,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kw)


def _trainer(tmp_path, callbacks=(), max_steps=4, checkpoints=False):
    cbs = list(callbacks)
    if checkpoints:
        cbs.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1))
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=checkpoints, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=max_steps,
                     callbacks=cbs, default_root_dir=tmp_path)


class PoisonWeight(Callback):
    """At the start of the batch of global step ``step``, set one LoRA B weight to inf."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in pl_module.model.named_parameters() if "lora_B" in n).fill_(float("inf"))


class PoisonGrad(Callback):
    """After the backward of global step ``step``, set one gradient entry to NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            next(p for p in pl_module.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


# ------------------------------------------------------------------------------------- image-token mismatch
def _mismatched_copy(src, dst):
    """A copy of the tiny model whose config's image_token_id is the video token's id."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["image_token_id"] != cfg["video_token_id"]
    cfg["image_token_id"] = cfg["video_token_id"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return cfg["video_token_id"]


def test_image_token_mismatch_with_the_data_processor_fails_at_setup(qwen_dir, ocr_paths, tmp_path):
    wrong = _mismatched_copy(qwen_dir, tmp_path / "model")
    dm = VisionChatDataModule(str(qwen_dir), train=str(ocr_paths["train"]), batch_size=4)
    module = _sft(tmp_path / "model")
    right = VisionChatCollator(dm.get_processor()).image_token_id
    with pytest.raises(ValueError, match="image token mismatch") as err:
        _trainer(tmp_path, max_steps=1).fit(module, dm)
    msg = str(err.value)
    assert f"image token id {right}" in msg and f"image_token_id={wrong}" in msg
    assert "data module's processor" in msg and str(tmp_path / "model") in msg
    assert module.global_step == 0


def test_image_token_mismatch_with_its_own_processor_fails_at_configure_model(qwen_dir, tmp_path):
    wrong = _mismatched_copy(qwen_dir, tmp_path / "model")
    with pytest.raises(ValueError, match=rf"processor loaded from .* has image_token_id={wrong}"):
        _sft(tmp_path / "model").configure_model()


# ------------------------------------------------------------------------------------------------ NaN guard
def test_sft_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(qwen_dir, ocr_paths, tmp_path):
    dm = VisionChatDataModule(str(qwen_dir), train=str(ocr_paths["train"]), batch_size=4)
    with pytest.raises(NonFiniteError, match="non-finite loss .* at global step 2") as err:
        _trainer(tmp_path, [PoisonWeight(step=2)], checkpoints=True).fit(_sft(qwen_dir), dm)
    assert "nan_guard=False" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) == ["epoch=0-step=1.ckpt",
                                                                        "epoch=0-step=2.ckpt"]


def test_sft_non_finite_gradient_norm_stops(qwen_dir, ocr_paths, tmp_path):
    dm = VisionChatDataModule(str(qwen_dir), train=str(ocr_paths["train"]), batch_size=4)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm .* at global step 1"):
        _trainer(tmp_path, [PoisonGrad(step=1)], checkpoints=True).fit(_sft(qwen_dir), dm)
    assert [p.name for p in (tmp_path / "ckpt").glob("*.ckpt")] == ["epoch=0-step=1.ckpt"]


def test_sft_nan_guard_off_trains_on(qwen_dir, ocr_paths, tmp_path):
    dm = VisionChatDataModule(str(qwen_dir), train=str(ocr_paths["train"]), batch_size=4)
    trainer = _trainer(tmp_path, [PoisonWeight(step=1)], max_steps=3)
    trainer.fit(_sft(qwen_dir, nan_guard=False), dm)
    assert trainer.global_step == 3


def _grpo_fit(module, tmp_path, callbacks):
    loader = torch.utils.data.DataLoader(_grpo_rows(4), batch_size=2,
                                         collate_fn=VisionChatCollator(module.processor, for_generation=True))
    _trainer(tmp_path, callbacks, max_steps=4).fit(module, loader)


def test_grpo_non_finite_gradient_norm_names_step_and_rows(qwen_dir, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm .* at global step 1, batch rows \[2, 3\]"):
        _grpo_fit(_grpo_module(qwen_dir), tmp_path, [PoisonGrad(step=1)])


def test_grpo_non_finite_loss_names_step_and_rows(qwen_dir, tmp_path):
    """The weight is poisoned by the optimizer step of iteration 1; iteration 2 of the same rollout (no
    second generation) computes a non-finite loss."""

    class PoisonAtStep(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            with torch.no_grad():
                next(p for n, p in pl_module.model.named_parameters() if "lora_B" in n).fill_(float("inf"))

    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at global step 1, batch rows \[0, 1\]"):
        _grpo_fit(_grpo_module(qwen_dir, num_iterations=2), tmp_path, [PoisonAtStep()])
