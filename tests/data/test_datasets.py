"""Row sources (``load_rows``): JSONL line numbers, and malformed JSON lines refused or skipped and counted."""

from __future__ import annotations

import json
import logging

import pytest

from vlm_lightning.data import load_rows


def _jsonl(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_rows_know_their_lines(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "0"}), "", json.dumps({"text": "1"})])
    src = load_rows(p)
    assert [r["text"] for r in src.rows] == ["0", "1"] and src.lines == [1, 3]
    assert src.base_dir == str(tmp_path.resolve()) and src.bad_lines == []
    assert load_rows([{"text": "x"}]).lines is None


def test_malformed_json_line_raises_naming_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "0"}), "{not json", json.dumps({"text": "2"})])
    with pytest.raises(ValueError, match=r"a\.jsonl: line 2: invalid JSON"):
        load_rows(p)


def test_malformed_json_line_is_skipped_and_counted(tmp_path, caplog):
    # issue 17 item 6: one broken line used to refuse the whole file, even with on_bad_example="skip"
    p = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "0"}), "{not json", json.dumps({"text": "2"})])
    with caplog.at_level(logging.WARNING):
        src = load_rows(p, on_bad_line="skip")
    assert [r["text"] for r in src.rows] == ["0", "2"] and src.lines == [1, 3]
    assert [n for n, _ in src.bad_lines] == [2]
    assert "a.jsonl: line 2: invalid JSON" in caplog.text and "skipped" in caplog.text
    with pytest.raises(ValueError, match="on_bad_line"):
        load_rows(p, on_bad_line="ignore")
