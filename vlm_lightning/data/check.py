"""Validate every row of every split once: ``check_splits`` walks them with a collator and returns a
``DataCheckReport`` (per split: rows ok / bad, images, token lengths, truncation, image-token mismatches,
empty answers).

A bad row is listed in the report, never raised; an empty assistant answer is listed as a warning. What to
do about either (raise, or drop the row) is the data module's decision (``VisionChatDataModule.setup``).
Rows are named as ``row 3`` (counted from 0) or ``row 3 (line 5)`` for JSONL sources (lines from 1).

Example:
    >>> report = check_splits(dm.datasets, dm.collator(), max_length=1024)
    >>> print(report)                  # "data check (max_length=1024): OK" + one line per split
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .collate import OverlongRowError, VisionChatCollator
from .datasets import ConversationDataset
from .fetch import FetchBudget
from .formats import RowFormatError, count_images, has_empty_answer
from .images import ImageFetchTimeout, ImageLoadError

_BAD_ROW_ERRORS = (ImageLoadError, RowFormatError, OverlongRowError)
EMPTY_ANSWER = "empty assistant answer (only its end-of-turn token would be trained; see on_empty_answer)"


def strip_row_prefix(message: str, index: int) -> str:
    """``message`` without the leading ``"row <index>: "`` that row errors carry (the report adds its own)."""
    prefix = f"row {index}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _plain_label(index: int) -> str:
    return f"row {index}"


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
    timeouts: int = 0  # bad rows whose image URL timed out
    tokens: list[int] = field(default_factory=list, repr=False)
    supervised: list[int] = field(default_factory=list, repr=False)
    lengths: dict[int, int] = field(default_factory=dict, repr=False)  # row index -> tokens as collated (packing)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (row index, reason without "row N: ")
    empty_answers: list[int] = field(default_factory=list)  # row indices with an empty assistant answer
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (file line, reason): malformed JSONL, no row
    row_label: Callable[[int], str] = field(default=_plain_label, repr=False, compare=False)  # "row 3 (line 5)"

    @property
    def bad(self) -> int:
        return self.rows - self.ok

    def summary(self) -> str:
        extra = f" | empty answers {len(self.empty_answers)}" if self.empty_answers else ""
        if self.timeouts:
            extra += f" | URL timeouts {self.timeouts}"
        if self.bad_lines:
            extra += f" | invalid JSON lines {len(self.bad_lines)}"
        if not self.tokens:
            return f"{self.name}: {self.rows} rows, {self.ok} ok, {self.bad} bad{extra}"
        t = self.tokens
        return (
            f"{self.name}: {self.rows} rows, {self.ok} ok, {self.bad} bad | images {self.images} | tokens "
            f"min {min(t)} mean {statistics.fmean(t):.0f} max {max(t)} | supervised min {min(self.supervised)} | "
            f"truncated {self.truncated} | overlong {self.overlong} | image-token mismatches "
            f"{self.image_token_mismatches}{extra}"
        )


@dataclass
class DataCheckReport:
    """Result of :meth:`VisionChatDataModule.check`; ``str(report)`` is the printed summary."""

    splits: dict[str, SplitCheck]
    max_length: int | None = None

    @property
    def ok(self) -> bool:
        return all(s.bad == 0 and s.image_token_mismatches == 0 and not s.bad_lines for s in self.splits.values())

    @property
    def bad_indices(self) -> dict[str, list[int]]:
        return {k: [i for i, _ in s.errors] for k, s in self.splits.items()}

    def __str__(self) -> str:
        warnings = sum(len(s.empty_answers) for s in self.splits.values())
        verdict = ("OK" if self.ok else "PROBLEMS FOUND") + (f", {warnings} warning(s)" if warnings else "")
        lines = [f"data check (max_length={self.max_length}): {verdict} (rows count from 0, lines from 1)"]
        for s in self.splits.values():
            lines.append("  " + s.summary())
            listed = [reason for _, reason in s.bad_lines] + [f"{s.row_label(i)}: {r}" for i, r in s.errors]
            listed += [f"{s.row_label(i)}: {EMPTY_ANSWER}" for i in s.empty_answers]
            for entry in listed[:5]:
                lines.append(f"    {entry[:200]}")
            if len(listed) > 5:
                lines.append(f"    ... and {len(listed) - 5} more")
        return "\n".join(lines)


def check_splits(datasets: Mapping[str, ConversationDataset], collator: VisionChatCollator,
                 splits: Sequence[str] | None = None, max_length: int | None = None,
                 bad_lines: Mapping[str, list[tuple[int, str]]] | None = None) -> DataCheckReport:
    """Walk every row once: load images, template + tokenize, compare image tokens with the vision tower's
    feature count, find rows that would be truncated or cannot be, and note empty assistant answers. Never
    raises for a bad row; counts those whose image URL timed out. Each split gets a fresh URL fetch budget
    (``collator.fetch_budget``). ``bad_lines``: per split, the malformed JSONL lines ``load_rows`` skipped."""
    report = DataCheckReport(splits={}, max_length=max_length)
    for name in splits or list(datasets):
        ds = datasets[name]
        sc = SplitCheck(name=name, row_label=ds.row_label, bad_lines=list((bad_lines or {}).get(name, [])))
        collator.fetch_budget = FetchBudget(collator.fetch_budget.total_s)  # a fresh fetch budget per split
        for k in range(len(ds)):
            sc.rows += 1
            source_index = ds.indices[k]
            try:
                row = ds[k]
                if has_empty_answer(row["messages"]):
                    sc.empty_answers.append(source_index)
                enc = collator.encode_row(row)
            except OverlongRowError as e:
                sc.overlong += 1
                sc.errors.append((source_index, strip_row_prefix(str(e), source_index)))
                continue
            except _BAD_ROW_ERRORS as e:
                sc.timeouts += isinstance(e, ImageFetchTimeout)
                sc.errors.append((source_index, strip_row_prefix(str(e), source_index)))
                continue
            sc.images += count_images(row["messages"])
            sc.tokens.append(enc.full_length)
            sc.lengths[source_index] = len(enc.input_ids)
            sc.supervised.append(enc.num_supervised)
            sc.truncated += int(enc.truncated)
            if enc.expected_image_tokens is not None and enc.expected_image_tokens != enc.num_image_tokens:
                sc.image_token_mismatches += 1
                sc.errors.append((source_index, (
                    f"{enc.num_image_tokens} image tokens in input_ids but the vision tower yields "
                    f"{enc.expected_image_tokens} features")))
                continue
            sc.ok += 1
        report.splits[name] = sc
    return report
