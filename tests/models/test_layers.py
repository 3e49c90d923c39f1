"""The model facts the strategies ask for: decoder-layer / vision-block class names of every family, and
whether the vision side trains (what decides DDP's find_unused_parameters)."""
from __future__ import annotations

import pytest

from vlm_lightning.models.layers import layer_class_names, vision_parameters_trainable
from vlm_lightning.models.tiny import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layer_class_names_of_every_family(family, tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir(family))
    text = layer_class_names(model, vision=False)
    assert text and all(name.endswith("DecoderLayer") for name in text), text
    both = layer_class_names(model, vision=True)
    assert both > text, f"{family}: no vision block class found besides {text}"


def test_vision_parameters_trainable_follows_lora_switches(tiny_vlm_dir):
    from vlm_lightning.models import apply_lora, load_vlm

    path = str(tiny_vlm_dir("qwen2_vl"))
    text_only = apply_lora(load_vlm(path, dtype="float32")[0], r=2, gradient_checkpointing=False)
    assert not vision_parameters_trainable(text_only)  # DDP keeps find_unused_parameters off
    with_vision = apply_lora(load_vlm(path, dtype="float32")[0], r=2, finetune_vision_layers=True,
                             gradient_checkpointing=False)
    assert vision_parameters_trainable(with_vision)
