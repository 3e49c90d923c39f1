"""Reward callables (TRL signature) and their combination: values by hand, None/NaN, errors naming the row."""
import math

import pytest
import torch

from vlm_lightning.losses import group_advantages
from vlm_lightning.rewards import (
    ExactMatchReward,
    FormatReward,
    LengthPenalty,
    NumericAnswerReward,
    OCRReward,
    RewardError,
    RewardSet,
    completion_text,
    compute_rewards,
    parse_number,
)


def conv(text):
    return [{"role": "assistant", "content": text}]


def test_completion_text_forms():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]) == "ab"
    with pytest.raises(TypeError):
        completion_text(3)


def test_ocr_reward_is_one_minus_cer():
    r = OCRReward()
    # "abd" vs "abc": 1 substitution / 3 chars -> 1 - 1/3; "" vs "abc" -> CER 1 -> 0;
    # "abcdefgh" vs "ab": 6 insertions / 2 = CER 3 -> clipped to 0; exact -> 1; conversational works
    out = r(None, ["abd", "", "abcdefgh", "12 34", conv("xyz")], references=["abc", "abc", "ab", "12  34", "xyz"])
    assert out[0] == pytest.approx(2 / 3, abs=1e-6)
    assert out[1:] == [0.0, 0.0, 1.0, 1.0]
    # configurable column, default fallback to "answer", None reference -> None, empty reference
    assert OCRReward(reference_column="text")(None, ["ab"], text=["ab"]) == [1.0]
    assert OCRReward()(None, ["ab", "x", "", "q"], answer=["ab", None, "", ""]) == [1.0, None, 1.0, 0.0]
    with pytest.raises(RewardError, match="reference_column"):
        OCRReward()(None, ["ab"], labels=["ab"])
    # answer_tag: only the tagged part is scored; no tag -> 0
    assert OCRReward(answer_tag="answer")(None, ["<think>x</think><answer>42</answer>", "42"],
                                          references=["42", "42"]) == [1.0, 0.0]


def test_exact_match_normalisation():
    r = ExactMatchReward()
    refs = ["hello world", "hello", "Hello", "x"]
    # whitespace collapse + strip + casefold; NFKC turns fullwidth letters into ASCII; "y" != "x"
    assert r(None, ["  Hello \n  World ", "ｈｅｌｌｏ", "HELLO", "y"], references=refs) == [1.0, 1.0, 1.0, 0.0]
    assert ExactMatchReward(case_sensitive=True)(None, ["HELLO"], references=["Hello"]) == [0.0]
    assert r(None, ["b"], references=[["a", "b"]]) == [1.0]  # any of several references


