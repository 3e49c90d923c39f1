"""VisionChatCollator on every tiny family: golden label masks, forward losses, image-token counts,
mixed and multi-image batches, left padding for generation, and overlong rows."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from vlm_lightning.data import FormatOptions, OverlongRowError, RowFormatError, VisionChatCollator
from vlm_lightning.data.formats import normalize_row
from vlm_lightning.data.labels import fold_system_turn, render_chat, strip_image_refs
from vlm_lightning.models.hf import IGNORE_INDEX
from vlm_lightning.models.tiny import TINY_FAMILIES

# End-of-turn marker each family's template closes an assistant turn with (trained as part of the answer).
END_OF_TURN = {
    "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "gemma3": "<end_of_turn>",
    "llava_next": "</s>", "pixtral": "</s>", "mistral3": "</s>", "mistral3_small": "</s>", "mllama": "<|eot_id|>",
}


@functools.cache
def _load(path: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return processor, model


@pytest.fixture(params=TINY_FAMILIES)
def family(request, tiny_vlm_dir):
    try:
        path = tiny_vlm_dir(request.param)
    except NotImplementedError as e:
        pytest.skip(str(e))
    processor, model = _load(str(path))
    return request.param, processor, model


def _image(w, h, color=(200, 30, 30)):
    img = Image.new("RGB", (w, h), (250, 250, 250))
    img.paste(Image.new("RGB", (w // 2, h // 2), color), (w // 4, h // 4))
    return img


def _two_turn(index=0, system="Be brief."):
    return normalize_row({"messages": [
        {"role": "user", "content": [{"type": "image", "image": _image(112, 56)},
                                     {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Done."},
    ]}, index, FormatOptions(system_prompt=system))


def _text_only(index=1):
    return normalize_row({"messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "hello there"}]}, index)


def _multi_image(index=2):
    return normalize_row({"messages": [
        {"role": "user", "content": [{"type": "image", "image": _image(112, 56)},
                                     {"type": "image", "image": _image(56, 84, (0, 0, 200))},
                                     {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "No."},
    ]}, index)


def _spans(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs, cur = [], []
    for v in labels.tolist():
        if v == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(v)
    return runs + ([cur] if cur else [])


# ----------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no-system", "system"])
def test_golden_label_mask_two_turns(family, system):
    name, processor, _ = family
    collator = VisionChatCollator(processor)
    batch = collator([_two_turn(system=system)])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    eot = END_OF_TURN[name]
    decoded = [processor.tokenizer.decode(run).strip() for run in _spans(labels)]
    assert decoded == [f"42{eot}", f"Done.{eot}"]
    sup = labels != IGNORE_INDEX
    assert torch.equal(labels[sup], ids[sup])  # every label is -100 or its own input id
    assert not torch.isin(ids[sup], collator.vision_token_ids).any()


def test_vision_and_pad_positions_never_supervised(family):
    _, processor, _ = family
    collator = VisionChatCollator(processor)
    batch = collator([_two_turn(), _text_only(), _multi_image()])
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (labels[torch.isin(ids, collator.vision_token_ids)] == IGNORE_INDEX).all()
    assert ((labels == IGNORE_INDEX) | (labels == ids)).all()
    assert ((labels != IGNORE_INDEX).sum(1) > 0).all()
    # right padding: every row's real tokens start at position 0
    assert (mask[:, 0] == 1).all()


def test_train_on_all_tokens_still_masks_vision_and_pad(family):
    _, processor, _ = family
    collator = VisionChatCollator(processor, train_on_responses_only=False)
    batch = collator([_two_turn(), _text_only()])
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    vision = torch.isin(ids, collator.vision_token_ids)
    assert torch.equal(labels != IGNORE_INDEX, (mask == 1) & ~vision)


def test_no_assistant_turn_raises_in_training(family):
    _, processor, _ = family
    row = normalize_row({"messages": [{"role": "user", "content": "hello?"}]}, 12)
    with pytest.raises(RowFormatError, match="row 12: no supervised tokens"):
        VisionChatCollator(processor)([row])


# ---------------------------------------------------------------------------------------- forward


def test_mixed_multi_image_batch_forward_finite_loss(family):
    name, processor, model = family
    batch = VisionChatCollator(processor)([_two_turn(), _text_only(), _multi_image()])
    if name.startswith("qwen"):
        assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == processor.image_token_id).long())
    if name == "gemma3":
        assert "token_type_ids" in batch
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_image_tokens_per_row_equal_vision_features(family):
    """Per row: image tokens in input_ids == the processor's feature count, and the model's own check
    (it raises "Image features and image tokens do not match") passes on that row alone."""
    _, processor, model = family
    collator = VisionChatCollator(processor)
    for row in (_two_turn(), _multi_image(), _text_only()):
        enc = collator.encode_row(row)
        assert enc.num_image_tokens == enc.expected_image_tokens
        with torch.no_grad():
            assert torch.isfinite(model(**collator.pad_and_stack([enc])).loss)


def test_qwen_multi_image_pixel_values_split_by_grid(tiny_vlm_dir):
    processor, _ = _load(str(tiny_vlm_dir("qwen2_vl")))
    enc = VisionChatCollator(processor).encode_row(_multi_image())
    grid = enc.vision["image_grid_thw"]
    assert grid.shape == (2, 3) and not torch.equal(grid[0], grid[1])  # two sizes
    assert enc.vision["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert enc.num_image_tokens == int(grid.prod(-1).sum()) // processor.image_processor.merge_size**2


# ------------------------------------------------------------------------------------- generation


def test_generation_batch_left_padded_prompt_only(family):
    name, processor, _ = family
    rows = [_text_only(), _two_turn()]
    batch = VisionChatCollator(processor, for_generation=True)(rows)
    assert batch["references"] == ["hello there", "Done."]
    assert batch["row_index"] == [1, 0]
    assert [len(x) for x in batch["images"]] == [0, 1]
    assert "labels" not in batch
    mask = batch["attention_mask"]
    short = int(mask.sum(1).argmin())  # the text-only row, or the image row where text rows get a system turn
    assert (mask[:, -1] == 1).all() and mask[short, 0] == 0  # left padding; the short row is padded
    pad = VisionChatCollator(processor).pad_token_id
    assert (batch["input_ids"][mask == 0] == pad).all()
    # the prompt ends exactly where the assistant's answer would start
    for prompt, row in zip(batch["prompts"], rows):
        assert "Done." not in prompt and "hello there" not in prompt
        messages = strip_image_refs(row["messages"])
        if name == "mllama" and any(p["type"] == "image" for m in row["messages"] for p in m["content"]):
            messages = fold_system_turn(messages)  # its template refuses a system turn with images
        full = render_chat(processor, messages, add_generation_prompt=False)
        assert full.startswith(prompt.rstrip()) or name in ("pixtral",)  # pixtral moves the system prompt


def test_left_padded_greedy_generation_matches_unbatched(family):
    name, processor, model = family
    rows = [_text_only(), _two_turn()]
    collator = VisionChatCollator(processor, for_generation=True)
    meta = ("references", "row_index", "images", "prompts")

    def gen(batch):
        inputs = {k: v for k, v in batch.items() if k not in meta}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=collator.pad_token_id)
        return out[:, inputs["input_ids"].shape[1]:]

    batched = gen(collator(rows))
    for i, row in enumerate(rows):
        single = gen(collator([row]))[0]
        assert torch.equal(batched[i][: len(single)], single), f"{name}: row {i} differs under left padding"


# --------------------------------------------------------------------------------------- overlong


def _late_image_row(index, n_words):
    """A row whose image comes in a second turn after ``n_words`` words, so its span ends late."""
    return normalize_row({"messages": [
        {"role": "user", "content": "the cat " * n_words},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image", "image": _image(112, 56)}, {"type": "text", "text": "Read."}]},
        {"role": "assistant", "content": "42"}]}, index)


def test_overlong_cutting_an_image_raises_or_skips(family):
    _, processor, _ = family
    base = VisionChatCollator(processor)
    text_len = len(base.encode_row(_text_only()).input_ids)
    enc = base.encode_row(_late_image_row(7, 30))
    last_vision = int(torch.nonzero(torch.isin(enc.input_ids, base.vision_token_ids)).max())
    assert last_vision > text_len
    short = last_vision  # cuts inside (or right at the end of) the image span
    n = len(enc.input_ids)
    with pytest.raises(OverlongRowError, match=rf"row 7: {n} tokens exceed max_length={short}.*image span"):
        VisionChatCollator(processor, max_length=short)([_late_image_row(7, 30)])
    skipping = VisionChatCollator(processor, max_length=short, on_overlong="skip")
    batch = skipping([_late_image_row(7, 30), _text_only()])
    assert skipping.num_skipped == 1 and skipping.skipped[0][0] == 7
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch
    assert skipping([_late_image_row(7, 30)]) is None and skipping.num_skipped == 2


def test_overlong_text_tail_is_truncated_never_the_image(family):
    _, processor, model = family
    base = VisionChatCollator(processor)
    full = base.encode_row(_two_turn())
    first_eot = int(torch.nonzero(full.labels != IGNORE_INDEX).flatten()[2])  # keeps a few answer tokens
    keep = first_eot + 1
    collator = VisionChatCollator(processor, max_length=keep)
    batch = collator([_two_turn()])
    assert batch["input_ids"].shape[1] == keep
    assert torch.equal(batch["input_ids"][0], full.input_ids[:keep])
    assert torch.equal(batch["labels"][0], full.labels[:keep])
    enc = collator.encode_row(_two_turn())
    assert enc.truncated and enc.full_length == len(full.input_ids)
    assert enc.num_image_tokens == full.num_image_tokens
    for k in ("mm_token_type_ids", "token_type_ids"):
        if k in batch:
            assert batch[k].shape == batch["input_ids"].shape
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_truncation_removing_every_answer_raises(family):
    _, processor, _ = family
    base = VisionChatCollator(processor)
    full = base.encode_row(_two_turn(index=3))
    first_sup = int(torch.nonzero(full.labels != IGNORE_INDEX).min())
    with pytest.raises(OverlongRowError, match="row 3: .*no assistant token"):
        VisionChatCollator(processor, max_length=first_sup)([_two_turn(index=3)])


def test_generation_never_truncates_prompt(family):
    _, processor, _ = family
    with pytest.raises(OverlongRowError, match="row 1: .*generation mode never cuts prompts"):
        VisionChatCollator(processor, max_length=3, for_generation=True)([_text_only()])


def test_bad_image_skip_counts(family, tmp_path):
    _, processor, _ = family
    bad = normalize_row({"image": str(tmp_path / "missing.png"), "text": "x"}, 5)
    with pytest.raises(ValueError, match="row 5: .*file not found"):
        VisionChatCollator(processor)([bad])
    collator = VisionChatCollator(processor, on_bad_example="skip")
    batch = collator([bad, _text_only()])
    assert collator.num_skipped == 1 and batch["input_ids"].shape[0] == 1


def test_mllama_system_prompt_rendered_as_text_and_folded_with_images(tiny_vlm_dir):
    """Llama 3.2 Vision: a text-only row's system prompt lands in its system turn as text (its template trims
    ``messages[0]['content']``, which would print a list's repr); with an image it is folded into the user turn."""
    processor, _ = _load(str(tiny_vlm_dir("mllama")))
    collator = VisionChatCollator(processor)
    text_row = normalize_row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                             0, FormatOptions(system_prompt="Be brief."))
    assert "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|>" in collator.encode_row(text_row).prompt
    image_prompt = collator.encode_row(_two_turn(system="Be brief.")).prompt
    assert "<|start_header_id|>system" not in image_prompt
    assert "<|start_header_id|>user<|end_header_id|>\n\nBe brief.\n\n<|image|>Read it.<|eot_id|>" in image_prompt
