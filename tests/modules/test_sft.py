"""VisionSFTModule: the loss equals transformers' own, gradient accumulation gives the exact token mean of
the whole window, checkpoints hold only trainable weights, generate works on left-padded prompts."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vlm_lightning.data import VisionChatDataModule
from vlm_lightning.demo.data import make_demo_ocr_dataset
from vlm_lightning.models.hf import model_inputs
from vlm_lightning.modules import VisionSFTModule


@pytest.fixture(scope="module")
def qwen_data(tiny_vlm_dir, tmp_path_factory):
    """(model dir, datamodule over 8 demo OCR rows: 2-4 digit answers, so rows differ in length)."""
    path = str(tiny_vlm_dir("qwen2_vl"))
    paths = make_demo_ocr_dataset(tmp_path_factory.mktemp("ocr"), n_train=8, n_val=4)
    dm = VisionChatDataModule(path, train=str(paths["train"]), val=str(paths["val"]), batch_size=4)
    dm.setup("fit")
    return path, dm


def _module(path, **kw):
    kw.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=1.0))
    return VisionSFTModule(path, dtype="float32", r=4, gradient_checkpointing=False, init_lora_weights=False, **kw)


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


def _lora(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_loss_equals_transformers_loss(qwen_data):
    path, dm = qwen_data
    module = _module(path)
    module.configure_model()
    batch = dm.collator()([dm.datasets["train"][i] for i in range(4)])
    n = (batch["labels"][:, 1:] != -100).sum()
    ours, n_ours = module.normalized_loss(batch, n)
    theirs = module.model(**model_inputs(batch), labels=batch["labels"]).loss
    assert int(n_ours) == int(n) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch(qwen_data):
    """2 micro-batches of 1 and 3 rows (different lengths and token counts), accumulate_grad_batches=2,
    make the same SGD step as the 4 rows in one batch. A mean of per-micro-batch means would not."""
    path, dm = qwen_data
    rows = [dm.datasets["train"][i] for i in range(4)]
    collate = dm.collator()
    micro = [collate(rows[:1]), collate(rows[1:])]
    whole = [collate(rows)]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]

    def step(batches, accumulate):
        L.seed_everything(0)
        module = _module(path)
        module.configure_model()
        before = _lora(module)
        _trainer(max_steps=1, accumulate_grad_batches=accumulate).fit(module, DataLoader(batches, batch_size=None))
        return {n: before[n] - p for n, p in _lora(module).items()}  # = gradient (SGD, lr 1)

    g_micro, g_whole = step(micro, 2), step(whole, 1)
    assert any(g.abs().sum() > 0 for g in g_whole.values())
    for name in g_whole:
        torch.testing.assert_close(g_micro[name], g_whole[name], rtol=1e-4, atol=1e-6, msg=name)
    # the naive per-micro-batch mean weighs tokens differently whenever the counts differ
    assert counts[0] != counts[1], counts


def test_checkpoint_holds_only_trainable_weights(qwen_data, tmp_path):
    path, dm = qwen_data
    module = _module(path)
    trainer = _trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trainable and all("lora_" in k for k in trainable)
    assert state["vlm_lightning"]["adapter_only"] and state["vlm_lightning"]["peft_config"]["r"] == 4
    # restores onto a fresh base; hparams need no HF objects
    fresh = VisionSFTModule.load_from_checkpoint(ckpt)
    for k, v in _lora(fresh).items():
        torch.testing.assert_close(v, dict(module.model.named_parameters())[k], rtol=0, atol=0)
    # a checkpoint that lacks a trainable weight is refused
    state["state_dict"].pop(next(iter(state["state_dict"])))
    with pytest.raises(RuntimeError, match="missing trainable keys"):
        VisionSFTModule(path, dtype="float32", r=4).load_state_dict(state["state_dict"])


def test_generate_left_padded_and_save_adapter(qwen_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    path, dm = qwen_data
    module = _module(path)
    module.configure_model()
    gen = dm.collator(for_generation=True)([dm.datasets["val"][i] for i in range(3)])
    texts = module.generate(gen, max_new_tokens=3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    right = dm.collator()([dm.datasets["val"][i] for i in range(3)])
    if not bool(right["attention_mask"][:, -1].all()):
        with pytest.raises(ValueError, match="left-padded"):
            module.generate(right)
    out = module.save_adapter(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path), out)
    ours = dict(module.model.named_parameters())
    for n, p in reloaded.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, ours[n], rtol=0, atol=0)


def test_use_kernels_gives_the_same_loss_and_gradients(qwen_data):
    """use_kernels=True: apply_kernels + the fused linear cross-entropy; same loss and LoRA gradients as the
    plain path (fp32; Triton runs under TRITON_INTERPRET=1, else the kernels' torch fallback)."""
    path, dm = qwen_data
    batch = dm.collator()([dm.datasets["train"][i] for i in range(4)])
    n = (batch["labels"][:, 1:] != -100).sum()
    results = []
    for use_kernels in (False, True):
        L.seed_everything(0)
        module = _module(path, use_kernels=use_kernels)
        module.configure_model()
        loss, _ = module.normalized_loss(batch, n)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in module.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for k in results[0][1]:
        torch.testing.assert_close(results[1][1][k], results[0][1][k], rtol=1e-3, atol=1e-5, msg=k)
