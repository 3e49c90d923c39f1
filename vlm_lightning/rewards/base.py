"""Scoring completions with several reward callables: weights, None handling, errors that name the row.

A reward is any callable with TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``
(``completions`` are strings or TRL's conversational form ``[{"role": "assistant", "content": ...}]``;
``columns`` hold one list per dataset column, one entry per completion). ``None`` means "this reward
does not apply to this row": it becomes NaN and is left out of the weighted sum and of the group statistics.

Example:
    >>> total, per_fn = compute_rewards([OCRReward(), FormatReward()], [1.0, 0.2], prompts, completions,
    ...                                 {"references": refs})
    >>> total.shape, per_fn["ocr"].shape          # (N,), (N,)
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it and the row."""


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or TRL conversational form (the last assistant message's
    content, itself a string or a list of ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        msgs = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        if not msgs:
            raise TypeError(f"conversational completion has no assistant message: {completion!r:.200}")
        content = msgs[-1].get("content", "")
        if isinstance(content, str):
            return content
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    raise TypeError(f"completion must be a str or a list of messages, got {type(completion).__name__}")


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the last ``<tag>...</tag>`` in text (None if absent)."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1] if found else None


def reward_name(fn: Any) -> str:
    """``fn.name``, else ``fn.__name__``, else the class name."""
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def _column_slice(columns: dict[str, Any], i: int) -> dict[str, Any]:
    out = {}
    for k, v in columns.items():
        out[k] = [v[i]] if isinstance(v, (list, tuple)) else (v[i:i + 1] if isinstance(v, torch.Tensor) else v)
    return out


def _locate_failure(fn: RewardFn, prompts, completions, columns) -> tuple[int, BaseException] | None:
    """Re-run fn one row at a time to find the first row that raises (None if no single row does)."""
    for i in range(len(completions)):
        try:
            fn([prompts[i]] if prompts is not None else None, [completions[i]], **_column_slice(columns, i))
        except Exception as exc:  # noqa: BLE001 - reported with the row below
            return i, exc
    return None


def _call_one(fn: RewardFn, name: str, prompts, completions, columns) -> torch.Tensor:
    n = len(completions)
    try:
        out = fn(prompts, completions, **columns)
    except RewardError:
        raise
    except Exception as exc:
        found = _locate_failure(fn, prompts, completions, columns)
        if found is None:
            raise RewardError(f"reward {name!r} raised {type(exc).__name__} on a batch of {n} completions "
                              f"(no single row reproduces it): {exc}") from exc
        i, row_exc = found
        raise RewardError(f"reward {name!r} raised {type(row_exc).__name__} on row {i} "
                          f"(completion {completion_text_safe(completions[i])!r:.120}): {row_exc}") from row_exc
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    try:
        n_out = len(out)
    except TypeError as exc:
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, expected a list of {n} floats") from exc
    if n_out != n:
        raise RewardError(f"reward {name!r} returned {n_out} values for {n} completions")
    vals = []
    for i, v in enumerate(out):
        if v is None:
            vals.append(float("nan"))
            continue
        if isinstance(v, torch.Tensor):
            v = v.item()
        try:
            f = float(v)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {name!r} returned {v!r:.60} on row {i}: expected a float or None") from exc
        if math.isinf(f):
            raise RewardError(f"reward {name!r} returned {f} on row {i}: rewards must be finite (None/NaN = no score)")
        vals.append(f)
    return torch.tensor(vals, dtype=torch.float32)


def completion_text_safe(c: Any) -> str:
    try:
        return completion_text(c)
    except TypeError:
        return repr(c)


def compute_rewards(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None, prompts: Sequence[Any] | None,
                    completions: Sequence[Any], columns: dict[str, Any] | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score every completion with every reward function and combine them.

    Args:
        reward_fns: callables ``fn(prompts, completions, **columns) -> list[float | None]``.
        weights: one per function (None -> all 1.0).
        prompts: (N,) prompts as the functions expect them (may be None).
        completions: (N,) strings or conversational completions.
        columns: extra per-row lists (each of length N), passed as keyword arguments.

    Returns:
        total: (N,) float32, ``sum_k w_k r_k`` over the functions that scored the row (NaN-skipping sum);
        NaN when no function scored the row. per_fn: name -> (N,) unweighted rewards (NaN for None).

    Raises:
        RewardError: a function raised (the message names the function and the first failing row),
            returned the wrong number of values, a non-number, or an infinite value.
    """
    columns = dict(columns or {})
    if not reward_fns:
        raise ValueError("no reward functions given")
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
    n = len(completions)
    for k, v in columns.items():
        if isinstance(v, (list, tuple, torch.Tensor)) and len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} entries for {n} completions")
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    per_fn: dict[str, torch.Tensor] = {}
    for fn in reward_fns:
        name = reward_name(fn)
        key, j = name, 1
        while key in per_fn:
            key, j = f"{name}_{j}", j + 1
        per_fn[key] = _call_one(fn, key, prompts, completions, columns)
    stacked = torch.stack(list(per_fn.values()), dim=1) if n else torch.zeros(0, len(per_fn))  # (N, K)
    w = torch.tensor(weights, dtype=torch.float32)
    weighted = stacked * w
    total = torch.nansum(weighted, dim=1)
    total[torch.isnan(stacked).all(dim=1)] = float("nan")
    if n and torch.isnan(total).all():
        warnings.warn(f"every reward function returned None for all {n} completions: advantages will be 0",
                      stacklevel=2)
    return total, per_fn


class RewardSet:
    """Reward callables with their weights, as one object: what ``VisionGRPOModule`` scores completions with
    (its ``reward_funcs`` / ``reward_weights`` arguments). Calling it is ``compute_rewards``.

    Example:
        >>> rs = RewardSet([OCRReward(), FormatReward()], weights=[1.0, 0.1])
        >>> total, per_fn = rs(prompts, completions, references=refs)
    """

    def __init__(self, reward_fns: Sequence[RewardFn], weights: Sequence[float] | None = None) -> None:
        if not reward_fns:
            raise ValueError("RewardSet needs at least one reward function")
        for fn in reward_fns:
            if not callable(fn):
                raise TypeError(f"reward_funcs: {fn!r} is not callable")
        if weights is not None and len(weights) != len(reward_fns):
            raise ValueError(f"{len(weights)} reward_weights for {len(reward_fns)} reward_funcs")
        self.reward_fns = list(reward_fns)
        self.weights = [1.0] * len(self.reward_fns) if weights is None else [float(w) for w in weights]

    @property
    def names(self) -> list[str]:
        return [reward_name(f) for f in self.reward_fns]

    def __call__(self, prompts, completions, **columns) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return compute_rewards(self.reward_fns, self.weights, prompts, completions, columns)
