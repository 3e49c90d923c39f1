"""Every YAML under recipes/ goes through the real CLI: its first line is the command that runs it, that
command's configs parse with ``cli_main(["fit", "--config", ..., "--print_config"])`` and the printed config
parses back to itself. Strategy recipes (recipes/strategies/) are overlays: their first line names the model
recipe they sit on. Every model recipe is also built (``run=False``: the module, data module and Trainer,
not the weights) so its module's own checks run. The demo recipes run end to end, at a reduced step count,
in tests/demo/test_demo.py and tests/demo/test_demo_grpo.py.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from vlm_lightning.cli import cli_main
from vlm_lightning.distributed.checks import validate_strategy_for_quantization
from vlm_lightning.modules.grpo import VisionGRPOModule
from vlm_lightning.modules.sft import VisionSFTModule

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
STRATEGY_RECIPES = [p for p in RECIPES if p.parent.name == "strategies"]
MODEL_RECIPES = [p for p in RECIPES if p not in STRATEGY_RECIPES]
FAMILIES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "pixtral", "gemma3", "mistral3", "mistral3_small",
            "mllama"}


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


def _configs(recipe: Path) -> list[Path]:
    """The ``--config`` files of the command on the recipe's first line, which must run this recipe."""
    first = recipe.read_text().splitlines()[0]
    assert first.startswith(("# vlm-lightning fit --config", "# make demo", "# Run: vlm-lightning fit --config")), first
    configs = [REPO / c for c in re.findall(r"--config (\S+?\.yaml)", first)]
    assert recipe in configs, f"{_id(recipe)}: its first line does not run it: {first}"
    assert all(c.exists() for c in configs), configs
    return configs


def _print_config(capsys, configs: list[Path]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *[a for c in configs for a in ("--config", str(c))], "--print_config"])
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), out.err[-4000:]
    return out.out


def test_the_recipes_cover_every_family_and_strategy():
    sft = [p for p in MODEL_RECIPES if p.name in ("lora_sft.yaml", "qlora_sft.yaml")]
    assert FAMILIES <= {p.parent.name for p in sft}
    assert {p.stem for p in STRATEGY_RECIPES} >= {"ddp", "fsdp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3"}
    assert {_id(p) for p in MODEL_RECIPES} >= {"demo/ocr_cpu.yaml", "demo/grpo_cpu.yaml", "qwen2_vl/grpo.yaml",
                                               "qwen2_vl/gspo.yaml", "qwen2_5_vl/grpo.yaml", "qwen2_5_vl/gspo.yaml",
                                               "qwen3_vl/grpo.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_recipe_parses_through_the_cli_and_print_config_round_trips(recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands name their configs relative to the repository
    printed = _print_config(capsys, _configs(recipe))
    config = yaml.safe_load(printed)
    module = config["model"]["class_path"]
    assert module in ("vlm_lightning.modules.VisionSFTModule", "vlm_lightning.modules.sft.VisionSFTModule",
                      "vlm_lightning.modules.grpo.VisionGRPOModule"), module
    assert config["model"]["init_args"]["model_name_or_path"]
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert _print_config(capsys, [saved]) == printed
    if recipe in STRATEGY_RECIPES:
        fragment = yaml.safe_load(recipe.read_text())
        assert config["trainer"]["strategy"]["class_path"] == fragment["trainer"]["strategy"]["class_path"]


@pytest.mark.parametrize("recipe", STRATEGY_RECIPES, ids=_id)
def test_strategy_recipe_holds_only_strategy_settings_and_builds(recipe):
    cfg = yaml.safe_load(recipe.read_text())
    assert set(cfg) <= {"trainer", "model"} and "strategy" in cfg["trainer"]
    if "model" in cfg:  # only the quantisation switches, which both modules take
        assert set(cfg["model"]) == {"init_args"}
        assert set(cfg["model"]["init_args"]) <= {"quantization", "dtype", "bnb_4bit_quant_storage"}
    spec = cfg["trainer"]["strategy"]
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if "DeepSpeed" in cls_name:  # Lightning's own refusal, naming the missing package
            with pytest.raises(Exception, match="must have DeepSpeed installed"):
                cls(**spec.get("init_args", {}))
            return
    strategy = cls(**spec.get("init_args", {}))
    if "model" in cfg:
        init = cfg["model"]["init_args"]
        validate_strategy_for_quantization(strategy, init["quantization"], init["bnb_4bit_quant_storage"],
                                           init["dtype"])


@pytest.mark.parametrize("recipe", MODEL_RECIPES, ids=_id)
def test_model_recipe_builds_a_validated_module(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo recipes write their data (and tiny model) under runs/
    monkeypatch.setenv("VLM_LIGHTNING_TINY_DIR", str(tmp_path / "tiny"))
    text = yaml.safe_load(recipe.read_text())
    small = ["--demo_data.n_train=8", "--demo_data.n_val=4"] if "demo_data" in text else []
    cli = cli_main(["--config", str(recipe), "--trainer.accelerator=cpu", "--trainer.precision=32",
                    "--trainer.logger=false", *small], run=False)
    if "grpo" in recipe.name or "gspo" in recipe.name:
        assert isinstance(cli.model, VisionGRPOModule) and cli.model.rewards.reward_fns
        assert cli.datamodule.train_for_generation
        if "gspo" in recipe.name:
            assert cli.model.loss_config.importance_sampling_level == "sequence"
    else:
        assert isinstance(cli.model, VisionSFTModule)
