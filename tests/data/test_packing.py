"""Padding-free packing: per family, a packed micro-batch gives the same loss and gradients as the padded one
(fp32, CPU, tiny models); the data module batches by a token budget that counts image tokens; a row over the
budget is refused naming it; one packed SGD step through Lightning equals one padded step."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText

from vlm_lightning.data import VisionChatDataModule
from vlm_lightning.data.formats import normalize_row
from vlm_lightning.data.packing import pack_by_budget
from vlm_lightning.models.packing import PACKED_FAMILIES, SEQ_LENS, packed_inputs
from vlm_lightning.models.tiny import TINY_FAMILIES, make_tiny_vlm
from vlm_lightning.modules import VisionSFTModule

_RNG = np.random.RandomState(0)


def _img(w: int, h: int) -> Image.Image:
    return Image.fromarray(_RNG.randint(0, 255, (h, w, 3), dtype=np.uint8))


def _user(*parts):
    return {"role": "user", "content": [{"type": "image", "image": p} if isinstance(p, Image.Image)
                                        else {"type": "text", "text": p} for p in parts]}


# rows that differ where packing could go wrong: the image at another offset (system prompt, text first), a
# text-only row, two images in one row, two answers in one row; every length differs
ROWS = [normalize_row(r, i) for i, r in enumerate([
    {"messages": [_user(_img(56, 56), "Read."), {"role": "assistant", "content": "42"}]},
    {"messages": [{"role": "system", "content": "You are a careful reader of digits."},
                  _user("What number is written here?", _img(112, 56)), {"role": "assistant", "content": "1234"}]},
    {"messages": [_user("No image here, just say hello please."), {"role": "assistant", "content": "hello there"}]},
    {"messages": [_user(_img(56, 112), _img(56, 56), "Two?"), {"role": "assistant", "content": "7 and 8"}]},
    {"messages": [_user(_img(112, 56), "First digit?"), {"role": "assistant", "content": "3"},
                  _user("And the last?"), {"role": "assistant", "content": "9"}]},
])]


@pytest.fixture(scope="module")
def family_path(tiny_vlm_dir, tmp_path_factory):
    """family -> tiny model dir; Gemma 3 with a sliding window of 8 tokens, so that its sliding layers bite."""
    def get(family: str) -> str:
        if family == "gemma3":
            return str(make_tiny_vlm("gemma3", tmp_path_factory.mktemp("gemma3_w8"), text_config={"sliding_window": 8}))
        return str(tiny_vlm_dir(family))
    return get


def _loss_and_grads(module: VisionSFTModule, batch: dict) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    module.model.zero_grad(set_to_none=True)
    n = (batch["labels"][:, 1:] != -100).sum()
    loss, n_tokens = module.normalized_loss(batch, n)  # the SFT token mean over the batch's supervised tokens
    loss.backward()
    grads = {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}
    return loss.detach(), int(n_tokens), grads


def _assert_packed_equals_padded(path: str, rows=ROWS, **module_kwargs) -> dict[str, float]:
    dm = VisionChatDataModule(path, train=rows)
    padded, packed = dm.collator()(rows), dm.collator(packing=True)(rows)
    lengths = padded["attention_mask"].sum(1).tolist()
    assert packed["input_ids"].shape == (1, sum(lengths)) and sum(lengths) < padded["input_ids"].numel()  # no padding
    assert packed[SEQ_LENS].tolist() == lengths and "attention_mask" not in packed
    torch.manual_seed(0)
    module = VisionSFTModule(path, dtype="float32", gradient_checkpointing=False, **module_kwargs)
    module.configure_model()
    module.model.train()
    loss_pad, n_pad, g_pad = _loss_and_grads(module, padded)
    loss_pack, n_pack, g_pack = _loss_and_grads(module, packed)
    assert n_pack == n_pad > len(rows)
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-5)
    assert set(g_pack) == set(g_pad) and g_pad
    for k in g_pad:
        torch.testing.assert_close(g_pack[k], g_pad[k], rtol=1e-5, atol=1e-5, msg=k)
    # the check can fail: the same packed tokens as one sequence (no row boundaries) give other gradients
    joined = {k: v for k, v in packed.items() if k != SEQ_LENS}
    joined["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    _, _, g_joined = _loss_and_grads(module, joined)
    assert max(float((g_joined[k] - g_pad[k]).abs().max()) for k in g_pad) > 1e-3
    return {"loss": float((loss_pack - loss_pad).abs()),
            "grad": max(float((g_pack[k] - g_pad[k]).abs().max()) for k in g_pad)}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_packed_loss_and_gradients_equal_padded(family, family_path):
    """Full fine-tune (every weight trainable: vision tower, projector, decoder, embeddings, lm_head), fp32."""
    path = family_path(family)
    if family not in PACKED_FAMILIES:  # a family without exact packing refuses it, on the data and the model side
        with pytest.raises((NotImplementedError, ValueError), match="packing=True is not supported"):
            VisionChatDataModule(path, train=ROWS).collator(packing=True)(ROWS)
        packed = {"input_ids": torch.zeros(1, 4, dtype=torch.long), SEQ_LENS: torch.tensor([4])}
        with pytest.raises(NotImplementedError, match="packing=True is not supported"):
            packed_inputs(AutoModelForImageTextToText.from_pretrained(path), packed)
        return
    _assert_packed_equals_padded(path, lora=False)


def test_packed_equals_padded_with_kernels(family_path):
    """use_kernels=True (fused RMSNorm, M-RoPE, SwiGLU, fused linear cross-entropy) with LoRA: packing is exact
    there too (HF folds the per-row M-RoPE positions into cos/sin before the RoPE kernel; every other kernel
    works per token). Three rows keep the interpreted Triton kernels quick."""
    _assert_packed_equals_padded(family_path("qwen2_5_vl"), rows=ROWS[1:4], r=4, init_lora_weights=False,
                                 use_kernels=True)


# ----------------------------------------------------------------------------------------- the batches
def test_pack_by_budget_best_fit_decreasing():
    # 500 alone (12 left); 300 opens a pack (212 left); 120 and 90 fit there (2 left)
    assert pack_by_budget([300, 120, 500, 90], 512) == [[2], [0, 1, 3]]
    lengths = [random.Random(k).randint(1, 100) for k in range(200)]
    packs = pack_by_budget(lengths, 128)
    assert sorted(i for p in packs for i in p) == list(range(200))
    assert all(sum(lengths[i] for i in p) <= 128 for p in packs)
    assert len(packs) <= 2 * -(-sum(lengths) // 128)  # best fit never wastes half of every pack
    with pytest.raises(ValueError, match="129 tokens, over max_tokens=128"):
        pack_by_budget([10, 129], 128)


def test_datamodule_batches_by_token_budget_counting_image_tokens(family_path):
    path = family_path("qwen2_vl")
    dm = VisionChatDataModule(path, train=ROWS * 3, packing=True, max_tokens_per_batch=160, seed=1)
    dm.setup("fit")
    collator = dm.collator()
    image_id = collator.image_token_id
    lengths = [len(collator.encode_row(dm.datasets["train"][k]).input_ids) for k in range(len(ROWS) * 3)]
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.packs) < len(ROWS) * 3
    seen = []
    for batch, pack in zip(batches, [dm.packs[i] for i in dm.train_dataloader().sampler]):
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 160
        assert batch[SEQ_LENS].tolist() == [lengths[i] for i in pack]  # image placeholder tokens included
        seen += pack
    assert sorted(seen) == list(range(len(ROWS) * 3))  # every row once per epoch
    assert sum(int((b["input_ids"] == image_id).sum()) for b in batches) > 0
    assert VisionChatDataModule(path, train=ROWS, batch_size=4, max_length=64, packing=True).max_tokens_per_batch == 256
    with pytest.raises(ValueError, match="needs max_tokens_per_batch"):
        VisionChatDataModule(path, train=ROWS, packing=True)
    with pytest.raises(ValueError, match="train_for_generation batches are prompts"):
        VisionChatDataModule(path, train=ROWS, packing=True, max_tokens_per_batch=512, train_for_generation=True)


def test_row_over_the_budget_is_named_or_skipped(family_path):
    path = family_path("qwen2_vl")
    dm = VisionChatDataModule(path, train=ROWS, packing=True, max_tokens_per_batch=60)
    collator = dm.collator()
    over = [k for k, r in enumerate(ROWS) if len(collator.encode_row(r).input_ids) > 60]
    assert over and len(over) < len(ROWS)
    with pytest.raises(ValueError, match=rf"train split: row {over[0]}: \d+ tokens \(image tokens included\) exceed "
                                         r"max_tokens_per_batch=60"):
        dm.setup("fit")
    dm = VisionChatDataModule(path, train=ROWS, packing=True, max_tokens_per_batch=60, on_overlong="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(ROWS) - len(over) and dm.num_skipped["train"] == len(over)


def test_one_packed_sgd_step_equals_one_padded_step(family_path):
    """Through Lightning (training_step, the token-mean rescale before the optimizer step): the same rows
    as one pack or as one padded batch move the LoRA weights identically."""
    path = family_path("qwen2_vl")
    dm = VisionChatDataModule(path, train=ROWS)
    batches = {"padded": dm.collator()(ROWS), "packed": dm.collator(packing=True)(ROWS)}
    moved = {}
    for name, batch in batches.items():
        L.seed_everything(0)
        module = VisionSFTModule(path, dtype="float32", r=4, gradient_checkpointing=False, init_lora_weights=False,
                                 optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
        module.configure_model()
        before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module, DataLoader([batch], batch_size=None))
        moved[name] = {n: before[n] - p.detach() for n, p in module.model.named_parameters() if p.requires_grad}
    assert any(float(g.abs().max()) > 0 for g in moved["padded"].values())
    for n in moved["padded"]:
        torch.testing.assert_close(moved["packed"][n], moved["padded"][n], rtol=1e-5, atol=1e-5, msg=n)
