"""The Triton code in kernels/ must install as vlm_lightning.kernels, never as a top-level `kernels`.

bitsandbytes' CPU backend runs `from kernels import get_kernel` and transformers probes the same name
for the Hub's `kernels` package: a top-level module of ours by that name would be picked up by both.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_is_not_a_top_level_module():
    # Run from an unrelated folder so the repo root is not on sys.path (as for any installed user).
    code = "import importlib.util as u, json; s = u.find_spec('kernels'); print(s.origin if s else '')"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert str(REPO) not in origin, f"'import kernels' resolves into this repository: {origin}"


def test_kernels_installed_under_vlm_lightning():
    spec = importlib.util.find_spec("vlm_lightning.kernels")
    assert spec is not None
    assert Path(spec.origin).resolve() == REPO / "kernels" / "__init__.py"


def test_console_entry_point_installed():
    exe = Path(sys.executable).parent / "vlm-lightning"
    assert exe.exists(), "console script `vlm-lightning` missing: reinstall with `pip install -e .`"
    assert os.access(exe, os.X_OK)


def test_public_api_resolves():
    import vlm_lightning

    for name in vlm_lightning.__all__:
        assert getattr(vlm_lightning, name) is not None, name
    assert vlm_lightning.VisionSFTModule.__module__ == "vlm_lightning.modules.sft"
