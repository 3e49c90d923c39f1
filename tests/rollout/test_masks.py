"""Completion masking (vlm_lightning.rollout.masks), the one implementation both rollout paths use: EOS kept,
stop strings cut exactly, truncation, forbidden (vision placeholder) ids reject the whole row."""
from __future__ import annotations

import torch
from transformers import AutoProcessor

from vlm_lightning.losses.grpo import mask_truncated_completions
from vlm_lightning.rollout.masks import completion_mask_from_ids, completion_masks, finish_completions

T = torch.tensor


def test_completion_mask_up_to_first_eos_and_truncation():
    # eos ids {2, 3}; row 0 ends at pos 1, row 1 at pos 2 (the second eos id), row 2 never: truncated
    ids = T([[5, 2, 2, 0], [5, 6, 3, 2], [5, 6, 7, 8]])
    mask, trunc = completion_mask_from_ids(ids, [2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert trunc.tolist() == [False, False, True]
    masked = mask_truncated_completions(mask, trunc)
    assert masked.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    # an EOS in the first position is still a (one-token) completion
    m, t = completion_mask_from_ids(T([[2, 9, 9]]), 2)
    assert m.tolist() == [[1, 0, 0]] and t.tolist() == [False]


def test_completion_masks_eos_stop_strings_and_truncation(tiny_vlm_dir):
    tok = AutoProcessor.from_pretrained(tiny_vlm_dir("qwen2_vl")).tokenizer
    a = tok("hello world", add_special_tokens=False).input_ids
    b = tok("the answer</a> tail", add_special_tokens=False).input_ids
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    width = max(len(a), len(b)) + 3
    rows = [a + [eos] + [5] * (width - len(a) - 1), b + [7] * (width - len(b)), [9] * width]
    tokens = torch.tensor(rows)
    ids, mask, trunc = completion_masks(tokens, [eos], pad_token_id=0, stop_strings=["</a>"], tokenizer=tok)
    assert mask[0].sum() == len(a) + 1 and int(ids[0, len(a)]) == eos and (ids[0, len(a) + 1:] == 0).all()
    end_b = int(mask[1].sum())
    assert "</a>" in tok.decode(ids[1, :end_b]) and "</a>" not in tok.decode(ids[1, : end_b - 1])
    assert trunc.tolist() == [False, False, True] and mask[2].all() and ids.shape[1] == width


def test_finish_completions_rejects_forbidden_ids_and_decodes_the_kept_text(tiny_vlm_dir):
    tok = AutoProcessor.from_pretrained(tiny_vlm_dir("qwen2_vl")).tokenizer
    eos, img = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|image_pad|>")
    a, b, pad = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2"), tok.pad_token_id
    tokens = T([[a, b, eos, a], [a, img, eos, a], [a, b, a, b], [a, eos, img, img]])
    ids, mask, trunc, rejected, texts = finish_completions(tokens, [eos], pad_token_id=pad, tokenizer=tok,
                                                           forbidden_ids=[img])
    assert mask.sum(1).tolist() == [3, 0, 4, 2]  # row 1 rejected: fully masked
    assert rejected.tolist() == [False, True, False, False]  # a placeholder after the end does not count
    assert trunc.tolist() == [False, False, True, False]  # a rejected row is never "truncated"
    assert (ids[1] == pad).all() and ids[3].tolist() == [a, eos, pad, pad]
    assert texts == ["12", "", "1212", "1"]  # special tokens skipped
    ids2, mask2, trunc2, rejected2, texts2 = finish_completions(tokens, [eos], pad_token_id=pad)
    assert texts2 is None and not rejected2.any() and mask2.sum(1).tolist() == [3, 3, 4, 2]
