"""Atomic outputs: an export interrupted half way (``vlm-lightning export merge|gguf`` killed with SIGKILL in the
middle of writing, ``SaveAdapter`` whose processor write raises) leaves no folder or file under the final name,
an older complete output stays as it was, and a re-run succeeds."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import gguf
import lightning as L
import pytest
import torch

from vlm_lightning.callbacks import MergeLoRA, SaveAdapter
from vlm_lightning.export import merge_lora
from vlm_lightning.export.atomic import atomic_dir, atomic_file
from vlm_lightning.export.cli import export_main
from vlm_lightning.modules import VisionSFTModule

# runs `vlm-lightning export <args>` and SIGKILLs itself in the middle of the write: after the merged weights
# and the processor are on disk (merge), or after the GGUF header and metadata, before the tensors (gguf)
_KILLED_EXPORT = """
import os, signal, sys
import gguf
import vlm_lightning.export.merge as merge

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "merge":
    copy = merge._copy_generation_config
    merge._copy_generation_config = lambda src, out: (copy(src, out), die())
else:
    gguf.GGUFWriter.write_tensors_to_file = die
from vlm_lightning.export.cli import export_main
sys.exit(export_main(sys.argv[1:]))
"""


def _killed_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILLED_EXPORT, *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def adapter_dir(tiny_vlm_dir, tmp_path_factory):
    module = VisionSFTModule(str(tiny_vlm_dir("qwen2_vl")), dtype="float32", r=4, gradient_checkpointing=False,
                             init_lora_weights=False)
    module.configure_model()
    return module.save_adapter(tmp_path_factory.mktemp("adapter") / "adapter")


def test_killed_merge_leaves_no_merged_folder_and_a_rerun_succeeds(adapter_dir, tmp_path):
    args = ["merge", "--checkpoint", str(adapter_dir), "--out", str(tmp_path / "merged"), "--dtype", "float32"]
    proc = _killed_export(*args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "merged").exists()
    partial = list(tmp_path.glob(".merged.partial-*"))
    assert len(partial) == 1 and list(partial[0].glob("*.safetensors"))  # it was killed mid-write
    assert export_main(args) == 0
    assert json.loads((tmp_path / "merged" / "merge_info.json").read_text())["kind"] == "lora"


def test_killed_gguf_leaves_no_gguf_file_and_a_rerun_succeeds(adapter_dir, tmp_path):
    assert export_main(["merge", "--checkpoint", str(adapter_dir), "--out", str(tmp_path / "merged"),
                        "--dtype", "float32"]) == 0
    args = ["gguf", "--checkpoint", str(tmp_path / "merged"), "--out", str(tmp_path / "gguf"), "--name", "demo"]
    proc = _killed_export(*args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not list((tmp_path / "gguf").glob("*.gguf"))
    left = [p.name for p in (tmp_path / "gguf").iterdir()]  # killed mid-write: only the temporary is there
    assert len(left) == 1 and left[0].startswith(".demo-q8_0.gguf.partial-"), left
    assert export_main(args) == 0
    assert sorted(p.name for p in (tmp_path / "gguf").glob("*.gguf")) == ["demo-q8_0.gguf", "mmproj-demo-f16.gguf"]
    assert gguf.GGUFReader(tmp_path / "gguf" / "demo-q8_0.gguf").fields["general.architecture"].contents() == "qwen2vl"


class _FailingProcessor:
    """The module's processor, whose ``save_pretrained`` fails half way (after the adapter weights)."""

    def __init__(self, processor):
        self.processor = processor

    def save_pretrained(self, directory):
        raise OSError(f"No space left on device: {directory}")


def test_save_adapter_that_fails_half_way_leaves_the_old_folder(tiny_vlm_dir, tmp_path):
    module = VisionSFTModule(str(tiny_vlm_dir("qwen2_vl")), dtype="float32", r=4, gradient_checkpointing=False,
                             init_lora_weights=False)
    module.configure_model()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    callback = SaveAdapter()
    processor, module.processor = module.processor, _FailingProcessor(module.processor)
    with pytest.raises(OSError, match="No space left"):
        callback.on_fit_end(trainer, module)
    assert list(tmp_path.iterdir()) == []  # no adapter folder, no temporary left behind
    module.processor = processor
    callback.on_fit_end(trainer, module)
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    with torch.no_grad():  # a second, failing save keeps the first folder whole
        next(p for n, p in module.model.named_parameters() if "lora_B" in n).add_(1.0)
    module.processor = _FailingProcessor(processor)
    with pytest.raises(OSError):
        callback.on_fit_end(trainer, module)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_dir_and_file_replace_only_when_complete(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "b.txt").write_text("3")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]  # the new folder replaces the old one
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
        raise RuntimeError("interrupted")
    with atomic_file(tmp_path / "g.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gguf", "out"]


def test_outputs_that_would_replace_their_own_source_are_refused(adapter_dir, tmp_path):
    with pytest.raises(ValueError, match="inside out_dir"):
        merge_lora(adapter_dir, adapter_dir.parent)
    with pytest.raises(ValueError, match="inside out_dir"):
        MergeLoRA(str(tmp_path / "merged"), adapter_dir=str(tmp_path / "merged" / "adapter"))
    assert (adapter_dir / "adapter_config.json").is_file()
