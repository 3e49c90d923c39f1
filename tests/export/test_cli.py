"""`vlm-lightning export merge|gguf|push`, the MergeLoRA / GGUFExport callbacks in a real fit, and the Hub
upload failing clearly offline after every file is on disk."""
from __future__ import annotations

import json

import gguf
import pytest
import torch

from vlm_lightning.export.cli import export_main
from vlm_lightning.export.hub import HubUploadError


@pytest.fixture(scope="module")
def adapter_dir(tiny_vlm_dir, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lightning.models import apply_lora

    base = tiny_vlm_dir("qwen2_vl")
    torch.manual_seed(0)
    model = apply_lora(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), r=4,
                       init_lora_weights=False, gradient_checkpointing=False)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out


def test_cli_merge_then_gguf(adapter_dir, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    assert export_main(["merge", "--checkpoint", str(adapter_dir), "--out", str(tmp_path / "merged"),
                        "--dtype", "float32"]) == 0
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    rc = export_main(["gguf", "--checkpoint", str(tmp_path / "merged"), "--out", str(tmp_path / "gguf"),
                      "--quant", "q8_0", "--quant", "f16", "--name", "demo"])
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert names == ["demo-f16.gguf", "demo-q8_0.gguf", "mmproj-demo-f16.gguf"]
    assert "mmproj: " in capsys.readouterr().out


def test_cli_gguf_straight_from_adapter(adapter_dir, tmp_path):
    assert export_main(["gguf", "--checkpoint", str(adapter_dir), "--out", str(tmp_path), "--dtype", "float32"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    r = gguf.GGUFReader(tmp_path / "merged-q8_0.gguf")
    assert r.fields["general.architecture"].contents() == "qwen2vl"
    assert (tmp_path / "mmproj-merged-f16.gguf").is_file()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert export_main(["merge", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown quant
        export_main(["gguf", "--checkpoint", str(tmp_path), "--out", str(tmp_path), "--quant", "q3_xx"])


def test_console_script_routes_export(tmp_path):
    """`vlm-lightning export ...` reaches export_main through the package's entry point."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "vlm-lightning"
    out = subprocess.run([str(exe), "export", "merge", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--checkpoint" in out.stdout


def test_push_offline_fails_clearly_after_files_are_written(adapter_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "merged"
    from vlm_lightning.export import merge_lora

    with pytest.raises(HubUploadError, match="offline.*safe on disk") as err:
        merge_lora(adapter_dir, out, dtype="float32", push_to_hub="me/tiny-merged")
    assert err.value.local_path == out
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()

    rc = export_main(["gguf", "--checkpoint", str(out), "--out", str(tmp_path / "gguf"), "--quant", "f16",
                      "--push-to-hub", "me/tiny-gguf"])
    assert rc == 3  # upload failed ...
    assert (tmp_path / "gguf" / "merged-f16.gguf").is_file()  # ... but the files are there
    assert (tmp_path / "gguf" / "mmproj-merged-f16.gguf").is_file()


def test_callbacks_merge_and_gguf_at_fit_end(tiny_vlm_dir, tmp_path, monkeypatch):
    import lightning as L

    from vlm_lightning.callbacks import GGUFExport, MergeLoRA
    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.demo.data import make_demo_ocr_dataset
    from vlm_lightning.modules import VisionSFTModule

    base = str(tiny_vlm_dir("qwen2_vl"))
    paths = make_demo_ocr_dataset(tmp_path / "data", n_train=2, n_val=2)
    module = VisionSFTModule(base, dtype="float32", r=4, gradient_checkpointing=False)
    dm = VisionChatDataModule(base, train=str(paths["train"]), val=str(paths["val"]), batch_size=2)
    merge = MergeLoRA(str(tmp_path / "merged"), dtype="float32", adapter_dir=str(tmp_path / "adapter"))
    export = GGUFExport(str(tmp_path / "gguf"), quants=["f16", "q8_0"], push_to_hub="me/tiny-gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt, merge, export])
    with pytest.raises(HubUploadError):  # offline: the upload fails, after the files are written
        trainer.fit(module, datamodule=dm)

    from transformers import AutoModelForImageTextToText

    merged, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # the merged weights carry the trained adapter: compare with the module's PEFT model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = module.model.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "merged" / "merge_info.json").read_text())["base_weights"] == "reloaded"
    assert sorted(p.name for p in (tmp_path / "gguf").glob("*.gguf")) == ["merged-f16.gguf", "merged-q8_0.gguf",
                                                                        "mmproj-merged-f16.gguf"]

    # the same merge from the Lightning checkpoint, through the command line
    last = tmp_path / "ckpt" / "last.ckpt"
    assert export_main(["merge", "--checkpoint", str(last), "--out", str(tmp_path / "from_ckpt"),
                        "--dtype", "float32"]) == 0
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "from_ckpt", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want, atol=1e-4, rtol=0)
