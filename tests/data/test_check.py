"""The data check report (``VisionChatDataModule.check`` / ``check_splits``): bad rows are listed, never raised;
messages carry one row prefix, describe values instead of printing object reprs, and state their numbering;
empty assistant answers are warned about."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlm_lightning.data import VisionChatDataModule


@pytest.fixture(scope="module")
def qwen_dir(tiny_vlm_dir) -> str:
    return str(tiny_vlm_dir("qwen2_vl"))


def _png(path: Path, size=(64, 32)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (20, 20, 20)).save(path)
    return str(path)


def test_check_lists_a_bad_row_and_goes_on(qwen_dir, tmp_path):
    # issue 17 item 1: two <image> placeholders but one image used to raise out of check() (through setup)
    bad = {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>x"},
                                               {"from": "gpt", "value": "y"}]}
    good = {"image": _png(tmp_path / "ok.png"), "text": "42"}
    dm = VisionChatDataModule(qwen_dir, train=[bad, good])
    report = dm.check(verbose=False)
    tr = report.splits["train"]
    assert (tr.rows, tr.ok) == (2, 1) and report.bad_indices["train"] == [0]
    assert "row 0: 2 image placeholder(s) but 1 image(s)" in str(report)
    with pytest.raises(ValueError, match=r"train split: row 0: 2 image placeholder"):
        dm.setup()  # the default on_bad_example="raise" still refuses the split in setup


def test_check_messages_one_prefix_no_reprs_numbering_stated(qwen_dir, tmp_path):
    # issue 17 item 7: "row 2: row 2: ...", "<_io.BytesIO object at 0x...>", rows from 0 but lines from 1
    data = tmp_path / "train.jsonl"
    rows = [{"image": _png(tmp_path / "a.png"), "text": "1"}, None,
            {"image": str(tmp_path / "missing.png"), "text": "2"}]
    data.write_text("\n".join("" if r is None else json.dumps(r) for r in rows) + "\n{broken\n")
    listed = [{"image": _png(tmp_path / "b.png"), "text": "3"}, {"image": b"not an image", "text": "4"},
              {"image": _png(tmp_path / "c.png"), "text": "5"},
              {"image": _png(tmp_path / "d.png"), "text": "6", "messages": "oops"}]
    dm = VisionChatDataModule(qwen_dir, train=str(data), val=listed)
    printed = str(dm.check(verbose=False))
    assert not re.search(r"row (\d+)(?: \(line \d+\))?: row \1", printed), printed
    assert " object at 0x" not in printed, printed
    assert "bytes (12 B)" in printed, printed
    assert "row 1 (line 3): " in printed, printed  # JSONL rows name their line; the blank line 2 is no row
    assert "row 1: " in printed and "row 3: " in printed  # list rows have no line
    assert "rows count from 0, lines from 1" in printed
    assert "train.jsonl: line 4: invalid JSON" in printed  # listed, not raised (on_bad_example="raise" or not)


def test_check_warns_about_empty_answers(qwen_dir, tmp_path):
    # issue 17 item 5: an empty answer trains only the end-of-turn token; check() says so, naming the row
    rows = [{"image": _png(tmp_path / f"{i}.png"), "text": t} for i, t in enumerate(["12", "", "7", "  "])]
    report = VisionChatDataModule(qwen_dir, train=rows, on_empty_answer="keep").check(verbose=False)
    tr = report.splits["train"]
    assert tr.empty_answers == [1, 3] and tr.ok == 4
    printed = str(report)
    assert "empty answers 2" in printed and "row 1: empty assistant answer" in printed
