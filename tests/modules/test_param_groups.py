"""Per-component learning rates (modules/param_groups.py, ``VisionModule(lr_vision=, lr_projector=, lr_language=)``):
each optimizer group carries its lr and exactly its component's trainable parameters (every trainable parameter in
one group), for Qwen2-VL (projector inside the tower) with vision + projector LoRA and for LLaVA-NeXT fully
fine-tuned (``image_newline``); the same through the real CLI from a recipe-style YAML (AdamW + LinearLR), for the
SFT and the GRPO module; all-None keeps today's single group; one real SGD step moves each group by its own lr
(lr_vision=0 leaves the vision LoRA bit-identical) and logs train/lr_<component>."""
from __future__ import annotations

import pytest
import torch
import yaml

from vlm_lightning.models.families import get_family_spec
from vlm_lightning.modules.param_groups import component_of, component_param_groups
from vlm_lightning.modules.sft import VisionSFTModule

LRS = {"vision": 1e-5, "projector": 3e-4, "language": None}


def _expected(model, spec) -> dict[str, set[str]]:
    """Trainable parameter names by component, from the family table's paths (written out independently)."""
    out = {"vision": set(), "projector": set(), "language": set()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        path = name.removeprefix("base_model.model.")
        if path.startswith(spec.projector + ".") or path == "model.image_newline":
            out["projector"].add(name)
        elif path.startswith(spec.vision_tower + "."):
            out["vision"].add(name)
        else:
            assert path.startswith((spec.language_model + ".", spec.lm_head + ".")), name
            out["language"].add(name)
    return out


def _check_groups(model, groups, lrs, optimizer_lr):
    spec = get_family_spec(model)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = _expected(model, spec)
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter, each exactly once
    assert [g["name"] for g in groups] == [c for c in ("vision", "projector", "language") if expected[c]]
    for g in groups:
        assert {names[id(p)] for p in g["params"]} == expected[g["name"]], g["name"]
        assert g["lr"] == (lrs[g["name"]] if lrs[g["name"]] is not None else optimizer_lr), g["name"]


@pytest.mark.parametrize("family, init", [
    # Qwen2-VL: the projector (model.visual.merger) sits inside the vision tower (model.visual); LoRA on both
    ("qwen2_vl", dict(finetune_vision_layers=True, finetune_projector=True)),
    # LLaVA-NeXT, every weight trains: image_newline is the projector's, lm_head the language model's
    ("llava_next", dict(lora=False)),
])
def test_groups_hold_their_lr_and_exactly_their_parameters(tiny_vlm_dir, family, init):
    module = VisionSFTModule(str(tiny_vlm_dir(family)), dtype="float32", gradient_checkpointing=False,
                             lr_vision=LRS["vision"], lr_projector=LRS["projector"],
                             optimizer=lambda params: torch.optim.AdamW(params, lr=2e-4), **init)
    module.configure_model()
    optimizer = module.configure_optimizers()
    groups = optimizer.param_groups
    assert len(groups) == 3
    _check_groups(module.model, groups, LRS, optimizer_lr=2e-4)
    if family == "qwen2_vl":  # LoRA weights count with the module they wrap
        vision = [n for n, p in module.model.named_parameters() if p.requires_grad and ".visual.blocks." in n]
        assert vision and all("lora_" in n for n in vision)
        assert component_of(vision[0], get_family_spec("qwen2_vl")) == "vision"
    else:
        newline = dict(module.model.named_parameters())["model.image_newline"]
        assert any(p is newline for p in groups[1]["params"])


def test_no_component_lr_keeps_one_group_and_unset_component_lr_warns(tiny_vlm_dir):
    base = str(tiny_vlm_dir("qwen2_vl"))
    module = VisionSFTModule(base, dtype="float32", gradient_checkpointing=False)
    module.configure_model()
    assert len(module.configure_optimizers().param_groups) == 1  # resumable from checkpoints made before
    module = VisionSFTModule(base, dtype="float32", gradient_checkpointing=False, lr_vision=1e-5)
    module.configure_model()  # LoRA on the language model only: no vision weight trains
    with pytest.warns(UserWarning, match="lr_vision=1e-05 applies to nothing"):
        groups = module.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["language"]


def test_bad_component_and_negative_lr_are_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown components"):
        component_param_groups(model, {"vison": 1e-5}, spec=get_family_spec("qwen2_vl"))
    with pytest.raises(ValueError, match="lr_vision=-1"):
        component_param_groups(model, {"vision": -1}, spec=get_family_spec("qwen2_vl"))
    # a trainable weight outside the family's components is named, never silently given some lr
    with pytest.raises(ValueError, match=r"\['weight', 'bias'\]"):
        component_param_groups(model, {"vision": 1e-5}, spec=get_family_spec("qwen2_vl"))


@pytest.mark.parametrize("module_class", ["vlm_lightning.modules.VisionSFTModule",
                                          "vlm_lightning.modules.grpo.VisionGRPOModule"])
def test_component_lrs_from_a_recipe_yaml_through_the_cli(tiny_vlm_dir, tmp_path, module_class):
    from vlm_lightning.cli import cli_main

    recipe = {
        "model": {"class_path": module_class, "init_args": {
            "model_name_or_path": str(tiny_vlm_dir("qwen2_vl")), "dtype": "float32",
            "gradient_checkpointing": False, "finetune_vision_layers": True, "finetune_projector": True,
            "lr_vision": 1e-5, "lr_projector": 3e-4,  # lr_language: null -> the optimizer's lr
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4, "weight_decay": 0.0}},
            "scheduler": {"class_path": "torch.optim.lr_scheduler.LinearLR",
                          "init_args": {"start_factor": 0.1, "total_iters": 20}}}},
        "data": {"batch_size": 1},
        "trainer": {"accelerator": "cpu", "logger": False, "max_steps": 1},
    }
    if "GRPO" in module_class:
        recipe["model"]["init_args"]["reward_funcs"] = [{"class_path": "vlm_lightning.rewards.OCRReward"}]
        recipe["data"]["train_for_generation"] = True
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = cli_main(["--config", str(path)], run=False)
    assert (cli.model.hparams.lr_vision, cli.model.hparams.lr_projector, cli.model.hparams.lr_language) == \
        (1e-5, 3e-4, None)
    cli.model.configure_model()
    out = cli.model.configure_optimizers()
    optimizer = out["optimizer"]
    groups = optimizer.param_groups
    initial = {"vision": 1e-5, "projector": 3e-4, "language": 1e-4}
    assert {g["name"]: g["initial_lr"] for g in groups} == initial
    for g in groups:  # LinearLR scales each group from its own lr
        assert g["lr"] == pytest.approx(0.1 * initial[g["name"]])
        g["lr"] = g["initial_lr"]
    _check_groups(cli.model.model, groups, LRS, optimizer_lr=1e-4)


