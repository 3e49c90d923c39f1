"""The family table resolves every tiny model, config (object or dict) and model_type to the right family;
the processor-side facts agree with what each tiny processor produces."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, LlavaConfig

from vlm_lightning.models import FAMILIES, get_family_spec
from vlm_lightning.models.families import VISION_TOKEN_STRINGS
from vlm_lightning.models.tiny import TINY_FAMILIES


def test_family_table_covers_the_tiny_families_with_valid_values():
    assert set(FAMILIES) == set(TINY_FAMILIES)
    for name, spec in FAMILIES.items():
        assert spec.name == name
        assert spec.decoder_layers.startswith(spec.language_model + ".")
        assert set(spec.image_special_tokens) <= set(VISION_TOKEN_STRINGS)
        # a family has a llama.cpp layout (text arch + projector) or says why not
        assert (spec.gguf_text_arch is None) == (spec.gguf_projector is None) == bool(spec.gguf_refusal)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_get_family_spec_from_config_and_name(family, tiny_vlm_dir):
    config = AutoConfig.from_pretrained(tiny_vlm_dir(family))
    assert get_family_spec(config).name == family
    assert get_family_spec(family).name == family


def test_get_family_spec_resolves_shared_model_types_and_rejects_unknown():
    assert get_family_spec("llava").name == "pixtral"  # the only LLaVA-1.5-shaped family we support
    assert get_family_spec("mistral3").name == "mistral3"
    assert get_family_spec("qwen2_5_vl").gguf_projector == "qwen2.5vl_merger"
    as_dict = {"model_type": "mistral3", "text_config": {"model_type": "mistral"}}  # a config.json
    assert get_family_spec(as_dict).name == "mistral3_small"
    with pytest.raises(ValueError, match="unknown VLM family or model_type 'llama'"):
        get_family_spec("llama")
    clip_llava = LlavaConfig(vision_config={"model_type": "clip_vision_model"}, text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="vision_config.model_type='clip_vision_model'"):
        get_family_spec(clip_llava)