def test_format_reward():
    r = FormatReward()
    comps = ["<think>a\nb</think>\n<answer>7</answer>", "<answer>7</answer>", "<think>a</think><answer>7</answer> tail",
             conv(" <think></think><answer></answer> ")]
    assert r(None, comps) == [1.0, 0.0, 0.0, 1.0]
    assert FormatReward(pattern=r"\d+")(None, ["123", "12a"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="invalid regex"):
        FormatReward(pattern="(")


def test_numeric_answer_reward():
    assert parse_number("total: 1,234.5 units") == 1234.5
    assert parse_number("-3 or .5") == 0.5
    assert parse_number("none") is None
    r = NumericAnswerReward()
    comps = ["<answer>1,234.0</answer>", "it is 41, no 42", "no number", "<answer>3.0001</answer>",
             "<answer>-2</answer>"]
    assert r(None, comps, references=["1234", 42, "7", 3, "-2"]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert NumericAnswerReward(atol=1e-3)(None, ["<answer>3.0001</answer>"], references=[3]) == [1.0]
    assert NumericAnswerReward(rtol=0.1)(None, ["105"], references=[100]) == [1.0]
    with pytest.raises(RewardError, match="row 1"):
        r(None, ["1", "2"], references=["1", "n/a"])


def test_length_penalty_soft_overlong():
    # max 10, ramp 4 -> 0 up to 6 chars, -(L - 6) / 4 on 7..10, -1 beyond
    r = LengthPenalty(max_length=10, cache_length=4)
    assert r(None, ["x" * 6, "x" * 8, "x" * 10, "x" * 11]) == [0.0, -0.5, -1.0, -1.0]
    assert LengthPenalty(5)(None, ["abcde", "abcdef"]) == [0.0, -1.0]
    tok = LengthPenalty(max_length=3, unit="tokens")
    assert tok(None, ["a", "b"], completion_ids=[[1, 2, 3], [1, 2, 3, 4]]) == [0.0, -1.0]
    with pytest.raises(RewardError, match="completion_ids"):
        tok(None, ["a"])
    with pytest.raises(ValueError):
        LengthPenalty(max_length=3, cache_length=5)


def test_compute_rewards_weights_and_none():
    def half(prompts, completions, **kw):
        return [0.5] * len(completions)

    def partial(prompts, completions, **kw):
        return [None, 1.0, None]

    def never(prompts, completions, **kw):
        return [None, None, float("nan")]

    total, per_fn = compute_rewards([half, partial], [2.0, 3.0], ["p"] * 3, ["a", "b", "c"])
    # row 0: 2*0.5 + (None skipped) = 1; row 1: 2*0.5 + 3*1 = 4; row 2: 1
    assert total.tolist() == [1.0, 4.0, 1.0]
    assert set(per_fn) == {"half", "partial"} and math.isnan(per_fn["partial"][0])
    # a row no function scored is NaN, and becomes a 0 advantage
    total, _ = compute_rewards([partial, never], None, None, ["a", "b", "c"])
    assert math.isnan(total[0]) and total[1] == 1.0
    with pytest.warns(UserWarning, match="every reward function returned None"):
        total, _ = compute_rewards([never], None, None, ["a", "b", "c"])
    assert torch.isnan(total).all()
    assert torch.equal(group_advantages(torch.cat([total, torch.tensor([1.0])]), 2), torch.zeros(4))
    # duplicate names get a suffix
    _, per_fn = compute_rewards([half, half], None, None, ["a"])
    assert list(per_fn) == ["half", "half_1"]


def test_reward_errors_name_function_and_row():
    def picky(prompts, completions, **kw):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on an empty completion

    with pytest.raises(RewardError, match=r"'picky' raised ZeroDivisionError on row 2"):
        compute_rewards([picky], None, None, ["a", "bb", "", "c"])

    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(RewardError, match="'short' returned 1 values for 3 completions"):
        compute_rewards([short], None, None, ["a", "b", "c"])

    def infinite(prompts, completions, **kw):
        return [1.0, float("inf")]

    with pytest.raises(RewardError, match="row 1"):
        compute_rewards([infinite], None, None, ["a", "b"])

    def wordy(prompts, completions, **kw):
        return ["good"] * len(completions)

    with pytest.raises(RewardError, match="expected a float"):
        compute_rewards([wordy], None, None, ["a"])
    with pytest.raises(ValueError, match="weights"):
        compute_rewards([short], [1.0, 2.0], None, ["a"])
    with pytest.raises(ValueError, match="column 'references'"):
        compute_rewards([OCRReward()], None, None, ["a", "b"], {"references": ["a"]})
    # built-in rewards name the row themselves
    with pytest.raises(RewardError, match="numeric_answer.*row 0"):
        compute_rewards([NumericAnswerReward()], None, None, ["1"], {"references": ["?"]})


def test_reward_set_columns_and_yaml_like_build():
    rs = RewardSet([OCRReward(), FormatReward(pattern=r"\d+"), LengthPenalty(3)], weights=[1.0, 0.5, 1.0])
    assert rs.names == ["ocr", "format", "length_penalty"]
    total, per_fn = rs(["p", "p"], ["123", "12x4"], references=["123", "1234"])
    # row 0: 1 + 0.5 + 0 = 1.5; row 1: (1 - 1/4) + 0 + -1 = -0.25
    assert total.tolist() == pytest.approx([1.5, -0.25])
    assert per_fn["ocr"].shape == (2,)
    with pytest.raises(ValueError, match="weights"):
        RewardSet([OCRReward()], weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="not callable"):
        RewardSet([3])
