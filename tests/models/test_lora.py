"""apply_lora: per family and switch combination the trainable parameters are exactly an allow-list;
patterns that match nothing raise; LoRA dtype; gradients reach vision LoRA with checkpointing on or off.

The allow-lists below are written out per family (module paths as regexes), independently of the family
table that apply_lora reads, so a wrong table entry fails here.
"""
from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlm_lightning.models import apply_lora
from vlm_lightning.models.tiny import TINY_FAMILIES

LANG = r"model\.language_model\.layers\.\d+\."
LANG_ATTN = LANG + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"
LANG_MLP = LANG + r"mlp\.(gate_proj|up_proj|down_proj)"
# Llama 3.2 Vision's cross-attention layers: LoRA'd by finetune_cross_attention (default on), whatever else is set
LANG_CROSS = LANG + r"cross_attn\.(q_proj|k_proj|v_proj|o_proj)"
_MLLAMA_VISION = r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\."
_CLIP_LIKE = (r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
              r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.mlp\.(fc1|fc2)")
_PIXTRAL = (r"model\.vision_tower\.transformer\.layers\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj)",
            r"model\.vision_tower\.transformer\.layers\.\d+\.feed_forward\.(gate_proj|up_proj|down_proj)")
# (vision attention, vision MLP, projector) module paths per family
VISION = {
    "qwen2_vl": (r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)", r"model\.visual\.blocks\.\d+\.mlp\.(fc1|fc2)",
                 "model.visual.merger"),
    "qwen2_5_vl": (r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
                   r"model\.visual\.blocks\.\d+\.mlp\.(gate_proj|up_proj|down_proj)", "model.visual.merger"),
    # the deepstack mergers are projectors: never vision LoRA, trained in full with the projector switch
    "qwen3_vl": (r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
                 r"model\.visual\.blocks\.\d+\.mlp\.(linear_fc1|linear_fc2)",
                 ("model.visual.merger", "model.visual.deepstack_merger_list.0")),
    "llava_next": (*_CLIP_LIKE, "model.multi_modal_projector"),
    "gemma3": (*_CLIP_LIKE, "model.multi_modal_projector"),
    "pixtral": (*_PIXTRAL, "model.multi_modal_projector"),
    "mistral3": (*_PIXTRAL, "model.multi_modal_projector"),
    "mistral3_small": (*_PIXTRAL, "model.multi_modal_projector"),
    "mllama": (_MLLAMA_VISION + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)", _MLLAMA_VISION + r"mlp\.(fc1|fc2)",
               "model.multi_modal_projector"),
}
SWITCHES = {  # name -> (apply_lora kwargs, [module regexes that get LoRA], projector trained in full)
    "default": ({}, ["lang_attn", "lang_mlp"], False),
    "attention_only": ({"finetune_mlp_modules": False}, ["lang_attn"], False),
    "mlp_only": ({"finetune_attention_modules": False}, ["lang_mlp"], False),
    "vision_only": ({"finetune_language_layers": False, "finetune_vision_layers": True},
                    ["vis_attn", "vis_mlp"], False),
    "everything": ({"finetune_vision_layers": True, "finetune_projector": True},
                   ["lang_attn", "lang_mlp", "vis_attn", "vis_mlp"], True),
    "vision_attention_projector": ({"finetune_language_layers": False, "finetune_vision_layers": True,
                                    "finetune_mlp_modules": False, "finetune_projector": True}, ["vis_attn"], True),
}


def _model(tiny_vlm_dir, family, dtype=torch.float32):
    try:
        path = tiny_vlm_dir(family)
    except NotImplementedError as err:
        pytest.skip(str(err))
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)


def _expected(model, family, parts, projector_trained):
    vis_attn, vis_mlp, projector = VISION[family]
    regex = {"lang_attn": LANG_ATTN, "lang_mlp": LANG_MLP, "vis_attn": vis_attn, "vis_mlp": vis_mlp}
    wanted = re.compile("(" + "|".join([regex[p] for p in parts] + [LANG_CROSS]) + ")")
    expected = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and wanted.fullmatch(name):
            expected |= {f"base_model.model.{name}.lora_{ab}.default.weight" for ab in "AB"}
    for path in ((projector,) if isinstance(projector, str) else projector) if projector_trained else ():
        proj = model.get_submodule(path)
        expected |= {f"base_model.model.{path}.modules_to_save.default.{n}" for n, _ in proj.named_parameters()}
    return expected


@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trainable_parameters_are_exactly_the_allow_list(family, switch, tiny_vlm_dir):
    model = _model(tiny_vlm_dir, family)
    kwargs, parts, projector_trained = SWITCHES[switch]
    expected = _expected(model, family, parts, projector_trained)
    assert any("lora_A" in n for n in expected), "allow-list matched nothing: fixture layout changed?"
    peft_model = apply_lora(model, r=4, gradient_checkpointing=False, **kwargs)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == expected, (sorted(trainable - expected)[:5], sorted(expected - trainable)[:5])


