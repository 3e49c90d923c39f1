"""Assistant-only labels for any chat template: assistant character spans -> token labels.

The conversation is rendered once in full, and for each assistant turn ``k`` twice more, as the prefix up
to turn ``k`` with the generation prompt and as the prefix including turn ``k``. The characters between the
two (trailing whitespace dropped) are the turn's answer plus its end-of-turn marker (``<|im_end|>``,
``<end_of_turn>``, ``</s>``). When a template rewrites earlier turns (Pixtral moves the system prompt to the
last user turn) the answer is found by text search instead. Character spans become token spans through the
tokenizer's offsets on the unexpanded text, which is then aligned to the processor's expanded ``input_ids``
(each image placeholder grown to its feature tokens) with a diff, so the processor stays the one source of
truth for image tokens. Masking vision tokens, padding and truncation are the collator's (``collate.py``).

Example:
    >>> messages = strip_image_refs(row["messages"])
    >>> full = render_chat(processor, messages, add_generation_prompt=False)
    >>> labels = assistant_token_labels(processor, messages, full, True, input_ids, row_index=0)   # (T,)
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlm_lightning.models.hf import IGNORE_INDEX

from .formats import RowFormatError


def text_of(message: Mapping[str, Any]) -> str:
    """The text parts of a message, joined."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if p.get("type") == "text")


def strip_image_refs(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages for the chat template: image parts become bare ``{"type": "image"}``; a system turn of text parts
    becomes one string (Llama 3.2 Vision's template writes ``messages[0]['content']|trim``, a list's repr)."""
    out = []
    for m in messages:
        parts = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]}
                 for p in m["content"]]
        if m["role"] == "system" and all(p["type"] == "text" for p in parts):
            out.append({"role": "system", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": m["role"], "content": parts})
    return out


def fold_system_turn(messages: list[dict]) -> list[dict]:
    """The system turn's text moved to the front of the first user turn. Llama 3.2 Vision's template refuses a
    system turn in a conversation with images; the collator folds it (the usual workaround), so ``system_prompt``
    works for every row."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    first = dict(messages[1], content=[{"type": "text", "text": text_of(messages[0]).strip() + "\n\n"},
                                       *messages[1]["content"]])
    return [first, *messages[2:]]


def render_chat(processor: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text (the processor's template, else its tokenizer's)."""
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    out = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return out[0] if isinstance(out, list) else out


def assistant_char_spans(processor: Any, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of every assistant turn's answer + end-of-turn marker in ``full``."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(processor, messages[:k], add_generation_prompt=True) if k else ""
        upto = render_chat(processor, messages[: k + 1], add_generation_prompt=False)
        if full.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix) >= cursor:
            start, end = len(prefix), len(upto.rstrip())
        else:  # the template rewrote earlier turns: find the answer by text search
            start, end = _search_span(text_of(m).strip(), upto, full, cursor)
        if end > start:
            spans.append((start, end))
            cursor = end
    return spans


def assistant_token_labels(processor: Any, messages: list[dict], full: str, add_special: bool,
                           input_ids: torch.Tensor, row_index: int) -> torch.Tensor:
    """(T,) labels for the processor's ``input_ids`` (T,): the token id on assistant answer tokens, else
    ``IGNORE_INDEX``. Raises ``RowFormatError`` naming the row when the answer cannot be aligned."""
    spans = assistant_char_spans(processor, messages, full)
    tokenizer = getattr(processor, "tokenizer", processor)
    enc = tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
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
        raise RowFormatError(f"row {row_index}: could not align assistant tokens with the processor's input_ids")
    return labels


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
