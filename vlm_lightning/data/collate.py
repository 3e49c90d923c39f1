"""Turn normalised conversation rows into model-ready batches with assistant-only labels.

How labels are found, for any chat template: the conversation is rendered once in full, and for each
assistant turn ``k`` twice more, as the prefix up to turn ``k`` with the generation prompt and as the
prefix including turn ``k``. The characters between the two (trailing whitespace dropped) are the
turn's answer plus its end-of-turn marker (``<|im_end|>``, ``<end_of_turn>``, ``</s>``). When a
template rewrites earlier turns (Pixtral moves the system prompt to the last user turn) the answer is
found by text search instead. Character spans become token spans through the tokenizer's offsets on
the unexpanded text, which is then aligned to the processor's expanded ``input_ids`` (each image
placeholder grown to its feature tokens) with a diff, so the processor stays the one source of truth
for image tokens. Image and vision special tokens and padding are always ``-100``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .formats import RowFormatError
from .images import DEFAULT_MIN_SIDE, ImageLoadError, load_image

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_TOKEN_LEVEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# Spellings of vision special tokens across families; only those in the tokenizer's vocab are used.
_VISION_TOKEN_STRINGS = (
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>",
    "<image>", "<video>", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)
_VISION_TOKEN_ATTRS = (
    "image_token", "video_token", "boi_token", "eoi_token", "image_break_token", "image_end_token",
    "vision_start_token", "vision_end_token",
)


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
    ``row_index``, ``images`` and ``prompts``.

    Rows longer than ``max_length`` lose their text tail; a row whose cut would touch an image (or, in
    training, remove every answer token) raises ``OverlongRowError``, or is dropped and counted in
    ``num_skipped`` with ``on_overlong="skip"``. ``on_bad_example="skip"`` does the same for rows whose
    images fail to load. A batch whose rows were all dropped collates to ``None``.

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
    ):
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
        self.on_overlong = on_overlong
        self.on_bad_example = on_bad_example
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.base_dir = base_dir
        self.min_image_side = min_image_side if min_image_side is not None else _family_min_side(processor)
        self.num_skipped = 0
        self.skipped: list[tuple[int, str]] = []  # (row index, reason), capped at 100 entries
        self.image_token_id = _image_token_id(processor)
        self.vision_token_ids = _vision_token_ids(processor, self.tokenizer)
        self.needs_mm_token_type_ids = _needs_mm_token_type_ids(processor)
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
        return self.pad_and_stack(encoded)

    def _skip(self, row: Mapping[str, Any], err: Exception) -> None:
        self.num_skipped += 1
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
        vision_keys = [k for k in dict.fromkeys(k for e in encoded for k in e.vision)]
        for k in vision_keys:
            batch[k] = _cat_padded([e.vision[k] for e in encoded if k in e.vision])
        if self.for_generation:
            batch["references"] = [e.reference for e in encoded]
            batch["row_index"] = [e.index for e in encoded]
            batch["images"] = [e.images for e in encoded]
            batch["prompts"] = [e.prompt for e in encoded]
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
                reference = _text_of(messages[last])
                messages = messages[:last]
        images = [
            load_image(
                p["image"], row_index=index, base_dir=self.base_dir, min_pixels=self.min_pixels,
                max_pixels=self.max_pixels, min_side=self.min_image_side,
            )
            for m in messages for p in m["content"] if p["type"] == "image"
        ]
        template_messages = _strip_image_refs(messages)
        text = self._render(template_messages, add_generation_prompt=self.for_generation)
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
            labels = self._assistant_labels(template_messages, text, add_special, input_ids, index)
        else:
            labels = input_ids.clone()
        labels[torch.isin(input_ids, self.vision_token_ids)] = IGNORE_INDEX

        n_img_tokens = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        full_length = len(input_ids)
        truncated = False
        if self.max_length is not None and full_length > self.max_length:
            input_ids, labels, token_extras = self._truncate(input_ids, labels, token_extras, index, full_length)
            truncated = True
        enc = EncodedRow(
            index=index, input_ids=input_ids, labels=labels, token_extras=token_extras, vision=vision,
            images=images, num_image_tokens=n_img_tokens,
            expected_image_tokens=expected_image_tokens(self.processor, vision, len(images)),
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

    # ----------------------------------------------------------------------------------------- labels

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        out = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return out[0] if isinstance(out, list) else out

    def assistant_char_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans of every assistant turn's answer + end-of-turn marker in ``full``."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._render(messages[:k], add_generation_prompt=True) if k else ""
            upto = self._render(messages[: k + 1], add_generation_prompt=False)
            if full.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix) >= cursor:
                start, end = len(prefix), len(upto.rstrip())
            else:  # the template rewrote earlier turns: find the answer by text search
                start, end = _search_span(_text_of(m).strip(), upto, full, cursor)
            if end > start:
                spans.append((start, end))
                cursor = end
        return spans

    def _assistant_labels(self, messages, full: str, add_special: bool, input_ids: torch.Tensor, index: int):
        spans = self.assistant_char_spans(messages, full)
        enc = self.tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
        plain_ids = list(enc["input_ids"])
        supervised = [False] * len(plain_ids)
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e > s and any(s < b and e > a for a, b in spans):
                supervised[t] = True
        # plain_ids has one placeholder per image; input_ids has it expanded to the feature tokens.
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        ids = input_ids.tolist()
        matcher = difflib.SequenceMatcher(None, ids, plain_ids, autojunk=False)
        for i, j, n in matcher.get_matching_blocks():
            for d in range(n):
                if supervised[j + d]:
                    labels[i + d] = ids[i + d]
        if sum(supervised) and not (labels != IGNORE_INDEX).any():
            raise RowFormatError(f"row {index}: could not align assistant tokens with the processor's input_ids")
        return labels


# ------------------------------------------------------------------------------------------- helpers


def _text_of(message: Mapping[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if p.get("type") == "text")


def _strip_image_refs(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages for the chat template: image parts become bare ``{"type": "image"}``."""
    out = []
    for m in messages:
        parts = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]} for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return out


