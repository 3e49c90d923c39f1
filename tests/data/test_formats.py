"""Row formats: every accepted shape normalises to the one conversation form; bad rows name their index."""

from __future__ import annotations

import pytest
from PIL import Image

from vlm_lightning.data.formats import FormatOptions, RowFormatError, detect_format, normalize_row


def _img(part):
    return {"type": "image", "image": part}


def _txt(text):
    return {"type": "text", "text": text}


def test_messages_with_inline_images_and_string_content():
    pil = Image.new("RGB", (32, 32))
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Read."}]},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
        ],
        "id": "x1",
    }
    out = normalize_row(row, 5)
    assert out["index"] == 5 and out["id"] == "x1"
    assert out["messages"] == [
        {"role": "user", "content": [_img("a.png"), _txt("Read.")]},
        {"role": "assistant", "content": [_txt("42")]},
        {"role": "user", "content": [_img(pil), _txt("And this?")]},
        {"role": "assistant", "content": [_txt("7")]},
    ]


def test_messages_with_bare_placeholders_filled_from_images_column():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        ],
        "images": ["a.png", {"bytes": b"xx", "path": None}],
    }
    out = normalize_row(row, 0)
    assert out["messages"][0]["content"] == [_img("a.png"), _img({"bytes": b"xx", "path": None}), _txt("Same?")]
    assert "images" not in out


def test_messages_arrow_style_parts_with_null_keys_and_url_keys():
    # datasets/Arrow fills missing struct fields with None: {"type": "text", "text": "..", "image": None}
    row = {
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "image": None, "text": None},
                {"type": "image", "url": "https://example.com/b.png"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Q", "image": None},
            ]},
            {"role": "assistant", "content": "A"},
        ],
        "images": ["a.png"],
    }
    parts = normalize_row(row, 0)["messages"][0]["content"]
    assert [p.get("image") for p in parts] == ["a.png", "https://example.com/b.png", "data:image/png;base64,AAAA", None]


def test_messages_string_content_with_image_tags():
    row = {"messages": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Cat"}],
           "images": ["c.jpg"]}
    assert normalize_row(row, 0)["messages"][0]["content"] == [_img("c.jpg"), _txt("What is it?")]


def test_llava_format_with_several_image_tags():
    row = {
        "id": "l1",
        "images": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare the two."},
            {"from": "gpt", "value": "Left is bigger."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    assert detect_format(row) == "llava"
    out = normalize_row(row, 3, FormatOptions(system_prompt="Be brief."))
    assert out["id"] == "l1"
    assert out["messages"] == [
        {"role": "system", "content": [_txt("Be brief.")]},
        {"role": "user", "content": [_img("a.png"), _img("b.png"), _txt("Compare the two.")]},
        {"role": "assistant", "content": [_txt("Left is bigger.")]},
        {"role": "user", "content": [_txt("Sure?")]},
        {"role": "assistant", "content": [_txt("Yes.")]},
    ]


def test_llava_single_image_column():
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "Describe <image>"},
                                                 {"from": "gpt", "value": "Red."}]}
    assert normalize_row(row, 0)["messages"][0]["content"] == [_txt("Describe "), _img("a.png")]


def test_image_text_format_with_instruction_and_system_prompt():
    row = {"image": "a.png", "text": "HELLO 42"}
    assert detect_format(row) == "image_text"
    out = normalize_row(row, 1, FormatOptions(instruction="Transcribe.", system_prompt="You read text."))
    assert out["messages"] == [
        {"role": "system", "content": [_txt("You read text.")]},
        {"role": "user", "content": [_img("a.png"), _txt("Transcribe.")]},
        {"role": "assistant", "content": [_txt("HELLO 42")]},
    ]


def test_image_text_custom_columns():
    row = {"picture": "a.png", "ocr_truth": "XY"}
    out = normalize_row(row, 0, FormatOptions(format="image_text", image_column="picture", text_column="ocr_truth"))
    assert out["messages"][1]["content"] == [_txt("XY")]


def test_vqa_with_answer_list_keeps_all_answers():
    row = {"image": "a.png", "question": "How many?", "answers": ["3", "three", {"answer": "3"}], "qid": 9}
    assert detect_format(row) == "vqa"
    out = normalize_row(row, 2)
    assert out["messages"] == [
        {"role": "user", "content": [_img("a.png"), _txt("How many?")]},
        {"role": "assistant", "content": [_txt("3")]},
    ]
    assert out["answers"] == ["3", "three", "3"] and out["qid"] == 9


def test_vqa_single_answer_string():
    out = normalize_row({"image": "a.png", "question": "Q?", "answer": "yes"}, 0)
    assert out["answers"] == ["yes"] and out["messages"][1]["content"] == [_txt("yes")]


def test_system_prompt_not_duplicated():
    row = {"messages": [{"role": "system", "content": "S0"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}]}
    msgs = normalize_row(row, 0, FormatOptions(system_prompt="S1"))["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[0]["content"] == [_txt("S0")]


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [{"role": "user",
                       "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": "a"}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}],
         "images": ["a.png", "b.png"]},
        {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image><image> two?"},
                                                  {"from": "gpt", "value": "x"}]},
        {"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> one?"},
                                                           {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}]},
    ],
    ids=["messages-2tags-1img", "messages-1tag-2img", "llava-2tags-1img", "llava-1tag-2img", "llava-0tags-1img"],
)
def test_placeholder_count_mismatch_raises_with_row_index(row):
    with pytest.raises(RowFormatError, match=r"^row 17: .*placeholder") as exc:
        normalize_row(row, 17)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"foo": 1}, "cannot detect the format"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}]}, "unsupported content"),
        ({"image": "a.png", "question": "q", "answers": []}, "no answer"),
    ],
)
def test_bad_rows_raise_with_row_index(row, match):
    with pytest.raises(RowFormatError, match=rf"^row 4: .*{match}"):
        normalize_row(row, 4)


def test_forced_format_and_invalid_format_name():
    with pytest.raises(ValueError, match="format="):
        FormatOptions(format="sharegpt")
    with pytest.raises(RowFormatError, match="row 0"):
        normalize_row({"image": "a.png", "text": "t"}, 0, FormatOptions(format="vqa"))


def test_base_dir_resolves_existing_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                     {"type": "image", "image": "https://x.org/b.png"},
                                                     {"type": "image", "image": {"bytes": None, "path": "img/a.png"}}]},
                        {"role": "assistant", "content": "a"}]}
    parts = normalize_row(row, 0, FormatOptions(base_dir=str(tmp_path)))["messages"][0]["content"]
    assert parts[0]["image"] == str(tmp_path / "img" / "a.png")
    assert parts[1]["image"] == "https://x.org/b.png"
    assert parts[2]["image"]["path"] == str(tmp_path / "img" / "a.png")
