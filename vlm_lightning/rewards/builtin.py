"""Built-in rewards: OCR (1 - CER), exact match, regex format, numeric answer, length penalty.

Each is a small class (so a LightningCLI YAML builds it with ``class_path``/``init_args``) whose
``__call__`` has TRL's reward signature ``(prompts, completions, **columns) -> list[float | None]``.

Example (YAML):
    reward_funcs:
      - class_path: vlm_lightning.rewards.OCRReward
      - class_path: vlm_lightning.rewards.FormatReward
        init_args: {pattern: "<answer>.*?</answer>"}
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from ..metrics.text import TextNormalizer, cer
from .base import RewardError, completion_text, extract_tag

_DEFAULT_REFERENCE_COLUMNS = ("references", "reference", "answer", "solution")


def _references(columns: dict[str, Any], column: str | None, owner: str, n: int) -> list[Any]:
    names = (column,) if column else _DEFAULT_REFERENCE_COLUMNS
    for name in names:
        if name in columns:
            refs = list(columns[name])
            if len(refs) != n:
                raise RewardError(f"{owner}: column {name!r} has {len(refs)} entries for {n} completions")
            return refs
    raise RewardError(f"{owner}: no reference column; looked for {list(names)} in the columns {sorted(columns)}. "
                      f"Set reference_column=... to the dataset column holding the target text.")


class _TextReward:
    """Shared plumbing: completion text, optional <tag> extraction, the normaliser both sides go through,
    per-row errors with the row index."""

    name = "reward"

    def __init__(self, reference_column: str | None = None, answer_tag: str | None = None,
                 normalizer: TextNormalizer | None = None) -> None:
        self.reference_column = reference_column
        self.answer_tag = answer_tag
        self.normalizer = normalizer

    def _normalized(self, text: str, reference: Any) -> tuple[str, str]:
        """Completion text and reference as the score compares them (through the normaliser, if any)."""
        ref = str(reference)
        return (text, ref) if self.normalizer is None else (self.normalizer(text), self.normalizer(ref))

    def _text(self, completion: Any) -> str | None:
        text = completion_text(completion)
        if self.answer_tag:
            return extract_tag(text, self.answer_tag)
        return text

    def score(self, text: str, reference: Any) -> float | None:  # pragma: no cover - abstract
        """The reward of one completion's text (a missing ``<answer_tag>`` scores 0 before this is asked)."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Any] | None, completions: Sequence[Any], **columns: Any) -> list[float | None]:
        refs = _references(columns, self.reference_column, self.name, len(completions))
        out: list[float | None] = []
        for i, (c, ref) in enumerate(zip(completions, refs)):
            if ref is None:
                out.append(None)
                continue
            try:
                text = self._text(c)
                out.append(0.0 if text is None else self.score(text, ref))
            except RewardError:
                raise
            except Exception as exc:
                raise RewardError(f"reward {self.name!r} failed on row {i}: {type(exc).__name__}: {exc}") from exc
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class OCRReward(_TextReward):
    """1 - character error rate (``metrics.text.cer``) against the reference, clipped to [0, 1].

    Args:
        reference_column: the column with the target text (default: the first of "references",
            "reference", "answer", "solution" that is present).
        answer_tag: score only the content of ``<answer_tag>...</answer_tag>`` (0 when absent).
        normalize: put both sides through ``metrics.text.TextNormalizer`` first (NFKC, whitespace collapse).
        case_sensitive: with ``normalize``, keep case (else casefold).

    An empty reference scores 1 for an empty prediction and 0 otherwise (CER is undefined there).
    """

    name = "ocr"

    def __init__(self, reference_column: str | None = None, answer_tag: str | None = None, normalize: bool = True,
                 case_sensitive: bool = True) -> None:
        normalizer = TextNormalizer(casefold=not case_sensitive) if normalize else None
        super().__init__(reference_column, answer_tag, normalizer)

    def score(self, text: str, reference: Any) -> float:
        return min(1.0, max(0.0, 1.0 - cer(*self._normalized(text, reference))))


class CharF1Reward(_TextReward):
    """F1 of the character multisets of completion and reference (order-free partial credit in [0, 1]).

    A dense shaping reward for OCR: unlike 1 - CER it is not 0 for every long or noisy completion, so a
    weak policy still gets a signal for emitting the right characters (used by the CPU demo next to
    ``OCRReward``). Whitespace is ignored; ``normalize`` applies NFKC and casefolding first.
    """

    name = "char_f1"

    def __init__(self, reference_column: str | None = None, answer_tag: str | None = None,
                 normalize: bool = True) -> None:
        super().__init__(reference_column, answer_tag, TextNormalizer(casefold=True) if normalize else None)

    def score(self, text: str, reference: Any) -> float:
        text, ref = self._normalized(text, reference)
        p, r = Counter(text.replace(" ", "")), Counter(ref.replace(" ", ""))
        if not r or not p:
            return float(not r and not p)
        common = sum((p & r).values())
        if common == 0:
            return 0.0
        precision, recall = common / sum(p.values()), common / sum(r.values())
        return 2 * precision * recall / (precision + recall)


