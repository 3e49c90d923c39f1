"""Export from what `vlm-lightning fit` leaves behind (issue 12): a LightningCLI `last.ckpt` of a LoRA run with
`use_kernels` + `fused_lora`, of a full fine-tune, and of VisionGRPOModule, through `vlm-lightning export`.

Checked on the raw safetensors (hub key layout, as transformers saves it): every LoRA-targeted merged
tensor equals base + scaling * B @ A from the checkpoint's own tensors, every other tensor is bit-identical
to the base, `architectures` names the stock class, the processor carries the recipe's `max_pixels`, and a
base that lacks a weight is refused before anything is written.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlm_lightning.export import BaseWeightsMissing, merge_lora
from vlm_lightning.export.cli import export_main

STOCK = "Qwen2_5_VLForConditionalGeneration"
MAX_PIXELS = 6272


def _write_config(tmp: Path, base: Path, data: dict, **model_args) -> Path:
    import yaml

    cfg = {
        "model": {"class_path": "vlm_lightning.modules.VisionSFTModule", "init_args": {
            "model_name_or_path": str(base), "dtype": "float32", "gradient_checkpointing": False,
            "use_kernels": True, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            **model_args}},
        "data": {"train": str(data["train"]), "val": str(data["val"]), "batch_size": 2, "num_workers": 0,
                 "max_pixels": MAX_PIXELS},
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp / "checkpoints"), "save_last": True}}]},
        "seed_everything": 0,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(tmp: Path, base: Path, **model_args):
    """`vlm-lightning fit --config ...` in this process; returns (last.ckpt, the trained module)."""
    from vlm_lightning.cli import cli_main
    from vlm_lightning.demo.data import make_demo_ocr_dataset

    data = make_demo_ocr_dataset(tmp / "data", n_train=4, n_val=2)
    cli = cli_main(["fit", "--config", str(_write_config(tmp, base, data, **model_args))])
    return tmp / "checkpoints" / "last.ckpt", cli.model


def _raw(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def _hub_key(module_path: str) -> str:
    """Qwen2.5-VL module path in the model -> its key prefix in the hub files."""
    if module_path.startswith("model.visual."):
        return module_path.replace("model.visual.", "visual.", 1)
    return module_path.replace("model.language_model.", "model.", 1)


def _processor_max_pixels(folder: Path) -> int | None:
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (folder / name).is_file():
            d = json.loads((folder / name).read_text())
            d = {**d, **(d.get("image_processor") or {})}
            return (d.get("size") or {}).get("longest_edge") or d.get("max_pixels")
    return None


@pytest.fixture(scope="module")
def lora_run(tiny_vlm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    ckpt, module = _fit(tmp, tiny_vlm_dir("qwen2_5_vl"), r=4, lora_alpha=8, init_lora_weights=False,
                        fused_lora=True, finetune_projector=True)
    return tmp, ckpt, module


def test_lightning_cli_checkpoint_merges_exactly(lora_run, tiny_vlm_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    _, ckpt, module = lora_run
    base = tiny_vlm_dir("qwen2_5_vl")
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "_class_path" in stored["hyper_parameters"]  # what broke the old rebuild-the-module export
    assert type(module.hf_model).__name__.startswith("Fused")  # the kernels patched the trained model

    out = tmp_path / "merged"
    assert export_main(["merge", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "float32"]) == 0

    merged, original = _raw(out), _raw(base)
    assert merged.keys() == original.keys()
    info = stored["vlm_lightning"]
    scaling = info["peft_config"]["lora_alpha"] / info["peft_config"]["r"]
    state = {k.removeprefix("model.base_model.model."): v for k, v in stored["state_dict"].items()}
    targeted, saved = set(), set()
    for key, a in state.items():
        if ".lora_A.default." in key:
            module_path = key.split(".lora_A.")[0]
            b = state[f"{module_path}.lora_B.default.weight"]
            hub = _hub_key(module_path) + ".weight"
            want = original[hub] + scaling * (b @ a)
            assert (merged[hub] - want).abs().max() <= 1e-5 * want.abs().max(), hub
            assert not torch.equal(merged[hub], original[hub]), f"{hub}: the adapter did not move it"
            targeted.add(hub)
        elif ".modules_to_save.default." in key:
            hub = _hub_key(key.replace(".modules_to_save.default.", "."))
            assert torch.equal(merged[hub], state[key]), hub  # the trained copy of the projector
            saved.add(hub)
    assert len(targeted) == 14 and saved  # 2 layers x 7 linears; the projector copy
    for key in original.keys() - targeted - saved:
        assert torch.equal(merged[key], original[key]), f"{key} is not the base's"

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [STOCK]
    _, load = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not load["missing_keys"] and not load["unexpected_keys"] and not load["mismatched_keys"]
    assert _processor_max_pixels(out) == MAX_PIXELS
    assert json.loads((out / "merge_info.json").read_text())["processor_kwargs"] == {"max_pixels": MAX_PIXELS}


def test_one_processor_travels_adapter_merge_and_mmproj(lora_run, tmp_path):
    import gguf

    _, ckpt, module = lora_run
    adapter = module.save_adapter(tmp_path / "adapter")
    assert _processor_max_pixels(adapter) == MAX_PIXELS
    assert "Fused" not in (adapter / "adapter_config.json").read_text()
    # the adapter folder merges to the same weights as the checkpoint
    from_adapter = merge_lora(adapter, tmp_path / "from_adapter", dtype="float32")
    assert _processor_max_pixels(from_adapter) == MAX_PIXELS
    from_ckpt = merge_lora(ckpt, tmp_path / "from_ckpt", dtype="float32")
    a, b = _raw(from_adapter), _raw(from_ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert export_main(["gguf", "--checkpoint", str(from_ckpt), "--out", str(tmp_path / "gguf"), "--quant", "f16"]) == 0
    r = gguf.GGUFReader(tmp_path / "gguf" / "mmproj-from_ckpt-f16.gguf")
    assert r.fields["clip.vision.image_max_pixels"].contents() == MAX_PIXELS


def test_base_missing_a_weight_is_refused(lora_run, tiny_vlm_dir, tmp_path, capsys):
    _, ckpt, _ = lora_run
    broken = tmp_path / "broken_base"
    shutil.copytree(tiny_vlm_dir("qwen2_5_vl"), broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.0.input_layernorm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "merged"
    rc = export_main(["merge", "--checkpoint", str(ckpt), "--base", str(broken), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "layers.0.input_layernorm.weight" in err and str(broken) in err and "Refusing" in err
    assert not out.exists()
    with pytest.raises(BaseWeightsMissing, match="input_layernorm"):
        merge_lora(ckpt, out, base_name_or_path=str(broken))
    assert not out.exists()


def test_full_finetune_checkpoint_exports(tiny_vlm_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    base = tiny_vlm_dir("qwen2_5_vl")
    ckpt, module = _fit(tmp_path / "run", base, lora=False)
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert stored["vlm_lightning"]["adapter_only"] is False

    out = tmp_path / "merged"
    assert export_main(["merge", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "float32"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == [STOCK]
    merged, load = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not load["missing_keys"] and not load["unexpected_keys"]
    params = dict(merged.named_parameters())
    trained = {k.removeprefix("model."): v for k, v in stored["state_dict"].items()}
    assert trained.keys() <= params.keys()
    assert all(torch.equal(params[k], v) for k, v in trained.items())  # every trained weight landed, exactly
    assert any(not torch.equal(v, o) for v, o in zip(_raw(out).values(), _raw(base).values()))
    assert _processor_max_pixels(out) == MAX_PIXELS

    saved = module.save_adapter(tmp_path / "full_model")  # the full model, under its stock class name
    assert json.loads((saved / "config.json").read_text())["architectures"] == [STOCK]
    assert export_main(["gguf", "--checkpoint", str(out), "--out", str(tmp_path / "gguf"), "--quant", "f16"]) == 0
    assert (tmp_path / "gguf" / "mmproj-merged-f16.gguf").is_file()


def test_grpo_checkpoint_exports(tiny_vlm_dir, tmp_path):
    import lightning as L
    from PIL import Image

    from vlm_lightning.data.collate import VisionChatCollator
    from vlm_lightning.modules.grpo import VisionGRPOModule

    base = tiny_vlm_dir("qwen2_5_vl")
    module = VisionGRPOModule(str(base),
                              reward_funcs=[lambda prompts, completions, **kw: [len(c) / 9 for c in completions]],
                              num_generations=2, max_new_tokens=3, dtype="float32", r=4, init_lora_weights=False,
                              gradient_checkpointing=False, use_kernels=True)
    module.configure_model()
    image = Image.new("RGB", (56, 56), (9, 99, 200))
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "Read."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "12"}]}]}] * 2
    loader = torch.utils.data.DataLoader(rows, batch_size=2,
                                         collate_fn=VisionChatCollator(module.processor, for_generation=True))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, loader)
    ckpt = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(ckpt)

    out = tmp_path / "merged"
    assert export_main(["merge", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "float32"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == [STOCK]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_checkpoint_without_export_block_names_the_file(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {"model_name_or_path": "x"}}, path)
    with pytest.raises(ValueError, match=r"foreign\.ckpt has no 'vlm_lightning' block"):
        merge_lora(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_in_memory_patched_model_merges_as_stock_class(tiny_vlm_dir, tmp_path):
    """The MergeLoRA/GGUFExport path: an in-memory PEFT model whose classes apply_kernels swapped."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lightning.models import apply_lora
    from vlm_lightning.models.patch import apply_kernels

    base = tiny_vlm_dir("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    apply_kernels(model)
    assert type(model).__name__ == f"Fused{STOCK}"
    torch.manual_seed(0)
    peft_model = apply_lora(model, r=4, init_lora_weights=False, gradient_checkpointing=False).eval()
    for name_or_path, how in ((None, "reloaded"), (str(tmp_path / "missing"), "copied")):
        out = merge_lora(peft_model, tmp_path / how, dtype="float32", base_name_or_path=name_or_path,
                         processor=AutoProcessor.from_pretrained(base))
        assert json.loads((out / "config.json").read_text())["architectures"] == [STOCK]
        assert json.loads((out / "merge_info.json").read_text())["base_weights"] == how
        merged, load = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not load["missing_keys"] and not load["unexpected_keys"]
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                       atol=1e-4, rtol=0)


def test_export_layer_does_not_import_the_modules():
    """Export reads checkpoints through their `vlm_lightning` block, never by rebuilding a LightningModule."""
    import subprocess
    import sys

    code = ("import sys, vlm_lightning.export, vlm_lightning.export.checkpoint, vlm_lightning.export.cli, "
            "vlm_lightning.export.gguf; print([m for m in sys.modules if m.startswith('vlm_lightning.modules')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_deepspeed_checkpoint_folder_is_recognised(tmp_path, capsys, monkeypatch):
    """A DeepSpeed strategy writes `last.ckpt` as a folder of ZeRO shards. Export reads it directly (consolidated
    by Lightning's converter; run on the GPU by benchmarks/bench_e2e.sh's strategies stage). Without the
    `deepspeed` package the error names the folder and the package, and the CLI exits 2 with nothing written."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # absent, as on the CI machine
    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    rc = export_main(["merge", "--checkpoint", str(folder), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert rc == 2 and "DeepSpeed checkpoint folder" in err and "deepspeed" in err and str(folder) in err
    assert not (tmp_path / "merged").exists()
