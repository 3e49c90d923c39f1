"""Every SFT recipe parses through the real CLI and its --print_config round-trips (the demo recipe runs end to
end, at a reduced step count, in tests/demo/test_demo.py)."""
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