class ExactMatchReward(_TextReward):
    """1.0 if the (normalised) completion equals the reference, else 0.0.

    Normalisation: NFKC, strip, collapse whitespace, casefold (unless ``case_sensitive``). A reference
    that is a list accepts any of its entries.
    """

    name = "exact_match"

    def __init__(self, reference_column: str | None = None, answer_tag: str | None = None,
                 case_sensitive: bool = False) -> None:
        super().__init__(reference_column, answer_tag, TextNormalizer(casefold=not case_sensitive))

    def score(self, text: str, reference: Any) -> float:
        refs = reference if isinstance(reference, (list, tuple)) else [reference]
        return float(any(a == b for a, b in (self._normalized(text, r) for r in refs)))


class FormatReward:
    """1.0 if the whole completion matches ``pattern`` (``re.fullmatch``, DOTALL), else 0.0.

    Default: ``<think>...</think>`` then ``<answer>...</answer>``, whitespace allowed around them.
    """

    name = "format"
    DEFAULT_PATTERN = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"

    def __init__(self, pattern: str = DEFAULT_PATTERN, name: str | None = None) -> None:
        try:
            self._re = re.compile(pattern, flags=re.DOTALL)
        except re.error as exc:
            raise ValueError(f"FormatReward: invalid regex {pattern!r}: {exc}") from exc
        self.pattern = pattern
        if name:
            self.name = name

    def __call__(self, prompts: Sequence[Any] | None, completions: Sequence[Any], **columns: Any) -> list[float]:
        return [1.0 if self._re.fullmatch(completion_text(c)) else 0.0 for c in completions]

    def __repr__(self) -> str:
        return f"FormatReward(pattern={self.pattern!r})"


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """The last number in text ("1,234.5", "-3", ".5", "2e3"; thousands commas allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


class NumericAnswerReward(_TextReward):
    """1.0 if the number in the completion equals the reference within ``atol + rtol * |ref|``, else 0.0.

    The number is read from ``<answer_tag>...</answer_tag>`` when present, otherwise the last number of the
    completion. A completion with no number scores 0; a reference with no number raises (a data error).
    """

    name = "numeric_answer"

    def __init__(self, reference_column: str | None = None, answer_tag: str | None = "answer", atol: float = 1e-6,
                 rtol: float = 0.0) -> None:
        super().__init__(reference_column, answer_tag)
        self.atol, self.rtol = atol, rtol

    def _text(self, completion: Any) -> str:
        text = completion_text(completion)
        tagged = extract_tag(text, self.answer_tag) if self.answer_tag else None
        return tagged if tagged is not None else text

    def score(self, text: str, reference: Any) -> float:
        ref = float(reference) if isinstance(reference, (int, float)) else parse_number(str(reference))
        if ref is None:
            raise ValueError(f"reference {reference!r} contains no number")
        pred = parse_number(text)
        if pred is None:
            return 0.0
        return float(abs(pred - ref) <= self.atol + self.rtol * abs(ref))


class LengthPenalty:
    """DAPO's soft overlong punishment (arXiv:2503.14476 eq. 13): 0 up to ``max_length - cache_length``,
    then linearly down to -1 at ``max_length``, and -1 beyond.

    Args:
        max_length: the length at which the penalty reaches -1.
        cache_length: width of the linear ramp (0: a hard step at ``max_length``).
        unit: "chars" (len of the completion text) or "tokens" (``len(completion_ids[i])``, a column the
            GRPO module passes, as TRL does).
    """

    name = "length_penalty"

    def __init__(self, max_length: int, cache_length: int = 0, unit: Literal["chars", "tokens"] = "chars") -> None:
        if max_length < 1 or not 0 <= cache_length <= max_length:
            raise ValueError(f"LengthPenalty: need max_length >= 1 and 0 <= cache_length <= max_length, got "
                             f"{max_length}, {cache_length}")
        if unit not in ("chars", "tokens"):
            raise ValueError(f"LengthPenalty: unit={unit!r}, expected 'chars' or 'tokens'")
        self.max_length, self.cache_length, self.unit = max_length, cache_length, unit

    def _penalty(self, length: int) -> float:
        start = self.max_length - self.cache_length
        if length <= start:
            return 0.0
        if length > self.max_length or self.cache_length == 0:
            return -1.0
        return -(length - start) / self.cache_length

    def __call__(self, prompts: Sequence[Any] | None, completions: Sequence[Any], **columns: Any) -> list[float]:
        if self.unit == "tokens":
            if "completion_ids" not in columns:
                raise RewardError("length_penalty: unit='tokens' needs the 'completion_ids' column")
            lengths = [len(ids) for ids in columns["completion_ids"]]
        else:
            lengths = [len(completion_text(c)) for c in completions]
        return [self._penalty(n) for n in lengths]

    def __repr__(self) -> str:
        return f"LengthPenalty(max_length={self.max_length}, cache_length={self.cache_length}, unit={self.unit!r})"