def _search_span(answer: str, upto: str, full: str, cursor: int) -> tuple[int, int]:
    """Span of ``answer`` + its end-of-turn suffix (as rendered at the end of ``upto``) in ``full``."""
    tail = upto.rstrip()
    pos_in_upto = tail.rfind(answer) if answer else len(tail)
    if pos_in_upto < 0:
        return 0, 0
    rendered = tail[pos_in_upto:]  # answer + end-of-turn marker
    start = full.find(rendered, cursor)
    if start < 0:
        return 0, 0
    return start, start + len(rendered)


def _starts_with_bos(text: str, tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def _image_token_id(processor) -> int | None:
    """Id of the token that stands for one vision feature (Gemma 3's processor names its <start_of_image>
    marker ``image_token``; the feature token is the tokenizer's ``<image_soft_token>``)."""
    tok = getattr(processor, "tokenizer", None)
    tid = getattr(tok, "image_token_id", None) if tok is not None else None
    if not isinstance(tid, int):
        tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None) is not None:
        tok = getattr(processor, "tokenizer", processor)
        tid = tok.convert_tokens_to_ids(processor.image_token)
    return None if tid is None else int(tid)


def _vision_token_ids(processor, tokenizer) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    strings = set(_VISION_TOKEN_STRINGS)
    strings.update(s for a in _VISION_TOKEN_ATTRS if isinstance(s := getattr(processor, a, None), str))
    ids = {vocab[s] for s in strings if s in vocab}
    tid = _image_token_id(processor)
    if tid is not None:
        ids.add(tid)
    return torch.tensor(sorted(ids), dtype=torch.long)


def _family_min_side(processor) -> int:
    """Smallest image side the family's vision tower can use: one (merged) patch."""
    ip = getattr(processor, "image_processor", None)
    if getattr(ip, "merge_size", None) and getattr(ip, "patch_size", None):  # Qwen-VL: patch 14 x merge 2
        return int(ip.patch_size) * int(ip.merge_size)
    if getattr(processor, "patch_size", None):  # LLaVA-NeXT, Pixtral, Mistral 3
        return int(processor.patch_size) * int(getattr(processor, "spatial_merge_size", None) or 1)
    if hasattr(processor, "image_seq_length"):  # Gemma 3: one SigLIP patch
        return 14
    return DEFAULT_MIN_SIDE


def _needs_mm_token_type_ids(processor) -> bool:
    if "mm_token_type_ids" in (getattr(processor, "model_input_names", None) or []):
        return True
    return type(processor).__name__.startswith("Qwen")


def expected_image_tokens(processor, vision: Mapping[str, torch.Tensor], num_images: int) -> int | None:
    """Number of features the vision tower yields for one row's images, from the processor's outputs.

    Qwen-VL: ``prod(image_grid_thw) / merge_size**2``; Pixtral/Mistral 3: one per (merged) patch of each
    ``image_sizes`` entry; LLaVA-NeXT: the anyres feature count incl. newline tokens; Gemma 3: a fixed
    ``image_seq_length`` per image. ``None`` when the family is unknown.
    """
    if num_images == 0:
        return 0
    ip = getattr(processor, "image_processor", None)
    if "image_grid_thw" in vision:
        merge = int(getattr(ip, "merge_size", 2))
        return int(vision["image_grid_thw"].prod(-1).sum()) // merge**2
    if hasattr(processor, "image_seq_length") and "image_sizes" not in vision:  # Gemma 3
        return int(processor.image_seq_length) * int(vision["pixel_values"].shape[0])
    if "image_sizes" in vision and hasattr(processor, "_get_number_of_features"):  # LLaVA-NeXT
        h, w = vision["pixel_values"].shape[-2:]
        total = 0
        for oh, ow in vision["image_sizes"].tolist():
            n = processor._get_number_of_features(int(oh), int(ow), int(h), int(w))
            if getattr(processor, "vision_feature_select_strategy", "default") == "default":
                n -= 1
            total += n
        return total
    if "image_sizes" in vision and getattr(processor, "patch_size", None):  # Pixtral / Mistral 3
        merge = int(getattr(processor, "spatial_merge_size", None) or 1)
        step = int(processor.patch_size) * merge
        return sum((int(h) // step) * (int(w) // step) for h, w in vision["image_sizes"].tolist())
    return None


def _pad(seqs: Sequence[torch.Tensor], length: int, value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if left:
            out[i, length - len(s):] = s
        else:
            out[i, : len(s)] = s
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
