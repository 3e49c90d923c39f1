"""Adapter-only checkpoints resume exactly: 6 steps straight == 3 steps + save + resume on a fresh base + 3
steps, for the adapter weights, the AdamW state, the LR schedule and the step counter (fp32, CPU, fixed
seed)."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from vlm_lightning.data import VisionChatDataModule
from vlm_lightning.demo.data import make_demo_ocr_dataset
from vlm_lightning.modules import VisionSFTModule


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _linear_decay(optimizer):
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=6)


def _module(path):
    return VisionSFTModule(path, dtype="float32", r=4, gradient_checkpointing=False, init_lora_weights=False,
                           finetune_vision_layers=True, optimizer=_adamw, scheduler=_linear_decay)


def _trainer(root, **kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, deterministic=True, **kw)


def test_three_plus_three_steps_equal_six(tiny_vlm_dir, tmp_path):
    path = str(tiny_vlm_dir("qwen2_vl"))
    paths = make_demo_ocr_dataset(tmp_path / "ocr", n_train=6, n_val=2)
    dm = VisionChatDataModule(path, train=str(paths["train"]), batch_size=2)
    dm.setup("fit")
    # one batch repeated: Lightning restarts a plain DataLoader from its first batch on resume (it warns; the
    # data position is only restored for stateful loaders), so equal batches keep this test about our state
    batch = dm.collator()([dm.datasets["train"][i] for i in range(2)])
    batches = [batch] * 3  # one epoch = 3 steps

    def loader():
        return DataLoader(batches, batch_size=None)

    L.seed_everything(0)
    straight = _module(path)
    t_straight = _trainer(tmp_path / "straight", max_steps=6, enable_checkpointing=False)
    t_straight.fit(straight, loader())

    L.seed_everything(0)
    first = _module(path)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=3)
    _trainer(tmp_path / "first", max_steps=3, callbacks=[ckpt_cb]).fit(first, loader())
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    trainable = {f"model.{n}" for n, p in first.model.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trainable  # adapter only: no frozen base weight in the file
    assert state["global_step"] == 3

    L.seed_everything(123)  # a different seed: the resumed LoRA must come from the checkpoint, not from init
    resumed = _module(path)
    t_resumed = _trainer(tmp_path / "resumed", max_steps=6, enable_checkpointing=False)
    t_resumed.fit(resumed, loader(), ckpt_path=ckpt)

    assert t_resumed.global_step == t_straight.global_step == 6
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and any(".visual." in n for n in a)
    for n in a:
        assert torch.equal(b[n], a[n]), (n, float((b[n] - a[n]).abs().max()), float(a[n].abs().max()))
    opt_a, opt_b = t_straight.optimizers[0], t_resumed.optimizers[0]
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] != 1e-2
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(a)
    for k in sa:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[k][field], sa[k][field], rtol=0, atol=0)
    # the frozen base is the same on both sides (restored from the model directory, never trained)
    base_a = {n: p for n, p in straight.model.named_parameters() if not p.requires_grad}
    base_b = dict(resumed.model.named_parameters())
    for n, p in base_a.items():
        assert torch.equal(p, base_b[n]), n
