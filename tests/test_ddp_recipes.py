"""recipes/strategies/*.yaml: each opens with the command that runs it, holds only trainer (and, for QLoRA,
model quantisation) settings, parses against Lightning's Trainer signature, and builds its strategy.
When the CLI and a model recipe exist, the fragment also composes with it through ``--print_config``."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "strategies").glob("*.yaml"))
MODEL_RECIPES = [REPO / "recipes" / "qwen2_5_vl" / "lora_sft.yaml", REPO / "recipes" / "demo" / "sft.yaml"]


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_strategy_recipe_is_here():
    assert {p.stem for p in RECIPES} >= {"ddp", "fsdp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_strategy_recipe_parses_and_builds(path):
    text = path.read_text()
    assert text.startswith(f"# Run: vlm-lightning fit --config recipes/") and f"--config recipes/strategies/{path.name}" \
        in text.splitlines()[0]
    cfg = yaml.safe_load(text)
    assert set(cfg) <= {"trainer", "model"} and "strategy" in cfg["trainer"]
    if "model" in cfg:  # only the quantisation switches, which both modules take
        assert set(cfg["model"]) == {"init_args"}
        assert set(cfg["model"]["init_args"]) <= {"quantization", "dtype", "bnb_4bit_quant_storage"}

    from jsonargparse import ArgumentParser
    from lightning.pytorch import Trainer

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parsed = parser.parse_object({"trainer": cfg["trainer"]})  # validates class_path and init_args names/types
    spec = cfg["trainer"]["strategy"]
    assert parsed.trainer.strategy.class_path == spec["class_path"]

    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if "DeepSpeed" in cls_name and not _deepspeed_available():
        from vlm_lightning.strategies import make_strategy

        with pytest.raises(ImportError, match="deepspeed"):
            make_strategy(f"deepspeed_stage_{spec['init_args']['stage']}")
        return
    strategy = cls(**spec.get("init_args", {}))
    if "model" in cfg:
        from vlm_lightning.strategies import validate_strategy_for_quantization

        init = cfg["model"]["init_args"]
        validate_strategy_for_quantization(strategy, init["quantization"], init["bnb_4bit_quant_storage"], init["dtype"])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_strategy_recipe_composes_with_a_model_recipe(path):
    model = next((m for m in MODEL_RECIPES if m.exists()), None)
    try:
        importlib.import_module("vlm_lightning.cli")
    except ImportError:
        pytest.skip("vlm_lightning.cli is not there yet")
    if model is None:
        pytest.skip("no model recipe yet")
    proc = subprocess.run([sys.executable, "-m", "vlm_lightning.cli", "fit", "--config", str(model), "--config",
                           str(path), "--print_config"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["trainer"]["strategy"]["class_path"] == yaml.safe_load(path.read_text())["trainer"]["strategy"][
        "class_path"]
