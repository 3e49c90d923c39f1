"""Atomic outputs: write a folder or a file under a temporary name in the same folder, rename it when complete.

An interrupted write (an exception, a killed process) never leaves a folder or file under the final name
that looks whole: the temporary name starts with a dot and ends in ``.partial-<pid>``. An exception removes
the temporary; a killed process leaves it beside the final name (a re-run writes its own and succeeds). An
existing final folder is replaced only once the new one is complete. Left out: cross-filesystem moves (the
temporary is always a sibling, so the rename is one ``os.replace``) and fsync.

Example:
    >>> with atomic_dir("runs/demo/merged") as tmp:  # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    >>> with atomic_file("runs/demo/gguf/demo-q8_0.gguf") as tmp:  # doctest: +SKIP
    ...     write_gguf(tmp)
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "inside", "partial_name"]


def partial_name(path: str | Path) -> Path:
    """The temporary sibling of ``path`` this process writes: ``<parent>/.<name>.partial-<pid>``."""
    path = Path(path)
    return path.parent / f".{path.name}.partial-{os.getpid()}"


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (what an ``atomic_dir(folder)`` replacement would remove)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` (an old folder there is
    removed after the rename), on an exception it is removed and ``path`` is left as it was."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.is_dir():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; on success it is renamed to ``path`` (replacing it), on an
    exception it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(final)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