def test_explicit_target_modules_and_patterns_that_match_nothing(tiny_vlm_dir):
    model = _model(tiny_vlm_dir, "qwen2_vl")
    with pytest.raises(ValueError, match="'nonexistent_proj'"):
        apply_lora(model, target_modules=["q_proj", "nonexistent_proj"])
    with pytest.raises(ValueError, match=re.escape("regex 'model.foo.*'")):
        apply_lora(model, target_modules="model.foo.*")
    with pytest.raises(ValueError, match="'no_such_module'"):
        apply_lora(model, modules_to_save=["no_such_module"])
    with pytest.raises(ValueError, match="both False"):
        apply_lora(model, finetune_attention_modules=False, finetune_mlp_modules=False)
    with pytest.raises(ValueError, match="both False"):
        apply_lora(model, finetune_language_layers=False)
    expected = {f"base_model.model.{n}" for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")}
    assert any(".visual." not in n for n in expected)
    peft_model = apply_lora(model, r=4, target_modules=["q_proj", "v_proj"], gradient_checkpointing=False)
    names = {n.split(".lora_")[0] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert names == expected


@pytest.mark.parametrize("lora_dtype, expected", [("compute", torch.bfloat16), ("float32", torch.float32)])
def test_lora_weights_in_the_compute_dtype(lora_dtype, expected, tiny_vlm_dir):
    model = _model(tiny_vlm_dir, "qwen2_vl", dtype=torch.bfloat16)
    peft_model = apply_lora(model, r=4, finetune_vision_layers=True, lora_dtype=lora_dtype)
    lora = {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    frozen = {p.dtype for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert lora == {expected} and frozen == {torch.bfloat16}


def test_qlora_keeps_frozen_weights_16bit(tiny_vlm_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from vlm_lightning.models import load_vlm

    model, _ = load_vlm(tiny_vlm_dir("qwen2_vl"), quantization="4bit", dtype="bfloat16")
    peft_model = apply_lora(model, r=4)
    lora = {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora == {torch.bfloat16}
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    # no fp32 upcast of the non-quantised weights (peft's prepare_model_for_kbit_training would do it)
    assert {p.dtype for p in peft_model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in peft_model.modules())


def _grad_names(tiny_vlm_dir, batch, gradient_checkpointing, use_reentrant):
    torch.manual_seed(0)
    model = _model(tiny_vlm_dir, "qwen2_vl")
    peft_model = apply_lora(model, r=4, finetune_vision_layers=True, init_lora_weights=False,
                            gradient_checkpointing=gradient_checkpointing, use_reentrant=use_reentrant)
    peft_model.train()
    peft_model(**batch).loss.backward()
    return {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradient_checkpointing_keeps_every_lora_gradient(tiny_vlm_dir, tmp_path):
    """Same set of parameters with non-zero gradient with checkpointing off, non-reentrant and reentrant,
    and it includes the vision LoRA (peft tests/testing_common.py::_test_training_gradient_checkpointing)."""
    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.demo.data import make_demo_ocr_dataset

    paths = make_demo_ocr_dataset(tmp_path / "ocr", n_train=2, n_val=1)
    dm = VisionChatDataModule(str(tiny_vlm_dir("qwen2_vl")), train=str(paths["train"]), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    reference = _grad_names(tiny_vlm_dir, batch, False, False)
    assert any(".visual.blocks." in n and "lora_" in n for n in reference)
    assert {n for n in reference if "lora_" in n} == {n for n in reference}  # nothing else trains
    for reentrant in (False, True):
        assert _grad_names(tiny_vlm_dir, batch, True, reentrant) == reference, reentrant


@pytest.mark.parametrize("cross", [True, False])
def test_mllama_cross_attention_switch(cross, tiny_vlm_dir):
    """finetune_cross_attention puts LoRA on the cross-attention layers' q/k/v/o (the text's only path to the image);
    off, they stay frozen while the self-attention layers (and every MLP) still get LoRA."""
    model = _model(tiny_vlm_dir, "mllama")
    cross_layers = model.config.text_config.cross_attention_layers
    peft_model = apply_lora(model, r=4, gradient_checkpointing=False, finetune_cross_attention=cross)
    lora = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, p in peft_model.named_parameters()
            if p.requires_grad}
    cross_qkvo = {f"model.language_model.layers.{i}.cross_attn.{m}" for i in cross_layers
                  for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    n_layers = model.config.text_config.num_hidden_layers
    self_qkvo = {f"model.language_model.layers.{i}.self_attn.{m}" for i in range(n_layers)
                 if i not in cross_layers for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert self_qkvo and self_qkvo <= lora
    assert (cross_qkvo <= lora) if cross else not (cross_qkvo & lora)
    assert {f"model.language_model.layers.{i}.mlp.down_proj" for i in cross_layers} <= lora  # its MLP is language
    # the gates are parameters, not Linear: never LoRA, frozen
    gates = [p for n, p in peft_model.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))]
    assert len(gates) == 2 * len(cross_layers) and not any(p.requires_grad for p in gates)


def test_mllama_cross_attention_alone(tiny_vlm_dir):
    """Language layers off, cross-attention on: only the cross-attention q/k/v/o train (Llama 3.2 Vision's recipe)."""
    peft_model = apply_lora(_model(tiny_vlm_dir, "mllama"), r=4, gradient_checkpointing=False,
                            finetune_language_layers=False)
    lora = {n.split(".lora_")[0] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all(".cross_attn." in n for n in lora)
    with pytest.raises(ValueError, match="both False"):
        apply_lora(_model(tiny_vlm_dir, "mllama"), finetune_language_layers=False, finetune_cross_attention=False)
