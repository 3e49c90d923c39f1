"""Text scoring (vlm_lightning.metrics.text): the normaliser's options, CER/WER/MER/exact match and VQA accuracy
worked out by hand, casefolding (what the rewards compare), ``cer`` with an empty reference, ANLS (DocVQA) by hand."""
from __future__ import annotations

import pytest

from vlm_lightning.metrics.text import TextNormalizer, anls, cer, levenshtein, score_predictions, vqa_accuracy


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


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("", "") == 0
    assert levenshtein("flaw", "lawn") == 2  # -f, +n


def test_anls_by_hand():
    # DocVQA normalisation: lower case, whitespace runs collapsed, ends stripped -> identical: 1
    assert anls("  Hello\n World ", ["hello world"]) == 1.0
    # "invoice no 12" (13 chars) vs "invoice no. 12" (14): 1 insertion, NL = 1/14 -> 1 - 1/14 = 13/14
    assert anls("Invoice No 12", ["invoice no. 12"]) == pytest.approx(13 / 14)
    # "abcde" vs "abcxy": 2 substitutions / 5 = 0.4 < tau -> 0.6
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)
    # "abcd" vs "abxy": NL = 2/4 = 0.5, not < tau = 0.5 -> 0 (the threshold is strict, as in Biten et al.)
    assert anls("abcd", ["abxy"]) == 0.0
    assert anls("abcd", ["abxy"], tau=0.6) == pytest.approx(0.5)
    # best over the answers: "1999" vs "1998" 1/4 -> 0.75; vs "nineteen" NL = 8/8 -> 0
    assert anls("1999", ["nineteen", "1998"]) == pytest.approx(0.75)
    assert anls("", ["abc"]) == 0.0 and anls("", [""]) == 1.0  # NL(empty, empty) = 0
    with pytest.raises(ValueError):
        anls("a", [])


def test_anls_mean_over_questions():
    # row 1: no answers -> its reference; "Total: 5" vs "total:  5" equal after normalisation -> 1
    # row 2: "ye" vs "yes" 1/3 -> 2/3, vs "no" 2/2 -> 0; best 2/3.  Mean (1 + 2/3) / 2 = 5/6
    s = score_predictions(["Total: 5", "ye"], ["total:  5", "y"], answers=[None, ["yes", "no"]])
    assert s["anls"] == pytest.approx(5 / 6)
