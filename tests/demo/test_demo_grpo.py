"""The GRPO CPU demo (`make demo-grpo`, recipes/demo/grpo_cpu.yaml): the shifted data set and the recipe at a
reduced step count through the real CLI. The model is a tiny random-weight one built here, not the SFT demo's
trained model (that takes minutes to make), so this checks the mechanics only: the recipe parses, trains,
prints the validation CER before and after, saves the model, and its validation strings are never trained on
(neither here nor in the SFT demo). How much the real run improves is measured by hand (README)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from vlm_lightning.cli import main
from vlm_lightning.demo.data import make_demo_ocr_dataset
from vlm_lightning.models.tiny import resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/demo/grpo_cpu.yaml"
SFT_RECIPE = ROOT / "recipes/demo/ocr_cpu.yaml"


def _answers(jsonl: Path) -> list[str]:
    return [json.loads(line)["messages"][1]["content"][0]["text"] for line in jsonl.read_text().splitlines()]


def test_shifted_rendering_keeps_the_strings_and_the_old_default(tmp_path):
    kw = dict(n_train=12, n_val=4, num_digits=2, layout="fixed", prompt="Read.", image_last=True)
    base = make_demo_ocr_dataset(tmp_path / "base", **kw)
    small = make_demo_ocr_dataset(tmp_path / "small", font_size=30, **kw)
    noisy = make_demo_ocr_dataset(tmp_path / "noisy", noise=40.0, **kw)
    for split in ("train", "val"):
        assert _answers(base[split]) == _answers(small[split]) == _answers(noisy[split])
    image = "val/00000.png"
    pngs = {(p["val"].parent / image).read_bytes() for p in (base, small, noisy)}
    assert len(pngs) == 3  # three different renderings of the same string
    # the defaults leave the stamp (and so folders written before these options existed) unchanged
    assert "font_size" not in json.loads((tmp_path / "base/demo_ocr.json").read_text())
    assert json.loads((tmp_path / "small/demo_ocr.json").read_text())["font_size"] == 30


def test_grpo_demo_recipe_trains_and_reports_cer_before_and_after(tmp_path, monkeypatch, capsys):
    makefile = (ROOT / "Makefile").read_text()
    body = makefile.split("\ndemo-grpo:", 1)[1].split("\n\n", 1)[0]
    assert f"vlm-lightning fit --config {RECIPE.relative_to(ROOT)}" in body
    assert "runs/demo/merged" in body and "demo-grpo" not in makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    cfg = yaml.safe_load(RECIPE.read_text())
    assert cfg["model"]["init_args"]["model_name_or_path"] == "runs/demo/merged"  # what `make demo` writes

    monkeypatch.chdir(tmp_path)  # the recipe writes under runs/
    model = resolve_model_path(f"tiny:ocr_demo@{tmp_path / 'base'}")  # stands in for the trained SFT model
    main(["fit", "--config", str(RECIPE), "--model.init_args.model_name_or_path", str(model),
          "--demo_data.n_train", "24", "--data.batch_size", "2", "--model.init_args.num_generations", "4",
          "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
          "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    before = re.search(r"\[demo\] before training: val CER (\d\.\d+)", out)
    after = re.search(r"\[demo\] validation CER (\d\.\d+) -> (\d\.\d+)", out)
    assert before and after and before.group(1) == after.group(1), out
    assert "[demo] fit took" in out and ", 3 steps" in out, out
    assert (tmp_path / "runs/demo_grpo/model").is_dir()
    metrics = next((tmp_path / "runs/demo_grpo/logs").rglob("metrics.csv")).read_text()
    assert "train/reward" in metrics and "val/cer" in metrics

    # validation strings: never in the GRPO training set, and the SFT demo's held-out strings too
    data = tmp_path / cfg["demo_data"]["root"]
    train, val = set(_answers(data / "train.jsonl")), _answers(data / "val.jsonl")
    assert len(val) == cfg["demo_data"]["n_val"] and not train & set(val)
    sft = yaml.safe_load(SFT_RECIPE.read_text())["demo_data"]
    sft_paths = make_demo_ocr_dataset(**{**sft, "root": tmp_path / "sft", "n_train": 200})
    assert _answers(sft_paths["val"]) == val and not set(_answers(sft_paths["train"])) & set(val)
