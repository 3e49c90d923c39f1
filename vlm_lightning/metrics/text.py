"""Text scoring shared by the OCR callback (``callbacks.ocr.OCRMetrics``) and the rewards (``rewards.builtin``):
one normaliser, character / word / match error rates, exact match and VQA accuracy.

One normaliser implementation serves both, so a setting (NFKC, casefold, whitespace) means the same thing
in a reward and in a validation metric. Left out: the per-epoch, rank-synchronised metric state (torchmetrics
objects in the callback) and anything model-side.

Example:
    >>> score_predictions(["12 34"], ["12 35"], normalizer=TextNormalizer(lowercase=True))["cer"]
    0.2
    >>> norm = TextNormalizer(casefold=True)                  # ExactMatchReward's and CharF1Reward's comparison
    >>> cer(norm("abd"), norm("ABC"))                          # one substitution in 3 characters: ~0.333
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from torchmetrics.functional.text import char_error_rate, match_error_rate, word_error_rate

__all__ = ["TextNormalizer", "cer", "score_predictions", "vqa_accuracy"]


@dataclass
class TextNormalizer:
    """How predictions and references are normalised before scoring (all metrics use the same text).

    Steps, in order: NFKC, lowercase, casefold, punctuation removal, whitespace runs to one space, strip.
    ``casefold`` is the stronger, Unicode-aware lowercasing (e.g. "ß" -> "ss") that the rewards use.

    Example:
        >>> TextNormalizer(lowercase=True)("  Ｈｅｌｌｏ\\n World ")
        'hello world'
    """

    strip: bool = True
    lowercase: bool = False
    collapse_whitespace: bool = True
    nfkc: bool = True
    remove_punctuation: bool = False
    casefold: bool = False

    def __call__(self, text: str) -> str:
        text = text or ""
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if self.lowercase:
            text = text.lower()
        if self.casefold:
            text = text.casefold()
        if self.remove_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        if self.collapse_whitespace:
            text = re.sub(r"\s+", " ", text)
        if self.strip:
            text = text.strip()
        return text


def cer(prediction: str, reference: str) -> float:
    """Character error rate of one prediction (torchmetrics' ``char_error_rate``). An empty reference, where
    CER is undefined, gives 0 for an empty prediction and 1 otherwise."""
    if not reference:
        return float(prediction != reference)
    return float(char_error_rate(prediction, reference))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one (normalised) prediction against the (normalised) human answers:
    min(1, #matching answers / 3) (Antol et al. 2015, as the VQA v2 evaluation; with fewer than 3 answers,
    one match out of all of them counts as fully correct).

    Example:
        >>> vqa_accuracy("2", ["2", "2", "two", "3"])
        0.6666666666666666
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    matches = sum(prediction == a for a in answers)
    return min(1.0, matches / min(3, len(answers)))


def score_predictions(predictions: Sequence[str], references: Sequence[str],
                      answers: Sequence[Sequence[str] | None] | None = None,
                      normalizer: TextNormalizer | None = None) -> dict[str, float]:
    """CER, WER, MER, exact match (and VQA accuracy over rows with several answers) of finished predictions.

    Example:
        >>> score_predictions(["12 34"], ["12 35"])["cer"]
        0.2
    """
    norm = normalizer or TextNormalizer()
    p = [norm(x) for x in predictions]
    r = [norm(x) for x in references]
    out = {"cer": float(char_error_rate(p, r)), "wer": float(word_error_rate(p, r)),
           "mer": float(match_error_rate(p, r)), "exact_match": sum(a == b for a, b in zip(p, r)) / max(len(p), 1)}
    vqa = [vqa_accuracy(x, [norm(a) for a in ans]) for x, ans in zip(p, answers or [None] * len(p)) if ans]
    if vqa:
        out["vqa_acc"] = sum(vqa) / len(vqa)
    return out