def test_one_training_step_applies_each_groups_lr(tiny_vlm_dir, tmp_path):
    import lightning as L

    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.demo.data import make_demo_ocr_dataset

    path = str(tiny_vlm_dir("qwen2_vl"))
    data = make_demo_ocr_dataset(tmp_path, n_train=2, n_val=2)
    dm = VisionChatDataModule(path, train=str(data["train"]), val=str(data["val"]), batch_size=2)
    # plain SGD (no momentum, no decay): a group with lr 0 cannot move, the others must
    module = VisionSFTModule(path, dtype="float32", r=4, gradient_checkpointing=False, init_lora_weights=False,
                             finetune_vision_layers=True, finetune_projector=True, lr_vision=0.0, lr_projector=0.5,
                             optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, max_steps=1, limit_val_batches=0)
    trainer.strategy.connect(module)
    module.configure_model()
    spec = get_family_spec("qwen2_vl")
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=dm)
    moved = {component_of(n, spec): [] for n in before}
    for n, p in module.model.named_parameters():
        if n in before:
            moved[component_of(n, spec)].append(not torch.equal(p.detach(), before[n]))
    assert not any(moved["vision"]) and any(moved["projector"]) and any(moved["language"])
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/lr")}
    assert logged == {"train/lr": 0.0, "train/lr_vision": 0.0, "train/lr_projector": 0.5, "train/lr_language": 1.0}
