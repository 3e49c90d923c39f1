"""recipes/strategies/*.yaml: each opens with the command that runs it, holds only trainer (and, for QLoRA,
model quantisation) settings, parses against Lightning's Trainer signature, and builds its strategy.
When the CLI and a model recipe exist, the fragment also composes with it through ``--print_config``."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "strategies").glob("*.yaml"))
MODEL_RECIPES = [REPO / "recipes" / name for name in ("qwen2_5_vl/lora_sft.yaml", "demo/sft.yaml", "qwen2_5_vl/grpo.yaml",
                                                      "demo/grpo_cpu.yaml")]


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
    first = text.splitlines()[0]
    assert first.startswith("# Run: vlm-lightning fit --config recipes/")
    assert f"--config recipes/strategies/{path.name}" in first
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
        validate_strategy_for_quantization(strategy, init["quantization"], init["bnb_4bit_quant_storage"],
                                           init["dtype"])


def _print_config(capsys, *configs: Path) -> tuple[int, str, str]:
    """``vlm-lightning fit --config ... --print_config`` in this process: (exit code, stdout, stderr)."""
    from vlm_lightning.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(["fit", *[a for c in configs for a in ("--config", str(c))], "--print_config"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_strategy_recipe_composes_with_a_model_recipe(path, capsys, monkeypatch):
    try:
        importlib.import_module("vlm_lightning.cli")
    except ImportError:
        pytest.skip("vlm_lightning.cli is not there yet")
    model = next((m for m in MODEL_RECIPES if m.exists()), None)
    if model is None:
        pytest.skip("no model recipe yet")
    monkeypatch.chdir(REPO)
    code, _, err = _print_config(capsys, model)
    if code != 0:
        pytest.skip(f"{model.relative_to(REPO)} does not parse by itself: {err.strip()[-300:]}")
    code, out, err = _print_config(capsys, model, path)
    assert code == 0, err[-4000:]
    printed = yaml.safe_load(out)
    assert printed["trainer"]["strategy"]["class_path"] == yaml.safe_load(path.read_text())["trainer"]["strategy"][
        "class_path"]
