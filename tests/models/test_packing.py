"""The forward kwargs of a packed batch: positions restart per row, Qwen-VL's M-RoPE index is each row's own
``get_rope_index``, Gemma 3's masks keep image tokens bidirectional inside their image and never cross a row.
(Loss and gradient exactness per family: ``tests/data/test_packing.py``.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from vlm_lightning.data import VisionChatDataModule
from vlm_lightning.data.formats import normalize_row
from vlm_lightning.models.packing import SEQ_LENS, forward_inputs, packed_inputs, packed_position_ids
from vlm_lightning.models.tiny import make_tiny_vlm


def test_packed_position_ids_restart_per_row():
    assert packed_position_ids(torch.tensor([3, 1, 2])).tolist() == [[0, 1, 2, 0, 0, 1]]


def test_mrope_position_ids_are_each_rows_own_rope_index(tiny_vlm_dir):
    path = str(tiny_vlm_dir("qwen2_vl"))
    rng = np.random.RandomState(0)
    img = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((112, 56), (56, 56))]
    rows = [normalize_row(r, i) for i, r in enumerate([
        {"messages": [{"role": "user", "content": "text only, first"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "image": img[0]},
                                                   {"type": "image", "image": img[1]}]},
                      {"role": "assistant", "content": "12"}]},
    ])]
    dm = VisionChatDataModule(path, train=rows)
    padded, packed = dm.collator()(rows), dm.collator(packing=True)(rows)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    pos = packed_inputs(model, packed)["position_ids"]  # (4, 1, T): text positions, then t / h / w
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
    ref, _ = model.model.get_rope_index(**{k: padded[k] for k in keys})  # (3, 2, T_pad)
    lens = packed[SEQ_LENS].tolist()
    assert pos.shape == (4, 1, sum(lens))
    assert pos[0].tolist() == packed_position_ids(packed[SEQ_LENS]).tolist()
    assert torch.equal(pos[1:, 0, :lens[0]], ref[:, 0, :lens[0]])
    assert torch.equal(pos[1:, 0, lens[0]:], ref[:, 1, :lens[1]])
    assert int(pos[2, 0, lens[0]:].max()) < lens[1] - 1  # the image rows really carry 2-D positions
    # a padded batch passes through untouched
    assert set(forward_inputs(model, padded)) == set(padded) - {"labels"}


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = make_tiny_vlm("gemma3", tmp_path_factory.mktemp("gemma3_w2"), text_config={"sliding_window": 2})
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def test_gemma3_masks_keep_images_bidirectional_inside_rows(gemma3):
    # row 0: t i i t (image at 1-2), row 1: i i t t (image at 4-5, its row's start); T = 8
    types = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "token_type_ids": types,
             SEQ_LENS: torch.tensor([4, 4]), "position_ids": packed_position_ids(torch.tensor([4, 4]))}
    inputs = packed_inputs(gemma3, batch)
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    row = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    image = torch.tensor([-1, 0, 0, -1, 1, 1, -1, -1])
    q, kv = torch.arange(8)[:, None], torch.arange(8)[None, :]
    full = (row[:, None] == row[None, :]) & ((kv <= q) | ((image[:, None] == image[None, :]) & (image[:, None] >= 0)))
    sliding = full & (kv > q - 2)
    for name, expected in (("full_attention", full), ("sliding_attention", sliding)):
        mask = inputs["attention_mask"][name][0, 0]  # (T, T): bool (SDPA) or additive (eager)
        allowed = mask if mask.dtype == torch.bool else mask == 0
        assert torch.equal(allowed, expected), name
    assert bool(full[1, 2]) and not bool(full[4, 3]) and not bool(sliding[3, 1])  # image sees ahead; rows apart
