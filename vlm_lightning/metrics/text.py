"""Text scoring shared by the OCR callback (``callbacks.ocr.OCRMetrics``) and the rewards (``rewards.builtin``):
one normaliser, character / word / match error rates, exact match, VQA accuracy and ANLS (DocVQA).

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

__all__ = ["TextNormalizer", "anls", "cer", "levenshtein", "score_predictions", "vqa_accuracy"]


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


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _docvqa_norm(text: str) -> str:
    # DocVQA's evaluation compares lower-cased answers with surrounding and repeated whitespace removed
    return " ".join((text or "").lower().split())


def anls(prediction: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (Biten et al. 2019, the DocVQA / ST-VQA
    metric): the best over the ground-truth answers of ``1 - NL`` if ``NL < tau`` else 0, where
    ``NL = levenshtein(p, a) / max(len(p), len(a))`` on lower-cased, whitespace-collapsed text (this
    normalisation always applies, whatever ``TextNormalizer`` the caller scores the other metrics with).
    The mean of this over the questions is the benchmark's ANLS.

    Example:
        >>> anls("Hello world", ["hello  world"])               # equal after DocVQA's normalisation
        1.0
        >>> round(anls("invoice", ["invoices", "bill"]), 3)     # 1 edit in 8 characters: 1 - 1/8
        0.875
    """
    if not answers:
        raise ValueError("anls needs at least one ground-truth answer")
    p = _docvqa_norm(prediction)
    best = 0.0
    for answer in answers:
        a = _docvqa_norm(answer)
        nl = levenshtein(p, a) / max(len(p), len(a)) if (p or a) else 0.0
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


def score_predictions(predictions: Sequence[str], references: Sequence[str],
                      answers: Sequence[Sequence[str] | None] | None = None,
                      normalizer: TextNormalizer | None = None) -> dict[str, float]:
    """CER, WER, MER, exact match, ANLS (and VQA accuracy over rows with several answers) of finished predictions.

    ANLS takes each row's ``answers`` when given, else its reference, and the raw (not ``normalizer``-ed) text:
    DocVQA's own normalisation is part of the metric (``anls``).

    Example:
        >>> score_predictions(["12 34"], ["12 35"])["cer"]
        0.2
    """
    norm = normalizer or TextNormalizer()
    p = [norm(x) for x in predictions]
    r = [norm(x) for x in references]
    out = {"cer": float(char_error_rate(p, r)), "wer": float(word_error_rate(p, r)),
           "mer": float(match_error_rate(p, r)), "exact_match": sum(a == b for a, b in zip(p, r)) / max(len(p), 1)}
    answers = answers or [None] * len(p)
    out["anls"] = sum(anls(x, ans or [ref]) for x, ref, ans in zip(predictions, references, answers)) / max(len(p), 1)
    vqa = [vqa_accuracy(x, [norm(a) for a in ans]) for x, ans in zip(p, answers) if ans]
    if vqa:
        out["vqa_acc"] = sum(vqa) / len(vqa)
    return out
