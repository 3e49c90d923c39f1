"""Where rows come from: ``load_rows`` (a list, a file, a folder or a hub id) and ``ConversationDataset``
(raw rows normalised lazily into conversations, see ``formats.py``).

Nothing here templates, tokenizes or loads images: that is the collator's (``collate.py``); the split walk
that validates every row is ``check.py``'s. Numbering, in every message: rows count from 0 in source order
(blank and skipped JSONL lines are no rows), file lines from 1; a JSONL row is named ``row 3 (line 5)``.

Example:
    >>> src = load_rows("data/train.jsonl")
    >>> ds = ConversationDataset(src.rows, FormatOptions(base_dir=src.base_dir), lines=src.lines)
    >>> ds[0]["messages"]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .formats import FormatOptions, normalize_row

log = logging.getLogger(__name__)


class ConversationDataset(Dataset):
    """Raw rows (a list, or a ``datasets.Dataset``) normalised lazily; ``indices`` picks and orders rows.

    Item ``i`` is ``normalize_row(rows[indices[i]], indices[i], opts)``: the row index in every error
    message is the row's position in its source file. ``lines`` (JSONL sources) holds each row's file line,
    for ``row_label``.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], opts: FormatOptions, indices: Sequence[int] | None = None,
                 name: str = "train", lines: Sequence[int] | None = None):
        self.rows = rows
        self.opts = opts
        self.indices = list(range(len(rows))) if indices is None else list(indices)
        self.name = name
        self.lines = lines
        self._class_labels = _class_label_columns(rows)

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int) -> Mapping[str, Any]:
        row = self.rows[self.indices[i]]
        if self._class_labels:
            row = dict(row)
            for col, feat in self._class_labels.items():
                if isinstance(row.get(col), int):
                    row[col] = feat.int2str(row[col])
        return row

    def __getitem__(self, i: int) -> dict:
        return normalize_row(self.raw(i), self.indices[i], self.opts)

    def subset(self, keep: Sequence[int]) -> ConversationDataset:
        """A view holding only positions ``keep`` (positions in this dataset, not source indices)."""
        return ConversationDataset(self.rows, self.opts, [self.indices[k] for k in keep], self.name, self.lines)

    def row_label(self, index: int) -> str:
        """``"row 3"`` for source row ``index``, ``"row 3 (line 5)"`` when the source is a JSONL file."""
        return f"row {index}" if self.lines is None else f"row {index} (line {self.lines[index]})"


def _class_label_columns(rows) -> dict:
    features = getattr(rows, "features", None)
    if not features:
        return {}
    from datasets import ClassLabel  # heavy import (pyarrow); rows from datasets have it loaded already

    return {k: f for k, f in features.items() if isinstance(f, ClassLabel)}


@dataclass
class LoadedRows:
    """What ``load_rows`` read from one source."""

    rows: Sequence[Mapping[str, Any]]
    base_dir: str | None  # relative image paths resolve against this folder
    lines: list[int] | None = None  # JSONL: the 1-based file line of each row
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) skipped with on_bad_line="skip"


def load_rows(source: Any, split: str = "train", on_bad_line: str = "raise") -> LoadedRows:
    """Rows and the folder relative image paths resolve against, from a list, a file, a folder or a hub id.

    - Python list/tuple of dicts, or a ``datasets.Dataset``.
    - ``.jsonl`` / ``.json`` files: read with ``json`` (rows may differ in shape, which Arrow would refuse).
      A JSONL line that is not valid JSON raises naming the file and line, or with ``on_bad_line="skip"``
      is logged and left out (returned in ``bad_lines``).
    - ``.parquet`` / ``.csv`` files, an imagefolder directory (images + optional ``metadata.jsonl``) or a
      ``save_to_disk`` directory: through ``datasets``.
    - anything else is a hub id (``"org/name"`` or ``"org/name:split"``), loaded only when online.
    """
    if on_bad_line not in ("raise", "skip"):
        raise ValueError(f"on_bad_line={on_bad_line!r}: expected 'raise' or 'skip'")
    if source is None:
        return LoadedRows([], None)
    if isinstance(source, (list, tuple)):
        return LoadedRows(list(source), None)
    if hasattr(source, "features") and hasattr(source, "__getitem__"):  # datasets.Dataset
        return LoadedRows(source, None)
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        suffix = path.suffix.lower()
        base = str(path.parent.resolve())
        if suffix == ".jsonl":
            return _read_jsonl(path, base, on_bad_line)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, Mapping):
                data = data.get(split, data.get("data"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of rows (or a dict with a '{split}' or 'data' list)")
            return LoadedRows(data, base)
        import datasets  # heavy import (pyarrow): only for the files the json reader does not take

        kind = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(suffix)
        if kind is None:
            raise ValueError(f"{path}: unsupported file type {suffix!r} (jsonl, json, parquet, csv, arrow)")
        return LoadedRows(datasets.load_dataset(kind, data_files=str(path), split="train"), base)
    if path.is_dir():
        import datasets  # heavy import (pyarrow)

        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            return LoadedRows(ds, str(path.resolve()))
        return LoadedRows(datasets.load_dataset("imagefolder", data_dir=str(path), split="train"), str(path.resolve()))
    return LoadedRows(_load_hub(str(source), split), None)


def _read_jsonl(path: Path, base: str, on_bad_line: str) -> LoadedRows:
    rows, lines, bad = [], [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                reason = f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno})"
                if on_bad_line == "raise":
                    raise ValueError(reason) from None
                log.warning("%s: skipped", reason)
                bad.append((n, reason))
                continue
            lines.append(n)
    return LoadedRows(rows, base, lines, bad)


def _load_hub(name: str, split: str):
    offline = any(os.environ.get(k, "0").lower() in ("1", "true", "yes")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline or "/" not in name or name.startswith((".", "/")):
        raise FileNotFoundError(
            f"dataset {name!r} is not a local file or folder"
            + (" and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline else "")
        )
    import datasets  # heavy import (pyarrow)

    if ":" in name:
        name, split = name.split(":", 1)
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - add the context the datasets error lacks
        raise FileNotFoundError(f"could not load hub dataset {name!r} split {split!r} (offline?): {e}") from e
