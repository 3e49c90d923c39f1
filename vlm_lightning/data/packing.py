"""Token-budget batches for padding-free packing (``VisionChatDataModule(packing=True)``).

Rows are grouped once, in ``setup``, into packs of at most ``max_tokens_per_batch`` tokens (``pack_by_budget``:
best-fit decreasing over the rows' collated lengths, image placeholder tokens included, so the vision tokens
count toward the budget). A pack is one micro-batch: the collator concatenates its rows into one sequence
(``VisionChatCollator.pack``) and ``models/packing.py`` keeps the rows apart in attention and in positions.
The packs are fixed for the run; their order is shuffled every epoch and sharded over ranks by the same
``ResumableSampler`` as unpacked rows (one pack = one sample), so an interrupted epoch resumes exactly.

Example:
    >>> packs = pack_by_budget([300, 120, 500, 90], max_tokens=512)     # [[2], [0, 1, 3]]
    >>> loader = DataLoader(PackedRows(dataset, packs), batch_size=1, collate_fn=CollatePacks(collator))
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

if TYPE_CHECKING:
    from .datasets import ConversationDataset

__all__ = ["CollatePacks", "PackedRows", "pack_by_budget", "pack_split", "token_budget"]


def pack_by_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group row positions into packs of at most ``max_tokens`` tokens, best-fit decreasing: the longest row
    first, each into the fullest pack it still fits (a new pack when none), ties by position (deterministic).

    Args:
        lengths: (N,) tokens of each row as collated. max_tokens: the budget of one pack.
    Returns:
        Lists of row positions (each row exactly once), longest row first in each pack.
    Raises:
        ValueError: a row longer than ``max_tokens`` (the caller names or drops such rows first).
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens} must be positive")
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, pack number), sorted: the fullest pack that fits is found first
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = int(lengths[i])
        if n > max_tokens:
            raise ValueError(f"row at position {i} has {n} tokens, over max_tokens={max_tokens}")
        j = bisect_left(free, (n, -1))
        if j == len(free):
            packs.append([i])
            left, p = max_tokens - n, len(packs) - 1
        else:
            left, p = free.pop(j)
            packs[p].append(i)
            left -= n
        if left > 0:
            insort(free, (left, p))
    return packs


def token_budget(packing: bool, max_tokens_per_batch: int | None, batch_size: int, max_length: int | None,
                 train_for_generation: bool = False) -> int | None:
    """The token budget of one packed micro-batch: ``max_tokens_per_batch``, else ``batch_size * max_length``;
    raises for a budget that is not positive, packing without either, or packing prompt-only batches."""
    if max_tokens_per_batch is not None and max_tokens_per_batch <= 0:
        raise ValueError(f"max_tokens_per_batch={max_tokens_per_batch} must be positive")
    if packing and train_for_generation:
        raise ValueError("packing=True packs teacher-forced SFT rows; train_for_generation batches are prompts")
    if packing and max_tokens_per_batch is None and max_length is None:
        raise ValueError("packing=True needs max_tokens_per_batch (or max_length: the budget is then "
                         "batch_size * max_length)")
    return max_tokens_per_batch or (batch_size * max_length if max_length else None)


def pack_split(ds: ConversationDataset, lengths: dict[int, int], budget: int,
               on_overlong: str = "raise") -> tuple[ConversationDataset, list[list[int]], int]:
    """Pack a split's rows (``lengths``: source row index -> collated tokens, from the validation walk).

    Returns (the split without the rows over ``budget``, the packs as positions into it, how many were dropped).
    A row over the budget raises a ``ValueError`` naming it (``on_overlong="raise"``) or is dropped ("skip").
    """
    over = [src for src in ds.indices if lengths[src] > budget]
    if over and on_overlong == "raise":
        raise ValueError(f"{ds.name} split: {ds.row_label(over[0])}: {lengths[over[0]]} tokens (image tokens "
                         f"included) exceed max_tokens_per_batch={budget}; raise max_tokens_per_batch, set "
                         f"max_length <= {budget} (the text tail is cut), or on_overlong='skip'")
    if over:
        drop = set(over)
        ds = ds.subset([k for k, src in enumerate(ds.indices) if src not in drop])
        if len(ds) == 0:
            raise ValueError(f"{ds.name} split has no rows left: all {len(over)} exceed max_tokens_per_batch={budget}")
    return ds, pack_by_budget([lengths[src] for src in ds.indices], budget), len(over)


class PackedRows(Dataset):
    """A dataset of packs: item ``k`` is the list of rows of ``packs[k]`` (positions into ``rows``)."""

    def __init__(self, rows: Dataset, packs: Sequence[Sequence[int]]):
        self.rows = rows
        self.packs = [list(p) for p in packs]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> list[Any]:
        return [self.rows[i] for i in self.packs[k]]


class CollatePacks:
    """``collate_fn`` over ``PackedRows`` items: the rows of every pack in the batch, to one collator call
    (picklable for worker processes)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: Sequence[Sequence[Any]]):
        return self.collator([row for pack in items for row in pack])
