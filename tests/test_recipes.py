"""Every SFT recipe parses through the real CLI and its --print_config round-trips; the demo recipe runs end
to end (reduced step count) and prints its before/after report."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted([ROOT / "recipes/demo/ocr_cpu.yaml", *ROOT.glob("recipes/*/lora_sft.yaml"),
                  *ROOT.glob("recipes/*/qlora_sft.yaml")])


def _print_config(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_every_family_has_a_recipe():
    families = {p.parent.name for p in RECIPES}
    assert {"qwen2_vl", "qwen2_5_vl", "llava_next", "pixtral", "gemma3", "mistral3", "mistral3_small"} <= families


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_and_print_config_round_trips(recipe, capsys, tmp_path):
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith(("# vlm-lightning fit --config", "# make demo")), first_line
    printed = _print_config(capsys, ["--config", str(recipe)])
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "vlm_lightning.modules.VisionSFTModule"
    assert config["model"]["init_args"]["model_name_or_path"]
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert _print_config(capsys, ["--config", str(saved)]) == printed


def test_demo_recipe_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe writes under runs/
    main(["fit", "--config", str(ROOT / "recipes/demo/ocr_cpu.yaml"), "--demo_data.n_train", "16",
          "--demo_data.n_val", "4", "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "4"])
    out = capsys.readouterr().out
    assert "[demo] before training: val CER" in out and "[demo] validation CER" in out, out
    assert (tmp_path / "runs/demo/base/config.json").exists()  # tiny model built on first use
    assert (tmp_path / "runs/demo/data/val.jsonl").exists()
    assert (tmp_path / "runs/demo/model/config.json").exists()  # lora: false -> the full model is saved
