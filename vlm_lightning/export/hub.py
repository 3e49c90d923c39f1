"""Upload an export (merged folder, adapter folder or GGUF files) to the Hugging Face Hub.

Files are always written to disk first; an upload that fails (offline, no token, no permission) raises
`HubUploadError`, whose message says where the files are, so nothing is lost.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi

__all__ = ["HubUploadError", "push_folder", "hub_offline"]

_TRUE = {"1", "true", "yes", "on"}


class HubUploadError(RuntimeError):
    """The upload failed; `local_path` still holds every file."""

    def __init__(self, message: str, local_path: Path):
        super().__init__(message)
        self.local_path = local_path


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now (read at call time, not import time)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
    commit_message: str = "Upload with vlm-lightning",
) -> str:
    """Create `repo_id` (private by default) if needed and upload `folder`; returns the repo URL.

    The token comes from `token`, else `HF_TOKEN` / the cached login (huggingface_hub's usual lookup).

    Example:
        >>> push_folder("runs/demo/merged", "me/demo-ocr-merged")  # doctest: +SKIP
        'https://huggingface.co/me/demo-ocr-merged'
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"nothing to upload: {folder} does not exist")
    where = f"the files are safe on disk at {folder.resolve()}"
    if hub_offline():
        raise HubUploadError(
            f"cannot push to the Hub repo {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1); {where}. "
            f"Upload later with `huggingface-cli upload {repo_id} {folder}`.",
            folder,
        )
    try:
        api = HfApi(token=token or os.environ.get("HF_TOKEN") or None)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=allow_patterns,
                          commit_message=commit_message)
    except Exception as err:  # network, auth, permissions: all the same to the caller
        raise HubUploadError(f"upload to the Hub repo {repo_id!r} failed ({type(err).__name__}: {err}); {where}",
                             folder) from err
    return str(url)
