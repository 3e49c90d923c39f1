"""Shared pytest fixtures.

`tiny_vlm_dir(family)` builds (once per test session) a tiny random-weight VLM directory for a
family in `vlm_lightning.models.tiny.TINY_FAMILIES` and returns its path:

    def test_something(tiny_vlm_dir):
        path = tiny_vlm_dir("qwen2_vl")
        model = AutoModelForImageTextToText.from_pretrained(path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Callable[[str], Path]:
    """Factory `family -> Path` of a tiny VLM directory, built on first use and cached for the session.

    Treat the directory as read-only: other tests share it.
    """
    from vlm_lightning.models.tiny import make_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlms")
    cache: dict[str, Path] = {}

    def _get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_vlm(family, root / family)
        return cache[family]

    return _get
