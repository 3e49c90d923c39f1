"""Shared by the rollout tests: a left-padded prompt batch of two rows with images on a tiny VLM, and HF
``generate``'s greedy tokens and per-step logits as the reference (import as ``tests.rollout.prompts``)."""
from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_lightning.data.collate import VisionChatCollator


def prompt_rows(n=2):
    """n prompts of different lengths (so the batch is left padded), one small image each."""
    rows = []
    for i in range(n):
        img = Image.new("RGB", (56 + 28 * (i % 2), 56), (255 - 40 * i, 200, 255))
        text = "Read it." + " Carefully please." * (2 * i)
        rows.append({"index": i, "messages": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]})
    return rows


def load_tiny(path):
    """(fp32 eval model, processor, tensor inputs of a left-padded two-prompt batch)."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    batch = VisionChatCollator(processor, for_generation=True)(prompt_rows())
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    assert (inputs["attention_mask"] == 0).any(), "the test batch should be left padded"
    return model, processor, inputs


def hf_greedy(model, inputs, g, max_new_tokens, eos, pad):
    """HF generate on the tiled batch (tile order), raw logits of every step."""
    tiled = {k: torch.cat([v] * g, 0) for k, v in inputs.items()}
    out = model.generate(**tiled, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                         pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, tiled["input_ids"].shape[1]:]
    return tokens, torch.stack([x.float() for x in out.logits], 1)


def pad_id(processor):
    tok = getattr(processor, "tokenizer", processor)
    return tok.pad_token_id if tok.pad_token_id is not None else 0
