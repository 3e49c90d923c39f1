"""Turn normalised conversation rows into model-ready batches with assistant-only labels.

One row: template (``labels.render_chat``), load its images, run the processor, label the assistant answers
(``labels.assistant_token_labels``), mask every vision special token, truncate if it may. Then pad and stack.
Family facts (image token, vision tokens, smallest image side, ``mm_token_type_ids``, the expected image
feature count) are asked of ``vlm_lightning.models.families``. Image and vision special tokens and padding
are always ``-100``.

Example:
    >>> collator = VisionChatCollator(processor, max_length=1024)
    >>> batch = collator([normalize_row({"image": "a.png", "text": "42"}, 0)])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlm_lightning.models import families
from vlm_lightning.models.hf import IGNORE_INDEX
from vlm_lightning.models.packing import SEQ_LENS, packed_position_ids

from .fetch import MAX_IMAGE_BYTES, FetchBudget
from .formats import RowFormatError
from .images import ImageFetchTimeout, ImageLoadError, load_image
from .labels import assistant_token_labels, fold_system_turn, render_chat, strip_image_refs, text_of

log = logging.getLogger(__name__)

_TOKEN_LEVEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class OverlongRowError(ValueError):
    """A row longer than ``max_length`` that cannot be truncated without cutting an image or all answers."""


@dataclass
class EncodedRow:
    """One row after templating and processing (1-D tensors, no padding).

    ``vision`` holds the processor's image outputs for this row (pixel_values, image_grid_thw,
    image_sizes, ...), empty for a text-only row.
    """

    index: int
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), -100 where not supervised
    token_extras: dict[str, torch.Tensor]  # token_type_ids / mm_token_type_ids, (T,) each
    vision: dict[str, torch.Tensor]
    images: list[Image.Image]
    num_image_tokens: int  # count of the image token in input_ids
    expected_image_tokens: int | None  # features the vision tower produces for the images, if known
    full_length: int  # length before truncation
    truncated: bool
    prompt: str = ""
    reference: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class VisionChatCollator:
    """Collate normalised rows (see ``data/formats.py``) into a batch for a VLM forward or ``generate``.

    Training mode returns ``input_ids``, ``attention_mask``, ``labels`` (right padded) and the family's
    vision inputs (``pixel_values`` + ``image_grid_thw`` | ``image_sizes``, ``mm_token_type_ids`` for
    Qwen-VL, ``token_type_ids`` for Gemma 3). ``for_generation=True`` returns left-padded prompts (up to
    the generation prompt of the last assistant turn) plus ``references`` (that turn's text),
    ``row_index``, ``images`` and ``prompts``. ``packing=True`` (training only) returns the rows back to back
    as one sequence instead (``pack``): no padding, ``seq_lens`` and ``position_ids`` restarting per row.

    Rows longer than ``max_length`` lose their text tail; a row whose cut would touch an image (or, in
    training, remove every answer token) raises ``OverlongRowError``, or is dropped and counted in
    ``num_skipped`` with ``on_overlong="skip"``. ``on_bad_example="skip"`` does the same for rows whose
    images fail to load (``num_timeouts`` counts those whose URL timed out). A batch whose rows were all
    dropped collates to ``None``. Image URLs: ``image_timeout_s`` per attempt (two attempts), bodies up to
    ``max_image_bytes``, and ``image_fetch_budget_s`` seconds that failing fetches may cost this collator's
    split in all (``fetch_budget``; then its further URLs fail at once).

    Example:
        >>> collator = VisionChatCollator(processor, max_length=1024)
        >>> batch = collator([normalize_row({"image": "a.png", "text": "42"}, 0)])
        >>> loss = model(**batch).loss
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        train_on_responses_only: bool = True,
        for_generation: bool = False,
        on_overlong: str = "raise",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        base_dir: str | None = None,
        on_bad_example: str = "raise",
        min_image_side: int | None = None,
        image_timeout_s: float = 10.0,
        image_fetch_budget_s: float = 120.0,
        max_image_bytes: int | None = MAX_IMAGE_BYTES,
        packing: bool = False,
    ):
        if packing and families.uses_cross_attention(processor):
            raise ValueError("packing=True is not supported for Llama 3.2 Vision (mllama): its images reach the text "
                             "through a per-row cross_attention_mask, which a packed sequence cannot carry")
        if packing and for_generation:
            raise ValueError("packing=True packs teacher-forced rows; prompt-only (for_generation) batches are padded")
        if on_overlong not in ("raise", "skip"):
            raise ValueError(f"on_overlong={on_overlong!r}: expected 'raise' or 'skip'")
        if on_bad_example not in ("raise", "skip"):
            raise ValueError(f"on_bad_example={on_bad_example!r}: expected 'raise' or 'skip'")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length={max_length} must be positive")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.train_on_responses_only = train_on_responses_only
        self.for_generation = for_generation
        self.packing = packing
        self.on_overlong = on_overlong
        self.on_bad_example = on_bad_example
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.base_dir = base_dir
        self.min_image_side = min_image_side if min_image_side is not None else families.min_image_side(processor)
        self.image_timeout_s = image_timeout_s
        self.max_image_bytes = max_image_bytes
        self.fetch_budget = FetchBudget(image_fetch_budget_s)
        self.num_skipped = 0
        self.num_timeouts = 0
        self.skipped: list[tuple[int, str]] = []  # (row index, reason), capped at 100 entries
        self.image_token_id = families.image_token_id(processor)
        self.vision_token_ids = families.vision_token_ids(processor)
        self.needs_mm_token_type_ids = families.needs_mm_token_type_ids(processor)
        self.cross_attention = families.uses_cross_attention(processor)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)

    # ------------------------------------------------------------------------------------------ batch

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        encoded = []
        for row in rows:
            try:
                encoded.append(self.encode_row(row))
            except OverlongRowError as e:
                if self.on_overlong == "raise":
                    raise
                self._skip(row, e)
            except (ImageLoadError, RowFormatError) as e:
                if self.on_bad_example == "raise":
                    raise
                self._skip(row, e)
        if not encoded:
            return None
        return self.pack(encoded) if self.packing else self.pad_and_stack(encoded)

    def _skip(self, row: Mapping[str, Any], err: Exception) -> None:
        self.num_skipped += 1
        self.num_timeouts += isinstance(err, ImageFetchTimeout)
        if len(self.skipped) < 100:
            self.skipped.append((row.get("index", -1), str(err)))
        log.warning("skipping row %s: %s", row.get("index", "?"), err)

    def pad_and_stack(self, encoded: Sequence[EncodedRow]) -> dict[str, Any]:
        """Pad per-row tensors (left for generation, right for training) and concatenate vision inputs."""
        left = self.for_generation
        length = max(len(e.input_ids) for e in encoded)
        extra_keys = sorted({k for e in encoded for k in e.token_extras})
        batch: dict[str, Any] = {
            "input_ids": _pad([e.input_ids for e in encoded], length, self.pad_token_id, left),
            "attention_mask": _pad([torch.ones_like(e.input_ids) for e in encoded], length, 0, left),
        }
        for k in extra_keys:
            vals = [e.token_extras.get(k, torch.zeros_like(e.input_ids)) for e in encoded]
            batch[k] = _pad(vals, length, 0, left)
        if not self.for_generation:
            batch["labels"] = _pad([e.labels for e in encoded], length, IGNORE_INDEX, left)
        batch.update(_row_vision_inputs(encoded, length, left) if self.cross_attention else _vision_inputs(encoded))
        if self.for_generation:
            batch["references"] = [e.reference for e in encoded]
            batch["row_index"] = [e.index for e in encoded]
            batch["images"] = [e.images for e in encoded]
            batch["prompts"] = [e.prompt for e in encoded]
        return batch

    def pack(self, encoded: Sequence[EncodedRow]) -> dict[str, Any]:
        """The rows back to back as one sequence, no padding (``packing=True``; ``models/packing.py`` turns it into
        the family's forward kwargs): ``input_ids``, ``labels`` and token extras (1, T), ``position_ids`` (1, T)
        restarting at 0 per row, ``seq_lens`` (R,), and the vision inputs exactly as ``pad_and_stack`` gives them.
        No ``attention_mask``: the row boundaries are ``seq_lens``. Each row's first label is -100, as position 0
        of a padded row is never a target, so the last token of a row never learns the next row's first."""
        lens = torch.tensor([len(e.input_ids) for e in encoded])  # (R,)
        labels = [torch.cat([e.labels.new_full((1,), IGNORE_INDEX), e.labels[1:]]) for e in encoded]
        batch: dict[str, Any] = {
            "input_ids": torch.cat([e.input_ids for e in encoded])[None],  # (1, T)
            "labels": torch.cat(labels)[None],  # (1, T)
            "position_ids": packed_position_ids(lens),  # (1, T)
            SEQ_LENS: lens,
        }
        for k in sorted({k for e in encoded for k in e.token_extras}):
            batch[k] = torch.cat([e.token_extras.get(k, torch.zeros_like(e.input_ids)) for e in encoded])[None]
        batch.update(_vision_inputs(encoded))
        return batch

    # -------------------------------------------------------------------------------------------- row

    def encode_row(self, row: Mapping[str, Any]) -> EncodedRow:
        """Template, load images, tokenize and label one row; raises with the row index on bad input."""
        index = int(row.get("index", -1))
        messages = list(row["messages"])
        reference = None
        if self.for_generation:
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is not None:
                reference = text_of(messages[last])
                messages = messages[:last]
        images = [
            load_image(
                p["image"], row_index=index, base_dir=self.base_dir, min_pixels=self.min_pixels,
                max_pixels=self.max_pixels, min_side=self.min_image_side, timeout=self.image_timeout_s,
                max_bytes=self.max_image_bytes, budget=self.fetch_budget,
            )
            for m in messages for p in m["content"] if p["type"] == "image"
        ]
        template_messages = strip_image_refs(messages)
        if self.cross_attention and images:
            template_messages = fold_system_turn(template_messages)
        text = render_chat(self.processor, template_messages, add_generation_prompt=self.for_generation)
        add_special = not _starts_with_bos(text, self.tokenizer)
        proc_kwargs = dict(text=[text], return_tensors="pt", add_special_tokens=add_special)
        if images:
            proc_kwargs["images"] = images
        try:
            out = self.processor(**proc_kwargs)
        except ValueError as e:
            raise RowFormatError(f"row {index}: the processor rejected the row: {e}") from e
        input_ids = out["input_ids"][0].long()
        token_extras = {k: out[k][0].long() for k in ("token_type_ids", "mm_token_type_ids") if k in out}
        if self.needs_mm_token_type_ids and "mm_token_type_ids" not in token_extras:
            token_extras["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        vision = {k: v for k, v in out.items() if k not in _TOKEN_LEVEL_KEYS and isinstance(v, torch.Tensor)}

        if self.for_generation:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        elif self.train_on_responses_only:
            labels = assistant_token_labels(self.processor, template_messages, text, add_special, input_ids, index)
        else:
            labels = input_ids.clone()
        labels[torch.isin(input_ids, self.vision_token_ids)] = IGNORE_INDEX

        n_img_tokens = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        full_length = len(input_ids)
        truncated = False
        if self.max_length is not None and full_length > self.max_length:
            input_ids, labels, token_extras = self._truncate(input_ids, labels, token_extras, index, full_length)
            vision = {k: v[:, : self.max_length] if k in families.TOKEN_LEVEL_VISION_KEYS else v
                      for k, v in vision.items()}
            truncated = True
        enc = EncodedRow(
            index=index, input_ids=input_ids, labels=labels, token_extras=token_extras, vision=vision,
            images=images, num_image_tokens=n_img_tokens,
            expected_image_tokens=families.expected_image_tokens(self.processor, vision, len(images)),
            full_length=full_length, truncated=truncated, prompt=text, reference=reference,
        )
        if not self.for_generation and enc.num_supervised == 0:
            if truncated:
                raise OverlongRowError(
                    f"row {index}: truncating {full_length} tokens to max_length={self.max_length} "
                    "leaves no assistant token to train on"
                )
            raise RowFormatError(
                f"row {index}: no supervised tokens (no assistant turn, or the chat template renders "
                "assistant turns in a way that could not be located)"
            )
        return enc

    def _truncate(self, input_ids, labels, token_extras, index: int, full_length: int):
        keep = self.max_length
        vision_pos = torch.nonzero(torch.isin(input_ids, self.vision_token_ids)).flatten()
        for v in token_extras.values():  # token_type_ids / mm_token_type_ids mark image spans as well
            vision_pos = torch.cat([vision_pos, torch.nonzero(v).flatten()])
        if self.for_generation or (len(vision_pos) and int(vision_pos.max()) >= keep):
            what = "the prompt (generation mode never cuts prompts)" if self.for_generation else "an image span"
            raise OverlongRowError(
                f"row {index}: {full_length} tokens exceed max_length={keep} and truncation would cut {what}; "
                "raise max_length, lower max_pixels, or use on_overlong='skip'"
            )
        return input_ids[:keep], labels[:keep], {k: v[:keep] for k, v in token_extras.items()}


# ------------------------------------------------------------------------------------------- helpers


def _starts_with_bos(text: str, tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def _pad(seqs: Sequence[torch.Tensor], length: int, value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if left:
            out[i, length - len(s):] = s
        else:
            out[i, : len(s)] = s
    return out


def _vision_inputs(encoded: Sequence[EncodedRow]) -> dict[str, torch.Tensor]:
    """Every row's vision inputs, concatenated in row order (pixel_values, image_grid_thw, image_sizes, ...)."""
    keys = dict.fromkeys(k for e in encoded for k in e.vision)
    return {k: _cat_padded([e.vision[k] for e in encoded if k in e.vision]) for k in keys}


def _row_vision_inputs(encoded: Sequence[EncodedRow], length: int, left: bool) -> dict[str, torch.Tensor]:
    """Vision inputs of a cross-attention family (Llama 3.2 Vision): one entry per row (dim 0), rows without an
    image get zeros (aspect ratio id 0 = no image, an all-zero cross-attention mask), ``cross_attention_mask``
    (B, T, images, tiles) padded along the tokens like ``input_ids``. None when no row has an image."""
    keys = list(dict.fromkeys(k for e in encoded for k in e.vision))
    out = {}
    for k in keys:
        like = next(e.vision[k] for e in encoded if k in e.vision)  # (1, ...)
        token_level = k in families.TOKEN_LEVEL_VISION_KEYS
        rows = []
        for e in encoded:
            t = e.vision.get(k)
            if t is None:
                shape = (1, len(e.input_ids), *like.shape[2:]) if token_level else tuple(like.shape)
                t = like.new_zeros(shape)
            if token_level and t.shape[1] < length:  # pad the token axis as input_ids was padded
                pad = t.new_zeros((1, length - t.shape[1], *t.shape[2:]))
                t = torch.cat([pad, t] if left else [t, pad], 1)
            rows.append(t)
        out[k] = _cat_padded(rows)
    return out


def _cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (anyres patches, image sizes)."""
    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(list(tensors), 0)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        p = t.new_zeros((t.shape[0], *shape))
        p[(slice(None),) + tuple(slice(0, s) for s in t.shape[1:])] = t
        padded.append(p)
    return torch.cat(padded, 0)
