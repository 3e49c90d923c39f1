"""The family table resolves every tiny model, config and model_type to the right family."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, LlavaConfig

from vlm_lightning.models import FAMILIES, get_family_spec
from vlm_lightning.testing import TINY_FAMILIES


def test_family_table_covers_the_tiny_families_with_valid_values():
    assert set(FAMILIES) == set(TINY_FAMILIES)
    for name, spec in FAMILIES.items():
        assert spec.name == name
        assert spec.norm in ("rms", "gemma_rms") and spec.mlp_act in ("swiglu", "geglu_tanh")
        assert spec.rope in ("mrope", "rope")
        assert spec.image_token in spec.image_special_tokens
        assert spec.decoder_layers.startswith(spec.language_model + ".")
        assert spec.needs_mm_token_type_ids == ("mm_token_type_ids" in spec.processor_outputs)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_get_family_spec_from_config_and_name(family, tiny_vlm_dir):
    config = AutoConfig.from_pretrained(tiny_vlm_dir(family))
    assert get_family_spec(config).name == family
    assert get_family_spec(family).name == family


def test_get_family_spec_resolves_shared_model_types_and_rejects_unknown():
    assert get_family_spec("llava").name == "pixtral"  # the only LLaVA-1.5-shaped family we support
    assert get_family_spec("mistral3").name == "mistral3"
    assert get_family_spec("qwen2_5_vl").rope == "mrope"
    with pytest.raises(ValueError, match="unknown VLM family or model_type 'llama'"):
        get_family_spec("llama")
    clip_llava = LlavaConfig(vision_config={"model_type": "clip_vision_model"}, text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="vision_config.model_type='clip_vision_model'"):
        get_family_spec(clip_llava)
