"""Validate every row of every split once: ``check_splits`` walks them with a collator and returns a
``DataCheckReport`` (per split: rows ok / bad, images, token lengths, truncation, image-token mismatches).

A bad row is listed in the report, never raised; what to do about it (raise, or drop it) is the data
module's decision (``VisionChatDataModule.setup``).

Example:
    >>> report = check_splits(dm.datasets, dm.collator(), max_length=1024)
    >>> print(report)                  # "data check (max_length=1024): OK" + one line per split
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .collate import OverlongRowError, VisionChatCollator
from .datasets import ConversationDataset
from .formats import RowFormatError, count_images
from .images import ImageLoadError

_BAD_ROW_ERRORS = (ImageLoadError, RowFormatError, OverlongRowError)


@dataclass
class SplitCheck:
    """What ``check()`` found in one split."""

    name: str
    rows: int = 0
    ok: int = 0
    images: int = 0
    truncated: int = 0
    overlong: int = 0
    image_token_mismatches: int = 0
    tokens: list[int] = field(default_factory=list, repr=False)
    supervised: list[int] = field(default_factory=list, repr=False)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (row index, reason)

    @property
    def bad(self) -> int:
        return self.rows - self.ok

    def summary(self) -> str:
        if not self.tokens:
            return f"{self.name}: {self.rows} rows, {self.ok} ok, {self.bad} bad"
        t = self.tokens
        return (
            f"{self.name}: {self.rows} rows, {self.ok} ok, {self.bad} bad | images {self.images} | tokens "
            f"min {min(t)} mean {statistics.fmean(t):.0f} max {max(t)} | supervised min {min(self.supervised)} | "
            f"truncated {self.truncated} | overlong {self.overlong} | image-token mismatches "
            f"{self.image_token_mismatches}"
        )


@dataclass
class DataCheckReport:
    """Result of :meth:`VisionChatDataModule.check`; ``str(report)`` is the printed summary."""

    splits: dict[str, SplitCheck]
    max_length: int | None = None

    @property
    def ok(self) -> bool:
        return all(s.bad == 0 and s.image_token_mismatches == 0 for s in self.splits.values())

    @property
    def bad_indices(self) -> dict[str, list[int]]:
        return {k: [i for i, _ in s.errors] for k, s in self.splits.items()}

    def __str__(self) -> str:
        lines = [f"data check (max_length={self.max_length}): {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        for s in self.splits.values():
            lines.append("  " + s.summary())
            for idx, reason in s.errors[:5]:
                lines.append(f"    row {idx}: {reason[:200]}")
            if len(s.errors) > 5:
                lines.append(f"    ... and {len(s.errors) - 5} more")
        return "\n".join(lines)


def check_splits(datasets: Mapping[str, ConversationDataset], collator: VisionChatCollator,
                 splits: Sequence[str] | None = None, max_length: int | None = None) -> DataCheckReport:
    """Walk every row once: load images, template + tokenize, compare image tokens with the vision tower's
    feature count, and find rows that would be truncated or cannot be. Never raises for a bad row."""
    report = DataCheckReport(splits={}, max_length=max_length)
    for name in splits or list(datasets):
        ds = datasets[name]
        sc = SplitCheck(name=name)
        for k in range(len(ds)):
            sc.rows += 1
            source_index = ds.indices[k]
            try:
                row = ds[k]
                enc = collator.encode_row(row)
            except OverlongRowError as e:
                sc.overlong += 1
                sc.errors.append((source_index, str(e)))
                continue
            except _BAD_ROW_ERRORS as e:
                sc.errors.append((source_index, str(e)))
                continue
            sc.images += count_images(row["messages"])
            sc.tokens.append(enc.full_length)
            sc.supervised.append(enc.num_supervised)
            sc.truncated += int(enc.truncated)
            if enc.expected_image_tokens is not None and enc.expected_image_tokens != enc.num_image_tokens:
                sc.image_token_mismatches += 1
                sc.errors.append((source_index, (
                    f"row {source_index}: {enc.num_image_tokens} image tokens in input_ids but the vision "
                    f"tower yields {enc.expected_image_tokens} features")))
                continue
            sc.ok += 1
        report.splits[name] = sc
    return report
