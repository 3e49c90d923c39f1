"""Normalise dataset rows to one conversation form.

Every accepted row format becomes::

    {"index": int,
     "messages": [{"role": "system" | "user" | "assistant",
                   "content": [{"type": "image", "image": <ref>} | {"type": "text", "text": str}]}],
     **extra_columns}

where ``<ref>`` is anything :func:`vlm_lightning.data.images.load_image` accepts (path, URL, base64,
bytes, PIL image, ``{"bytes", "path"}`` dict). Images are *not* loaded here.

Accepted formats (``format="auto"`` picks one per row):

- ``"messages"`` (HF / TRL): ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
  {"type": "text", "text": "Read the text."}]}, {"role": "assistant", "content": "42"}]}``.
  Image parts may be bare ``{"type": "image"}`` placeholders filled in order from an ``images`` column;
  string content may hold ``<image>`` tags (also filled from ``images``).
- ``"llava"``: ``{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
  {"from": "gpt", "value": "A cat."}]}``; ``images`` (a list) for several ``<image>`` tags.
- ``"image_text"`` (OCR / captioning): ``{"image": "a.png", "text": "42"}`` with a configurable instruction.
- ``"vqa"``: ``{"image": "a.png", "question": "How many?", "answer": "3"}``; ``answers`` may be a list: the
  first is the assistant text, all are kept in the ``answers`` extra column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import may_be_base64

IMAGE_TAG = "<image>"
DEFAULT_INSTRUCTION = "Read the text in the image."
FORMATS = ("auto", "messages", "llava", "image_text", "vqa")

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}
_IMAGE_COLUMNS = ("images", "image", "image_path", "image_url", "img", "file_name")
_TEXT_COLUMNS = ("text", "caption", "ocr", "transcription", "label")
_QUESTION_COLUMNS = ("question", "query", "prompt")
_ANSWER_COLUMNS = ("answers", "answer", "response")


class RowFormatError(ValueError):
    """A dataset row that cannot be normalised; the message names the row index."""


@dataclass
class FormatOptions:
    """How to read rows. Column names of ``None`` mean "detect from the usual names".

    Example:
        >>> opts = FormatOptions(instruction="Transcribe the digits.", system_prompt="Be terse.")
        >>> row = normalize_row({"image": "a.png", "text": "42"}, 0, opts)
        >>> row["messages"][-1]
        {'role': 'assistant', 'content': [{'type': 'text', 'text': '42'}]}
    """

    format: str = "auto"
    system_prompt: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    image_column: str | None = None
    text_column: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    base_dir: str | None = None  # relative image paths resolve against this folder

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not one of {FORMATS}")


def detect_format(row: Mapping[str, Any], opts: FormatOptions | None = None) -> str:
    """Return the format name of ``row`` ("messages", "llava", "image_text" or "vqa")."""
    opts = opts or FormatOptions()
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        conv = row["conversations"]
        if conv and isinstance(conv[0], Mapping) and "role" in conv[0]:
            return "messages"
        return "llava"
    if _pick(row, opts.question_column, _QUESTION_COLUMNS) is not None:
        return "vqa"
    if _pick(row, opts.image_column, _IMAGE_COLUMNS) is not None and (
        _pick(row, opts.text_column, _TEXT_COLUMNS) is not None
    ):
        return "image_text"
    raise RowFormatError(
        f"cannot detect the format of a row with columns {sorted(row)}: expected 'messages', "
        f"'conversations', image+question+answer or image+text columns"
    )


def normalize_row(row: Mapping[str, Any], index: int, opts: FormatOptions | None = None) -> dict:
    """Normalise one raw row to ``{"index", "messages", **extras}``; raises ``RowFormatError`` naming ``index``.

    Example:
        >>> normalize_row({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
        ...     "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}], "images": ["x.png"]}, 7)["messages"][0]
        {'role': 'user', 'content': [{'type': 'image', 'image': 'x.png'}, {'type': 'text', 'text': 'Hi'}]}
    """
    opts = opts or FormatOptions()
    if not isinstance(row, Mapping):
        raise RowFormatError(f"row {index}: expected a dict, got {type(row).__name__}")
    try:
        fmt = opts.format if opts.format != "auto" else detect_format(row, opts)
        if fmt == "messages":
            messages, used = _from_messages(row)
        elif fmt == "llava":
            messages, used = _from_llava(row, opts)
        elif fmt == "image_text":
            messages, used = _from_image_text(row, opts)
        else:
            messages, used, extras = _from_vqa(row, opts)
            used = used | set(extras)
        if fmt != "vqa":
            extras = {}
    except RowFormatError as e:
        msg = str(e)
        raise RowFormatError(msg if msg.startswith("row ") else f"row {index}: {msg}") from None
    if opts.system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": opts.system_prompt}]})
    if opts.base_dir is not None:
        for m in messages:
            for part in m["content"]:
                if part["type"] == "image":
                    part["image"] = resolve_relative_path(part["image"], opts.base_dir)
    out = {k: v for k, v in row.items() if k not in used and k not in ("index", "messages")}
    out.update(extras)
    out["index"] = index
    out["messages"] = messages
    return out


def normalize_rows(rows: Sequence[Mapping[str, Any]], opts: FormatOptions | None = None, start: int = 0) -> list[dict]:
    """Normalise a list of rows; row ``i`` gets index ``start + i``."""
    return [normalize_row(r, start + i, opts) for i, r in enumerate(rows)]


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


def has_empty_answer(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an assistant turn of normalised ``messages`` is empty (no text but whitespace, no image): training
    on it supervises only the end-of-turn token."""
    return any(
        m["role"] == "assistant" and all(p["type"] == "text" and not p["text"].strip() for p in m["content"])
        for m in messages
    )


def resolve_relative_path(ref: Any, base_dir: str | Path) -> Any:
    """Join a relative local path with ``base_dir`` (a missing file too, so that its error names where it was
    looked for; never a fallback to the working directory); a string that may be base64 stays as is unless
    that file exists, and every other ref is returned as is."""
    if isinstance(ref, Path):
        ref = str(ref)
    if isinstance(ref, Mapping) and ref.get("bytes") is None and isinstance(ref.get("path"), str):
        return {**ref, "path": resolve_relative_path(ref["path"], base_dir)}
    if not isinstance(ref, str) or "://" in ref[:16] or ref.startswith("data:") or len(ref) > 4096:
        return ref
    p = Path(ref).expanduser()
    if p.is_absolute():
        return ref
    candidate = Path(base_dir) / p
    return str(candidate) if candidate.exists() or not may_be_base64(ref) else ref


# ----------------------------------------------------------------------------------------------- formats


def _pick(row: Mapping[str, Any], explicit: str | None, names: Sequence[str]) -> str | None:
    if explicit is not None:
        return explicit if explicit in row else None
    for n in names:
        if n in row and row[n] is not None:
            return n
    return None


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _role(raw: Any) -> str:
    role = _ROLE_ALIASES.get(str(raw).lower()) if raw is not None else None
    if role is None:
        raise RowFormatError(f"unknown role {raw!r} (expected one of {sorted(set(_ROLE_ALIASES))})")
    return role


def _split_image_tags(text: str, image_queue: list, counter: list[int]) -> list[dict]:
    """Split ``text`` on ``<image>`` tags into text and image parts, taking images from ``image_queue``."""
    pieces = text.split(IMAGE_TAG)
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            counter[0] += 1
            parts.append({"type": "image", "image": image_queue.pop(0) if image_queue else None})
        piece = piece.strip("\n") if len(pieces) > 1 else piece
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def _check_image_count(n_placeholders: int, n_images: int, source: str) -> None:
    if n_placeholders != n_images:
        raise RowFormatError(
            f"{n_placeholders} image placeholder(s) but {n_images} image(s) in {source}; "
            "each image needs exactly one placeholder ({'type': 'image'} part or '<image>' tag)"
        )


def _from_messages(row: Mapping[str, Any]) -> tuple[list[dict], set]:
    key = "messages" if "messages" in row else "conversations"
    raw_messages = row[key]
    if not isinstance(raw_messages, (list, tuple)) or not raw_messages:
        raise RowFormatError(f"'{key}' must be a non-empty list of messages")
    image_key = "images" if row.get("images") is not None else ("image" if row.get("image") is not None else None)
    column_images = _as_list(row[image_key]) if image_key else []
    queue = list(column_images)
    n_column_slots = [0]  # placeholders that consume the images column
    messages = []
    for m in raw_messages:
        if not isinstance(m, Mapping) or "content" not in m:
            raise RowFormatError(f"message {m!r} has no 'content'")
        role = _role(m.get("role", m.get("from")))
        content = m["content"]
        parts: list[dict] = []
        if content is None:
            content = ""
        if isinstance(content, str):
            parts = _split_image_tags(content, queue, n_column_slots)
        else:
            for part in content:
                parts.extend(_message_part(part, queue, n_column_slots))
        messages.append({"role": role, "content": parts})
    _check_image_count(n_column_slots[0], len(column_images), f"the '{image_key or 'images'}' column")
    return messages, {key, image_key} - {None}


def _message_part(part: Any, queue: list, n_column_slots: list[int]) -> list[dict]:
    if isinstance(part, str):
        return _split_image_tags(part, queue, n_column_slots)
    if not isinstance(part, Mapping):
        raise RowFormatError(f"content part {part!r} is not a dict")
    ptype = part.get("type")
    if ptype == "text":
        text = part.get("text")
        return [{"type": "text", "text": "" if text is None else str(text)}]
    if ptype in ("image", "image_url"):
        ref = part.get("image")
        if ref is None:
            ref = part.get("url", part.get("path"))
        if ref is None and isinstance(part.get("image_url"), Mapping):  # OpenAI style
            ref = part["image_url"].get("url")
        elif ref is None and isinstance(part.get("image_url"), str):
            ref = part["image_url"]
        if ref is None:  # bare placeholder: filled from the images column
            n_column_slots[0] += 1
            ref = queue.pop(0) if queue else None
        return [{"type": "image", "image": ref}]
    raise RowFormatError(f"unsupported content part type {ptype!r} (expected 'text' or 'image')")


def _from_llava(row: Mapping[str, Any], opts: FormatOptions) -> tuple[list[dict], set]:
    conv = row.get("conversations")
    if not isinstance(conv, (list, tuple)) or not conv:
        raise RowFormatError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    image_key = opts.image_column or ("images" if row.get("images") is not None else "image")
    images = _as_list(row.get(image_key))
    queue = list(images)
    n_tags = [0]
    messages = []
    for turn in conv:
        if not isinstance(turn, Mapping) or "value" not in turn:
            raise RowFormatError(f"LLaVA turn {turn!r} needs 'from' and 'value'")
        role = _role(turn.get("from", turn.get("role")))
        messages.append({"role": role, "content": _split_image_tags(str(turn["value"]), queue, n_tags)})
    _check_image_count(n_tags[0], len(images), f"the '{image_key}' column")
    return messages, {"conversations", image_key}


def _from_image_text(row: Mapping[str, Any], opts: FormatOptions) -> tuple[list[dict], set]:
    image_key = _pick(row, opts.image_column, _IMAGE_COLUMNS)
    text_key = _pick(row, opts.text_column, _TEXT_COLUMNS)
    if image_key is None or text_key is None:
        raise RowFormatError(f"image_text format needs an image and a text column; row has {sorted(row)}")
    images = _as_list(row[image_key])
    if not images:
        raise RowFormatError(f"column '{image_key}' holds no image")
    user = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": opts.instruction}]
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": str(row[text_key])}]},
    ]
    return messages, {image_key, text_key}


def _answer_text(a: Any) -> str:
    if isinstance(a, Mapping):
        for k in ("answer", "text", "value"):
            if k in a:
                return str(a[k])
        raise RowFormatError(f"cannot read an answer from {a!r}")
    return str(a)


def _from_vqa(row: Mapping[str, Any], opts: FormatOptions) -> tuple[list[dict], set, dict]:
    image_key = _pick(row, opts.image_column, _IMAGE_COLUMNS)
    q_key = _pick(row, opts.question_column, _QUESTION_COLUMNS)
    a_key = _pick(row, opts.answer_column, _ANSWER_COLUMNS)
    if q_key is None or a_key is None:
        raise RowFormatError(f"vqa format needs question and answer columns; row has {sorted(row)}")
    answers = [_answer_text(a) for a in _as_list(row[a_key])]
    if not answers:
        raise RowFormatError(f"column '{a_key}' holds no answer")
    images = _as_list(row[image_key]) if image_key else []
    user = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": str(row[q_key])}]
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
    ]
    used = {k for k in (image_key, q_key, a_key) if k is not None}
    return messages, used, {"answers": answers}
