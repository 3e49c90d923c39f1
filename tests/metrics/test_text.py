"""Text scoring (vlm_lightning.metrics.text): the normaliser's options, CER/WER/MER/exact match and VQA accuracy
worked out by hand, casefolding (what the rewards compare), ``cer`` with an empty reference."""
from __future__ import annotations

import pytest

from vlm_lightning.metrics.text import TextNormalizer, cer, score_predictions, vqa_accuracy


def test_normalizer_options():
    assert TextNormalizer()("  a \t\n b  ") == "a b"
    assert TextNormalizer()("ＡＢＣ１２") == "ABC12"  # NFKC folds full-width forms
    assert TextNormalizer(nfkc=False)("ＡＢＣ") == "ＡＢＣ"
    assert TextNormalizer(lowercase=True, remove_punctuation=True)("Hello, World!") == "hello world"
    assert TextNormalizer(strip=False, collapse_whitespace=False)(" a  b ") == " a  b "


def test_scores_by_hand():
    # "12 34" vs "12 35": 1 substitution over 5 reference characters; 1 of 2 words wrong.
    s = score_predictions(["12 34", "abc"], ["12 35", "abc"])
    # CER pools edits over all rows: (1 + 0) / (5 + 3)
    assert s["cer"] == pytest.approx(1 / 8)
    assert s["wer"] == pytest.approx(1 / 3)  # (1 + 0) / (2 + 1)
    assert s["exact_match"] == 0.5
    assert "vqa_acc" not in s
    # MER = (S + D + I) / (S + D + I + hits): 1 / (1 + 2)
    assert s["mer"] == pytest.approx(1 / 3)


def test_vqa_accuracy():
    assert vqa_accuracy("2", ["2", "2", "2", "3"]) == 1.0
    assert vqa_accuracy("2", ["2", "two", "3", "4"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("cat", ["cat"]) == 1.0  # a single reference: one match is full credit
    s = score_predictions(["Two", "x"], ["two", "y"], answers=[["two", "2", "two"], None],
                          normalizer=TextNormalizer(lowercase=True))
    assert s["vqa_acc"] == pytest.approx(2 / 3)  # only the row with answers counts
    with pytest.raises(ValueError):
        vqa_accuracy("a", [])


def test_casefold_is_unicode_aware_and_runs_after_nfkc():
    casefold = TextNormalizer(casefold=True)
    assert casefold("  Straße \n\t X ") == "strasse x"  # casefold, not lower: "ß" -> "ss"
    assert TextNormalizer(lowercase=True)("  Straße \n\t X ") == "straße x"
    assert casefold("ＡＢＣ") == "abc"  # NFKC first


def test_cer_by_hand_and_empty_reference():
    assert cer("abd", "abc") == pytest.approx(1 / 3)  # one substitution in 3 reference characters
    assert cer("abcdefgh", "ab") == pytest.approx(3.0)  # 6 insertions / 2
    assert cer("", "") == 0.0 and cer("x", "") == 1.0  # CER is undefined there: exact match decides
